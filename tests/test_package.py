"""The installed package: `import pabnn`, what importing it pulls in, and where run-time files go.

Nothing pabnn writes at run time goes inside the package: numba's compiled kernels are cached in
$PABNN_CACHE_DIR (default: the per-user cache folder, engine/jit.py). Leftover files inside an
installed package once made `pabnn` a namespace package that shadowed a later editable install;
`pabnn` is a regular package now, so a stray folder of that name cannot take its place.
"""
import importlib.metadata
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pabnn
import pabnn.converters
import pabnn.engine

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_FOLDERS = [Path(module.__file__).parent for module in (pabnn, pabnn.engine, pabnn.converters)]
SUBPROCESS_SECONDS = 300  # a cold warm-up compiles every kernel: about a minute on 2 cores


def run_python(code, cwd=None, **environment):
    """Run `code` in a new Python process with extra environment variables; returns its stdout."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=SUBPROCESS_SECONDS, env=dict(os.environ, **environment), cwd=cwd or ROOT / "tests")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_pabnn_is_a_regular_package_with_the_public_api():
    assert pabnn.__spec__.origin.endswith("__init__.py")
    assert pabnn.__version__ == importlib.metadata.version("pabnn")
    from pabnn.converters import convert
    from pabnn.engine import Session, load
    assert pabnn.convert is convert and pabnn.load is load and pabnn.Session is Session
    for error in (pabnn.FormatError, pabnn.GraphError, pabnn.InputError, pabnn.ConversionError):
        assert issubclass(error, pabnn.PabnnError)


def test_importing_pabnn_and_the_engine_never_imports_onnx_torch_or_matplotlib():
    out = run_python("import sys, pabnn, pabnn.engine, pabnn.engine.cli, pabnn.engine.plots; "
                     "print(sorted({'onnx', 'torch', 'matplotlib'} & set(sys.modules)))")
    assert out.strip() == "[]"


@pytest.mark.slow
def test_a_stray_namespace_folder_cannot_shadow_the_installed_package(tmp_path):
    """What pip leaves behind when an installed package's folders hold files it did not install:
    folders without __init__.py, here first on sys.path, before a regular (non-editable) install."""
    installed = tmp_path / "installed"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(installed), str(ROOT)], check=True, timeout=SUBPROCESS_SECONDS,
                   capture_output=True)
    stray = tmp_path / "stray"
    (stray / "pabnn" / "engine" / "ops" / "__pycache__").mkdir(parents=True)
    (stray / "pabnn" / "engine" / "ops" / "__pycache__" / "left_over.nbi").write_bytes(b"")
    out = run_python("import pabnn.engine.ops as ops, pabnn; print(ops.get_op('PAConv').name, pabnn.__file__)",
                     PYTHONPATH=os.pathsep.join([str(stray), str(installed)]), cwd=tmp_path)
    name, origin = out.split()
    assert name == "PAConv" and origin == str(installed / "pabnn" / "__init__.py")


def test_compiled_kernels_are_cached_outside_the_package_and_reused(tmp_path):
    cache = tmp_path / "cache"
    started = time.time()
    warm_up = ("from pabnn.engine.warmup import warmup; warmup(); "
               "from pabnn.engine import bits; from pabnn.engine.ops import pa_conv, pool; "
               "kernels = [v for m in (bits, pa_conv, pool) for v in vars(m).values() if hasattr(v, 'stats')]; "
               "print(sum(len(k.signatures) for k in kernels), "
               "sum(sum(k.stats.cache_hits.values()) for k in kernels), "
               "sum(sum(k.stats.cache_misses.values()) for k in kernels))")
    compiled, hits, misses = map(int, run_python(warm_up, PABNN_CACHE_DIR=str(cache)).split())
    assert compiled >= 4 and hits == 0 and misses == compiled
    assert list(cache.rglob("*.nbi")) and list(cache.rglob("*.nbc"))
    written_inside = [path for folder in PACKAGE_FOLDERS for pattern in ("*.nbi", "*.nbc")
                      for path in folder.rglob(pattern) if path.stat().st_mtime >= started - 1]
    assert written_inside == []
    # A second process loads the kernels from the cache and compiles none (kernels that the first
    # compiled only as callees of others are not loaded on their own).
    loaded, hits, misses = map(int, run_python(warm_up, PABNN_CACHE_DIR=str(cache)).split())
    assert 1 <= loaded <= compiled and hits == loaded and misses == 0


def test_a_kernel_cache_stamp_covers_the_files_it_compiles_in(monkeypatch):
    """ConvMaxPool's kernel compiles in conv_direct's micro-kernel, pool's row helpers and bits'
    row packer: its cache stamp digests those files too, so an install that changes them never
    loads its stale machine code (numba's own cache sees only the kernel's file)."""
    from pabnn.engine import bits, jit
    from pabnn.engine.ops import conv_direct, conv_max_pool, pool

    digested = []
    monkeypatch.setattr(jit, "_files_digest", lambda paths, stats: digested.extend(paths) or "stamp")
    kernel = conv_max_pool.conv_max_pool_kernel.py_func
    jit._CacheFolderLocator(kernel, kernel.__code__.co_filename).get_source_stamp()
    files = {os.path.realpath(path) for path in digested}
    assert {os.path.realpath(module.__file__) for module in (conv_max_pool, conv_direct, pool, bits, jit)} <= files
