"""The register-blocked AND-popcount micro-kernel, written in LLVM IR as a numba intrinsic.

    counts[p, o] = sum_{t < length} popcount(windows[p][t] & weights[t, o])   for p < 4, o < 16
    result[o][p] = scales[o] * counts[p, o] (+ result[o][p] when accumulating)  (float64)

Four pixels' activation words (`windows`, one run of `length` words per pixel) against sixteen
output channels' weight words (`weights`, interleaved: word t of channels o..o+15 are 16
consecutive uint64). The 4 x 16 accumulators stay in eight 512-bit vectors for the whole loop;
each step loads two weight vectors, broadcasts one word per pixel, and does eight AND + popcount
+ add. The exact integer counts are then converted to float64, multiplied by the per-channel
scales and stored in `result`, or added to it (a multiply then an add, no fused rounding),
channel-major: the 4 pixels of each channel are contiguous, so the caller's rows of output
channels need no transpose. On AVX-512 VPOPCNTDQ machines LLVM emits VPOPCNTQ on zmm registers; elsewhere it
legalizes the same IR to whatever the host has (AVX2 shuffles, scalar POPCNT), so the result is
the same everywhere. numba's loop vectorizer cannot do this itself: it keeps accumulators in
memory and prefers 256-bit vectors on these CPUs.

`popcount_block_reference` is the plain-numpy twin used by the tests.
"""
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

PIXELS = 4
CHANNELS = 16
_LANES = 8  # uint64 lanes in a 512-bit vector


@intrinsic
def popcount_block(typingctx, windows, window_starts, weights, weight_start, length, scales, scales_start, result,
                   result_start, result_stride, accumulate):
    """result[result_start + o * result_stride + p] (+)= scales[scales_start + o] * sum_t popcount(
           windows[window_starts[p] + t] & weights[weight_start + 16 t + o])     for p < 4, o < 16;
    "+=" when `accumulate` (a bool), "=" otherwise.

    windows, weights: 1-D contiguous uint64; window_starts: 1-D int64 of 4 starts; weight_start,
    length (>= 1), scales_start, result_start, result_stride: int64; scales, result: 1-D
    contiguous float64. Bounds are the caller's contract: nothing is checked.
    """
    u64_array = types.Array(types.uint64, 1, "C")
    f64_array = types.Array(types.float64, 1, "C")
    signature = types.void(u64_array, types.Array(types.int64, 1, "C"), u64_array, types.int64, types.int64,
                           f64_array, types.int64, f64_array, types.int64, types.int64, types.boolean)

    def codegen(context, builder, sig, args):
        weight_start, length, scales_start = args[3], args[4], args[6]
        result_start, result_stride, accumulate = args[8], args[9], args[10]
        i32, i64 = ir.IntType(32), ir.IntType(64)
        vector = ir.VectorType(i64, _LANES)
        float_vector = ir.VectorType(ir.DoubleType(), _LANES)
        pixel_vector = ir.VectorType(ir.DoubleType(), PIXELS)
        ctpop = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector, [vector]),
                                               f"llvm.ctpop.v{_LANES}i64")

        def data(index):
            return context.make_array(sig.args[index])(context, builder, args[index]).data

        def vector_at(pointer, offset, kind):
            return builder.bitcast(builder.gep(pointer, [offset]), kind.as_pointer())

        window_starts = [builder.load(builder.gep(data(1), [ir.Constant(i64, p)])) for p in range(PIXELS)]
        pixel_data = [builder.gep(data(0), [start]) for start in window_starts]
        weight_data = builder.gep(data(2), [weight_start])
        zero = ir.Constant(vector, [0] * _LANES)

        entry = builder.block
        loop = builder.append_basic_block("popcount_block.loop")
        done = builder.append_basic_block("popcount_block.done")
        builder.branch(loop)
        builder.position_at_end(loop)
        t = builder.phi(i64)
        t.add_incoming(ir.Constant(i64, 0), entry)
        halves = CHANNELS // _LANES
        accumulators = []
        for _ in range(PIXELS * halves):
            accumulator = builder.phi(vector)
            accumulator.add_incoming(zero, entry)
            accumulators.append(accumulator)
        row = builder.gep(weight_data, [builder.mul(t, ir.Constant(i64, CHANNELS))])
        weight_vectors = [builder.load(vector_at(row, ir.Constant(i64, half * _LANES), vector), align=8)
                          for half in range(halves)]
        updated = []
        for p in range(PIXELS):
            word = builder.load(builder.gep(pixel_data[p], [t]))
            splat = builder.insert_element(ir.Constant(vector, ir.Undefined), word, ir.Constant(i32, 0))
            splat = builder.shuffle_vector(splat, ir.Constant(vector, ir.Undefined),
                                           ir.Constant(ir.VectorType(i32, _LANES), [0] * _LANES))
            for half, weight_vector in enumerate(weight_vectors):
                accumulator = accumulators[p * halves + half]
                updated.append(builder.add(accumulator, builder.call(ctpop, [builder.and_(weight_vector, splat)])))
        next_t = builder.add(t, ir.Constant(i64, 1))
        for accumulator, value in zip(accumulators, updated):
            accumulator.add_incoming(value, builder.block)
        t.add_incoming(next_t, builder.block)
        builder.cbranch(builder.icmp_signed("<", next_t, length), loop, done)

        builder.position_at_end(done)
        scales_data = builder.gep(data(5), [scales_start])
        result_data = builder.gep(data(7), [result_start])
        pixel_zero = ir.Constant(pixel_vector, [0.0] * PIXELS)
        for half in range(halves):
            scale_vector = builder.load(vector_at(scales_data, ir.Constant(i64, half * _LANES), float_vector), align=8)
            products = [builder.fmul(scale_vector, builder.sitofp(updated[p * halves + half], float_vector))
                        for p in range(PIXELS)]
            for lane in range(_LANES):
                # The 4 pixels of one channel, gathered into one vector (LLVM turns this into shuffles).
                pixels = ir.Constant(pixel_vector, ir.Undefined)
                for p in range(PIXELS):
                    pixels = builder.insert_element(
                        pixels, builder.extract_element(products[p], ir.Constant(i32, lane)), ir.Constant(i32, p))
                offset = builder.mul(ir.Constant(i64, half * _LANES + lane), result_stride)
                pointer = vector_at(result_data, offset, pixel_vector)
                previous = builder.select(accumulate, builder.load(pointer, align=8), pixel_zero)
                builder.store(builder.fadd(previous, pixels), pointer, align=8)
        return context.get_dummy_value()

    return signature, codegen


def popcount_block_reference(windows, window_starts, weights, weight_start, length, scales, scales_start,
                             result, result_start, result_stride, accumulate):
    """Plain-numpy twin of `popcount_block` (same arguments, same effect on `result`)."""
    block = weights[weight_start:weight_start + CHANNELS * length].reshape(length, CHANNELS)
    for p in range(PIXELS):
        words = windows[window_starts[p]:window_starts[p] + length]
        anded = words[:, None] & block
        bits = np.unpackbits(anded.astype("<u8").view(np.uint8).reshape(length, CHANNELS, 8), axis=-1)
        counts = bits.sum(axis=(0, 2)).astype(np.float64)
        target = result_start + np.arange(CHANNELS) * result_stride + p
        previous = result[target] if accumulate else 0.0
        result[target] = previous + scales[scales_start:scales_start + CHANNELS] * counts
