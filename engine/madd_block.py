"""The register-blocked int16 multiply-add micro-kernel of the direct integer convolution, written
in LLVM IR as a numba intrinsic (the integer twin of engine/popcount_block.py).

    sums[o, p] = sum_{t < pairs} columns[t, p, 0] * weights[t, o, 0] + columns[t, p, 1] * weights[t, o, 1]
    result[o][p] = sums[o, p]   (int32, exact: the caller bounds |sums| < 2^31)   for o < 8, p < 16

Sixteen pixels against eight output channels, two taps per step: `columns` holds, for step t, the
two taps of the 16 pixels interleaved (32 int16: pixel p's taps at 2p and 2p + 1), `weights` the
two taps of each of the 8 channels (8 pairs of int16, read as one int32 per channel and
broadcast). Each step is one vector load and, per channel, a broadcast and the product of 32 int16
pairs summed pairwise into 16 int32 lanes, added to the channel's accumulator; the 8 accumulators
(16 x int32, one 512-bit register each) stay in registers for the whole loop. The IR is the
generic one (sign-extend, multiply, add the even and odd lanes), which LLVM matches to VPMADDWD
on x86 (512-bit with AVX-512BW) and legalizes elsewhere, so the result is the same on every host.
numba's loop vectorizer cannot do this itself: with several accumulators it loses the VPMADDWD
pattern, and it prefers 256-bit vectors on these CPUs.

`madd_block_reference` is the plain-numpy twin used by the tests. numba inlines this intrinsic
into its callers, so the on-disk cache of a calling kernel is stamped with this file's contents
too (engine/jit.py).
"""
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .llvm_ir import CodegenHelpers

PIXELS = 16  # int32 lanes in a 512-bit vector
CHANNELS = 8


@intrinsic
def madd_block(typingctx, columns, column_start, column_stride, weights, weight_start, pairs, result,
               result_start, result_stride):
    """result[result_start + o * result_stride + p] = sum_t sum_{i < 2}
           columns[column_start + t * column_stride + 2 p + i] * weights[weight_start + 16 t + 2 o + i]
    for o < 8, p < 16, in int32 (wrapping; exact while the true sum fits).

    columns, weights: 1-D contiguous int16; result: 1-D contiguous int32; the starts, strides and
    pairs (>= 1) int64. Bounds are the caller's contract: nothing is checked.
    """
    i16_array = types.Array(types.int16, 1, "C")
    i32_array = types.Array(types.int32, 1, "C")
    signature = types.void(i16_array, types.int64, types.int64, i16_array, types.int64, types.int64, i32_array,
                           types.int64, types.int64)

    def codegen(context, builder, sig, args):
        column_start, column_stride, weight_start, pairs = args[1], args[2], args[4], args[5]
        result_start, result_stride = args[7], args[8]
        i16, i32, i64 = ir.IntType(16), ir.IntType(32), ir.IntType(64)
        wide = ir.VectorType(i16, 2 * PIXELS)
        lanes = ir.VectorType(i32, PIXELS)
        products = ir.VectorType(i32, 2 * PIXELS)

        helpers = CodegenHelpers(context, builder, sig, args)
        data = helpers.data

        even = ir.Constant(ir.VectorType(i32, PIXELS), list(range(0, 2 * PIXELS, 2)))
        odd = ir.Constant(ir.VectorType(i32, PIXELS), list(range(1, 2 * PIXELS, 2)))
        column_data = builder.gep(data(0), [column_start])
        weight_data = builder.bitcast(builder.gep(data(3), [weight_start]), i32.as_pointer())
        zero = ir.Constant(lanes, [0] * PIXELS)

        def step(t, accumulators):
            pointer = builder.bitcast(builder.gep(column_data, [builder.mul(t, column_stride)]), wide.as_pointer())
            column = builder.sext(builder.load(pointer, align=2), products)
            row = builder.gep(weight_data, [builder.mul(t, ir.Constant(i64, CHANNELS))])
            updated = []
            for o, accumulator in enumerate(accumulators):
                pair = builder.load(builder.gep(row, [ir.Constant(i64, o)]), align=2)
                weight = builder.sext(builder.bitcast(helpers.splat(pair, lanes), wide), products)
                product = builder.mul(column, weight)
                summed = builder.add(builder.shuffle_vector(product, product, even),
                                     builder.shuffle_vector(product, product, odd))
                updated.append(builder.add(accumulator, summed))
            return updated

        updated = helpers.counted_loop("madd_block", pairs, [zero] * CHANNELS, step)
        result_data = builder.gep(data(6), [result_start])
        for o, sums in enumerate(updated):
            target = builder.gep(result_data, [builder.mul(ir.Constant(i64, o), result_stride)])
            builder.store(sums, builder.bitcast(target, lanes.as_pointer()), align=4)
        return context.get_dummy_value()

    return signature, codegen


def madd_block_reference(columns, column_start, column_stride, weights, weight_start, pairs, result, result_start,
                         result_stride):
    """Plain-numpy twin of `madd_block` (same arguments, same effect on `result`)."""
    steps = np.stack([columns[column_start + t * column_stride:column_start + t * column_stride + 2 * PIXELS]
                      for t in range(pairs)]).astype(np.int64).reshape(pairs, PIXELS, 2)
    block = weights[weight_start:weight_start + 2 * CHANNELS * pairs].astype(np.int64).reshape(pairs, CHANNELS, 2)
    sums = np.einsum("tpi,toi->op", steps, block)
    for o in range(CHANNELS):
        start = result_start + o * result_stride
        result[start:start + PIXELS] = sums[o].astype(np.int32)
