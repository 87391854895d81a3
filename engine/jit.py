"""Numba settings in one place: compile options, the on-disk cache folder, the threading layer,
and the LLVM popcount intrinsic the binary kernels are built on.

numba has no popcount function; `popcount64` emits LLVM's `llvm.ctpop.i64`, which LLVM lowers to
POPCNT (or vectorizes to VPOPCNTQ / a shuffle-based popcount when it vectorizes a loop).

Cache: compiled kernels are cached on disk so that a second process loads machine code instead
of compiling, in `cache_folder()`: $PABNN_CACHE_DIR, else the platform's per-user cache folder
($XDG_CACHE_HOME or ~/.cache on Linux, ~/Library/Caches on macOS, %LOCALAPPDATA% on Windows) /
pabnn. Nothing is written inside the installed package, so read-only installs start warm too and
`pip uninstall` leaves no stray folders behind. A cached kernel is reused only while its own
source file and the files whose code kernels of other files compile into themselves are
unchanged (`_INLINED_FILES`: this file, the LLVM intrinsics of llvm_ir.py, popcount_block.py,
ops/conv_direct.py and amx.py, the `inline_jit` helpers of bits.py and ops/pool.py), and only by the same numba version
(numba checks that itself): numba's cache does not see a change in another file.

Threading layer: "forksafe" unless NUMBA_THREADING_LAYER names one. On Linux that is TBB when
numba can load it (pabnn depends on the `tbb` wheel there and loads its library, whose folder
is not on the loader's path; TBB is as fast as OpenMP here), else numba's own workqueue (about
half as fast on a whole network); GNU OpenMP, numba's default when TBB is absent,
aborts or hangs a child process forked after a parallel kernel ran (multiprocessing's default
start method on Linux, gunicorn-style servers, PyTorch DataLoader workers). The setting is
numba's process-wide one, read when the first parallel kernel runs.
"""
import ctypes
import functools
import hashlib
import os
import sys

import numba
from numba import types
from numba.core.caching import CompileResultCacheImpl, FunctionCache, _CacheLocator
from numba.extending import intrinsic

# fastmath stays off: the float combine must round the same way as the reference. cache is off
# here because `_cached` attaches pabnn's own cache (in cache_folder()) instead of numba's.
JIT_OPTIONS = dict(nogil=True, fastmath=False, boundscheck=False)
PARALLEL_JIT_OPTIONS = dict(JIT_OPTIONS, parallel=True)
CACHE_ENVIRONMENT_VARIABLE = "PABNN_CACHE_DIR"
THREADING_LAYER = "forksafe"



def _load_wheel_tbb():
    """Load the TBB library that the `tbb` wheel installs into <prefix>/lib (a dependency of pabnn
    on Linux), so that numba's TBB layer can find it: that folder is not on the loader's path."""
    if not sys.platform.startswith("linux"):
        return
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        path = os.path.join(prefix, "lib", "libtbb.so.12")
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            return


if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = THREADING_LAYER
    _load_wheel_tbb()

_INLINED_FILES = tuple(os.path.join(os.path.dirname(os.path.abspath(__file__)), *name.split("/"))
                       for name in ("jit.py", "llvm_ir.py", "popcount_block.py", "bits.py", "ops/conv_direct.py",
                                    "ops/pool.py", "amx.py"))


def cache_folder():
    """The folder pabnn's compiled kernels are cached in (see the module docstring)."""
    chosen = os.environ.get(CACHE_ENVIRONMENT_VARIABLE)
    if chosen:
        return os.path.abspath(os.path.expanduser(chosen))
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.expanduser("~\\AppData\\Local")
    elif sys.platform == "darwin":
        base = os.path.expanduser("~/Library/Caches")
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "pabnn")


@functools.lru_cache(maxsize=None)
def _files_digest(paths, stats):
    """SHA-256 over the contents of `paths` (`stats`, their mtimes and sizes, key the memo)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            digest.update(handle.read())
    return digest.hexdigest()


class _CacheFolderLocator(_CacheLocator):
    """numba cache locator: a kernel's cache lives in cache_folder(), in a subfolder per source
    folder (so two installs of pabnn never share entries), stamped with the digest of its source
    file and the intrinsic files."""

    def __init__(self, py_func, py_file):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._cache_path = os.path.join(cache_folder(), self.get_suitable_cache_subpath(py_file))

    @classmethod
    def from_function(cls, py_func, py_file):
        return cls(py_func, py_file)

    def get_cache_path(self):
        return self._cache_path

    def get_source_stamp(self):
        paths = (self._py_file,) + _INLINED_FILES
        stats = tuple((os.stat(path).st_mtime_ns, os.stat(path).st_size) for path in paths)
        return _files_digest(paths, stats)

    def get_disambiguator(self):
        return str(self._lineno)


class _CacheFolderImpl(CompileResultCacheImpl):
    _locator_classes = [_CacheFolderLocator]


class _CacheFolderFunctionCache(FunctionCache):
    _impl_class = _CacheFolderImpl


def _cached(dispatcher):
    """The numba dispatcher with its on-disk cache in cache_folder(). If the folder cannot be
    created or written, the kernel still runs, compiled anew in each process."""
    try:
        _CacheFolderLocator(dispatcher.py_func, dispatcher.py_func.__code__.co_filename).ensure_cache_path()
    except OSError:
        return dispatcher
    dispatcher._cache = _CacheFolderFunctionCache(dispatcher.py_func)
    return dispatcher


def jit(function):
    """numba.njit with JIT_OPTIONS and pabnn's on-disk cache."""
    return _cached(numba.njit(**JIT_OPTIONS)(function))


def inline_jit(function):
    """`jit` for small helpers of parallel kernels, inlined into each caller by numba (at the level of
    its own IR): a plain call keeps LLVM from vectorizing the helper's loops for the caller's arrays
    (the max-pool helpers of engine/ops/pool.py ran 1.8x slower called than written inline). Not
    cached on its own: it is compiled into its callers (whose cache stamps hold its file: list it in
    _INLINED_FILES)."""
    return numba.njit(inline="always", **JIT_OPTIONS)(function)


def parallel_jit(function):
    """numba.njit with PARALLEL_JIT_OPTIONS (prange loops over threads) and pabnn's on-disk cache."""
    return _cached(numba.njit(**PARALLEL_JIT_OPTIONS)(function))


def parallel_ieee_jit(function):
    """`parallel_jit` whose float division follows IEEE (x / 0 = +-inf or nan, as numpy's) instead
    of raising ZeroDivisionError (numba's default, Python's error model)."""
    return _cached(numba.njit(**PARALLEL_JIT_OPTIONS, error_model="numpy")(function))


@intrinsic
def popcount64(typingctx, value):
    """Number of set bits of a uint64, as uint64 (LLVM ctpop)."""
    if value != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.uint64(types.uint64), codegen
