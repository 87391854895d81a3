"""The register-blocked AND-popcount micro-kernel, written in LLVM IR as a numba intrinsic.

    counts[p, o] = sum_{t < length} popcount(windows[p][t] & weights[t, o])   for p < 4, o < 16

Four pixels' activation words (`windows`, one run of `length` words per pixel) against sixteen
output channels' weight words (`weights`, interleaved: word t of channels o..o+15 are 16
consecutive uint64). The 4 x 16 accumulators stay in eight 512-bit vectors for the whole loop;
each step loads two weight vectors, broadcasts one word per pixel, and does eight AND + popcount
+ add. On AVX-512 VPOPCNTDQ machines LLVM emits VPOPCNTQ on zmm registers; elsewhere it
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
def popcount_block(typingctx, windows, window_starts, weights, weight_start, length, counts, counts_start):
    """counts[counts_start + 16 p + o] = sum_t popcount(windows[window_starts[p] + t] & weights[weight_start + 16 t + o]).

    windows, weights: 1-D contiguous uint64 arrays; window_starts: 1-D int64 array of 4 starts;
    weight_start, length (>= 1), counts_start: int64; counts: 1-D contiguous int64 array.
    Bounds are the caller's contract: nothing is checked.
    """
    u64_array = types.Array(types.uint64, 1, "C")
    signature = types.void(u64_array, types.Array(types.int64, 1, "C"), u64_array, types.int64, types.int64,
                           types.Array(types.int64, 1, "C"), types.int64)

    def codegen(context, builder, sig, args):
        windows_value, starts_value, weights_value, weight_start, length, counts_value, counts_start = args
        i64 = ir.IntType(64)
        vector = ir.VectorType(i64, _LANES)
        ctpop = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector, [vector]),
                                               f"llvm.ctpop.v{_LANES}i64")

        def data(value, index):
            return context.make_array(sig.args[index])(context, builder, value).data

        windows_data, starts_data, weights_data, counts_data = (data(v, i) for v, i in (
            (windows_value, 0), (starts_value, 1), (weights_value, 2), (counts_value, 5)))
        pixel_data = [builder.gep(windows_data, [builder.load(builder.gep(starts_data, [ir.Constant(i64, p)]))])
                      for p in range(PIXELS)]
        weight_data = builder.gep(weights_data, [weight_start])
        zero = ir.Constant(vector, [0] * _LANES)
        vector_pointer = vector.as_pointer()

        entry = builder.block
        loop = builder.append_basic_block("popcount_block.loop")
        done = builder.append_basic_block("popcount_block.done")
        builder.branch(loop)
        builder.position_at_end(loop)
        t = builder.phi(i64)
        t.add_incoming(ir.Constant(i64, 0), entry)
        accumulators = []
        for _ in range(PIXELS * CHANNELS // _LANES):
            accumulator = builder.phi(vector)
            accumulator.add_incoming(zero, entry)
            accumulators.append(accumulator)
        row = builder.gep(weight_data, [builder.mul(t, ir.Constant(i64, CHANNELS))])
        weight_vectors = [builder.load(builder.bitcast(builder.gep(row, [ir.Constant(i64, half * _LANES)]),
                                                       vector_pointer), align=8)
                          for half in range(CHANNELS // _LANES)]
        updated = []
        for p in range(PIXELS):
            word = builder.load(builder.gep(pixel_data[p], [t]))
            splat = builder.insert_element(ir.Constant(vector, ir.Undefined), word, ir.Constant(ir.IntType(32), 0))
            splat = builder.shuffle_vector(splat, ir.Constant(vector, ir.Undefined),
                                           ir.Constant(ir.VectorType(ir.IntType(32), _LANES), [0] * _LANES))
            for half, weight_vector in enumerate(weight_vectors):
                accumulator = accumulators[p * len(weight_vectors) + half]
                updated.append(builder.add(accumulator, builder.call(ctpop, [builder.and_(weight_vector, splat)])))
        next_t = builder.add(t, ir.Constant(i64, 1))
        for accumulator, value in zip(accumulators, updated):
            accumulator.add_incoming(value, builder.block)
        t.add_incoming(next_t, builder.block)
        builder.cbranch(builder.icmp_signed("<", next_t, length), loop, done)
        builder.position_at_end(done)
        counts_data = builder.gep(counts_data, [counts_start])
        for index, value in enumerate(updated):
            target = builder.gep(counts_data, [ir.Constant(i64, index * _LANES)])
            builder.store(value, builder.bitcast(target, vector_pointer), align=8)
        return context.get_dummy_value()

    return signature, codegen


def popcount_block_reference(windows, window_starts, weights, weight_start, length, counts, counts_start):
    """Plain-numpy twin of `popcount_block` (same arguments, same result in `counts`)."""
    counts = counts[counts_start:]
    block = weights[weight_start:weight_start + CHANNELS * length].reshape(length, CHANNELS)
    for p in range(PIXELS):
        words = windows[window_starts[p]:window_starts[p] + length]
        anded = words[:, None] & block
        bits = np.unpackbits(anded.astype("<u8").view(np.uint8).reshape(length, CHANNELS, 8), axis=-1)
        counts[p * CHANNELS:(p + 1) * CHANNELS] = bits.sum(axis=(0, 2))


