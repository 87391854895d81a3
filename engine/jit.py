"""Numba settings in one place, and the LLVM popcount intrinsic the binary kernels are built on.

numba has no popcount function; `popcount64` emits LLVM's `llvm.ctpop.i64`, which LLVM lowers to
POPCNT (or vectorizes to VPOPCNTQ / a shuffle-based popcount when it vectorizes a loop).
"""
import numba
from numba import types
from numba.extending import intrinsic

# cache: a second process loads compiled kernels from disk instead of compiling again.
# fastmath stays off: the float combine must round the same way as the reference.
JIT_OPTIONS = dict(cache=True, nogil=True, fastmath=False, boundscheck=False)
PARALLEL_JIT_OPTIONS = dict(JIT_OPTIONS, parallel=True)

jit = numba.njit(**JIT_OPTIONS)
parallel_jit = numba.njit(**PARALLEL_JIT_OPTIONS)


@intrinsic
def popcount64(typingctx, value):
    """Number of set bits of a uint64, as uint64 (LLVM ctpop)."""
    if value != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.uint64(types.uint64), codegen
