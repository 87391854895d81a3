"""The register-blocked AND-popcount micro-kernel, written in LLVM IR as a numba intrinsic.

    counts[o, p] = sum_{t < length} popcount(windows[t][p] & weights[t][o])   for o < 8, p < 8
    result[o][p] = scales[o] * counts[o, p] (+ result[o][p] when accumulating)  (float64)

Eight output channels (`weights`, interleaved: word t of channels o..o+7 are 8 consecutive
uint64) against eight pixels (`windows`, pixel-interleaved: word t of the 8 pixels are 8
consecutive uint64, and word t + 1 is `window_stride` words further). A 512-bit vector holds one
word of the 8 pixels, so the 8 x 8 accumulators are eight vectors, one per output channel, that
stay in registers for the whole loop: each step loads one window vector, broadcasts one weight
word per channel, and does eight AND + popcount + add. The exact integer counts are then
converted to float64, multiplied by the channel's scale and stored in `result`, or added to it (a
multiply then an add, no fused rounding). Each channel's 8 pixels are contiguous in a vector, so
the output is channel-major with no shuffle. On AVX-512 VPOPCNTDQ machines LLVM emits VPOPCNTQ on
zmm registers; elsewhere it legalizes the same IR to whatever the host has (AVX2 shuffles, scalar
POPCNT), so the result is the same everywhere. numba's loop vectorizer cannot do this itself: it
keeps accumulators in memory and prefers 256-bit vectors on these CPUs.

`popcount_block_reference` is the plain-numpy twin used by the tests.

numba inlines this intrinsic into its callers, so the on-disk cache of a calling kernel is
stamped with this file's contents too (engine/jit.py).
"""
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

PIXELS = 8  # uint64 lanes in a 512-bit vector: one window word of 8 pixels
CHANNELS = 8


@intrinsic
def popcount_block(typingctx, windows, window_start, window_stride, weights, weight_start, length, scales,
                   scales_start, result, result_start, result_stride, accumulate):
    """result[result_start + o * result_stride + p] (+)= scales[scales_start + o] * sum_t popcount(
           windows[window_start + t * window_stride + p] & weights[weight_start + 8 t + o])   for o < 8, p < 8;
    "+=" when `accumulate` (a bool), "=" otherwise.

    windows, weights: 1-D contiguous uint64; window_start, window_stride, weight_start, length (>= 1),
    scales_start, result_start, result_stride: int64; scales, result: 1-D contiguous float64.
    Bounds are the caller's contract: nothing is checked.
    """
    u64_array = types.Array(types.uint64, 1, "C")
    f64_array = types.Array(types.float64, 1, "C")
    signature = types.void(u64_array, types.int64, types.int64, u64_array, types.int64, types.int64,
                           f64_array, types.int64, f64_array, types.int64, types.int64, types.boolean)

    def codegen(context, builder, sig, args):
        window_start, window_stride, weight_start, length = args[1], args[2], args[4], args[5]
        scales_start, result_start, result_stride, accumulate = args[7], args[9], args[10], args[11]
        i32, i64 = ir.IntType(32), ir.IntType(64)
        vector = ir.VectorType(i64, PIXELS)
        float_vector = ir.VectorType(ir.DoubleType(), PIXELS)
        ctpop = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector, [vector]),
                                               f"llvm.ctpop.v{PIXELS}i64")

        def data(index):
            return context.make_array(sig.args[index])(context, builder, args[index]).data

        def vector_at(pointer, offset, kind):
            return builder.bitcast(builder.gep(pointer, [offset]), kind.as_pointer())

        def splat(value, kind):
            one = builder.insert_element(ir.Constant(kind, ir.Undefined), value, ir.Constant(i32, 0))
            return builder.shuffle_vector(one, ir.Constant(kind, ir.Undefined),
                                          ir.Constant(ir.VectorType(i32, PIXELS), [0] * PIXELS))

        window_data = builder.gep(data(0), [window_start])
        weight_data = builder.gep(data(3), [weight_start])
        zero = ir.Constant(vector, [0] * PIXELS)

        entry = builder.block
        loop = builder.append_basic_block("popcount_block.loop")
        done = builder.append_basic_block("popcount_block.done")
        builder.branch(loop)
        builder.position_at_end(loop)
        t = builder.phi(i64)
        t.add_incoming(ir.Constant(i64, 0), entry)
        accumulators = []
        for _ in range(CHANNELS):
            accumulator = builder.phi(vector)
            accumulator.add_incoming(zero, entry)
            accumulators.append(accumulator)
        window_vector = builder.load(vector_at(window_data, builder.mul(t, window_stride), vector), align=8)
        row = builder.gep(weight_data, [builder.mul(t, ir.Constant(i64, CHANNELS))])
        updated = []
        for o, accumulator in enumerate(accumulators):
            word = splat(builder.load(builder.gep(row, [ir.Constant(i64, o)])), vector)
            updated.append(builder.add(accumulator, builder.call(ctpop, [builder.and_(window_vector, word)])))
        next_t = builder.add(t, ir.Constant(i64, 1))
        for accumulator, value in zip(accumulators, updated):
            accumulator.add_incoming(value, builder.block)
        t.add_incoming(next_t, builder.block)
        builder.cbranch(builder.icmp_signed("<", next_t, length), loop, done)

        builder.position_at_end(done)
        scales_data = builder.gep(data(6), [scales_start])
        result_data = builder.gep(data(8), [result_start])
        float_zero = ir.Constant(float_vector, [0.0] * PIXELS)
        for o, counts in enumerate(updated):
            scale = splat(builder.load(builder.gep(scales_data, [ir.Constant(i64, o)])), float_vector)
            product = builder.fmul(scale, builder.sitofp(counts, float_vector))
            pointer = vector_at(result_data, builder.mul(ir.Constant(i64, o), result_stride), float_vector)
            previous = builder.select(accumulate, builder.load(pointer, align=8), float_zero)
            builder.store(builder.fadd(previous, product), pointer, align=8)
        return context.get_dummy_value()

    return signature, codegen


def popcount_block_reference(windows, window_start, window_stride, weights, weight_start, length, scales,
                             scales_start, result, result_start, result_stride, accumulate):
    """Plain-numpy twin of `popcount_block` (same arguments, same effect on `result`)."""
    block = weights[weight_start:weight_start + CHANNELS * length].reshape(length, CHANNELS)
    for p in range(PIXELS):
        words = windows[window_start + p + window_stride * np.arange(length)]
        anded = words[:, None] & block
        bits = np.unpackbits(anded.astype("<u8").view(np.uint8).reshape(length, CHANNELS, 8), axis=-1)
        counts = bits.sum(axis=(0, 2)).astype(np.float64)
        target = result_start + np.arange(CHANNELS) * result_stride + p
        previous = result[target] if accumulate else 0.0
        result[target] = previous + scales[scales_start:scales_start + CHANNELS] * counts
