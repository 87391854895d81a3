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

The direct binary convolution's micro-kernels (engine/ops/_binary_conv_kernel.py) follow: 8 output
pixels x 16 channels counted over a whole window read in place (`popcount_direct_block`, its sums
channel-major in float64), and two variants for a tile's last (k, j) pair that finish the output
in registers: `popcount_direct_planes` (an output that only feeds the next layer's thermometer
planes: pixel-major, 16 bits per pixel stored) and `popcount_direct_output` (a float32 output,
with residual, ReLU and optionally those planes). Each has a `_reference` twin.

numba inlines these intrinsics into their callers, so the on-disk cache of a calling kernel is
stamped with this file's contents too (engine/jit.py).
"""
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .llvm_ir import CodegenHelpers

PIXELS = 8  # uint64 lanes in a 512-bit vector: one window word of 8 pixels
CHANNELS = 8


def _popcount_types(builder):
    """(i64, <PIXELS x i64>, <PIXELS x double>, llvm.ctpop on <PIXELS x i64>) for a codegen."""
    i64 = ir.IntType(64)
    vector = ir.VectorType(i64, PIXELS)
    ctpop = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector, [vector]),
                                           f"llvm.ctpop.v{PIXELS}i64")
    return i64, vector, ir.VectorType(ir.DoubleType(), PIXELS), ctpop


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
        i64, vector, float_vector, ctpop = _popcount_types(builder)
        helpers = CodegenHelpers(context, builder, sig, args)
        data, vector_at, splat = helpers.data, helpers.vector_at, helpers.splat

        window_data = builder.gep(data(0), [window_start])
        weight_data = builder.gep(data(3), [weight_start])
        zero = ir.Constant(vector, [0] * PIXELS)

        def step(t, accumulators):
            window_vector = builder.load(vector_at(window_data, builder.mul(t, window_stride), vector), align=8)
            row = builder.gep(weight_data, [builder.mul(t, ir.Constant(i64, CHANNELS))])
            updated = []
            for o, accumulator in enumerate(accumulators):
                word = splat(builder.load(builder.gep(row, [ir.Constant(i64, o)])), vector)
                updated.append(builder.add(accumulator, builder.call(ctpop, [builder.and_(window_vector, word)])))
            return updated

        updated = helpers.counted_loop("popcount_block", length, [zero] * CHANNELS, step)
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


# ---- The direct-convolution micro-kernel ----------------------------------------------------

DIRECT_PIXELS = 8  # output pixels of one tile (broadcast activation words)
DIRECT_VECTORS = 2  # 512-bit vectors of 8 output channels
DIRECT_CHANNELS = PIXELS * DIRECT_VECTORS  # output channels of one tile: 8 x 16 = 16 accumulators

# The 8 x 8 transpose of float64 vectors in three shuffle stages: pairs of rows interleave their
# even and odd lanes, pairs of those their lane pairs, then halves.
_TRANSPOSE_STAGES = (
    (((0, 8, 2, 10, 4, 12, 6, 14), (1, 9, 3, 11, 5, 13, 7, 15)), 1),
    (((0, 1, 8, 9, 4, 5, 12, 13), (2, 3, 10, 11, 6, 7, 14, 15)), 2),
    (((0, 1, 2, 3, 8, 9, 10, 11), (4, 5, 6, 7, 12, 13, 14, 15)), 4),
)


def _transpose(builder, rows):
    """The 8 x 8 transpose of 8 vectors of 8 lanes (LLVM shuffles): columns[c][p] = rows[p][c]."""
    i32 = ir.IntType(32)
    vectors = list(rows)
    for masks, distance in _TRANSPOSE_STAGES:
        shuffled = [None] * 8
        for i in range(8):
            if i & distance:
                continue
            for half, mask in enumerate(masks):
                # Outputs (i, i + distance) hold the even / odd lane group of the pair.
                shuffled[i + half * distance] = builder.shuffle_vector(
                    vectors[i], vectors[i + distance], ir.Constant(ir.VectorType(i32, 8), list(mask)))
        vectors = shuffled
    return vectors


def _direct_counts(helpers):
    """The counting loop of the direct micro-kernels, whose first 8 arguments are (activations,
    bases, bases_start, shift, offsets, length, weights, weight_start): the 16 int64 accumulator
    vectors after the whole window, [p * DIRECT_VECTORS + v] holding pixel p's counts of channels
    8v..8v+7."""
    builder, args = helpers.builder, helpers.args
    bases_start, shift, length, weight_start = args[2], args[3], args[5], args[7]
    i64, vector, _, ctpop = _popcount_types(builder)
    data, vector_at, splat = helpers.data, helpers.vector_at, helpers.splat
    bases_data = builder.gep(data(1), [bases_start])
    pixel_data = [builder.gep(data(0), [builder.add(builder.load(builder.gep(bases_data, [ir.Constant(i64, p)])),
                                                    shift)]) for p in range(DIRECT_PIXELS)]
    offsets_data = data(4)
    weight_data = builder.gep(data(6), [weight_start])
    zero = ir.Constant(vector, [0] * PIXELS)

    def step(t, accumulators):
        offset = builder.load(builder.gep(offsets_data, [t]))
        row = builder.gep(weight_data, [builder.mul(t, ir.Constant(i64, DIRECT_CHANNELS))])
        weight_vectors = [builder.load(vector_at(row, ir.Constant(i64, PIXELS * v), vector), align=8)
                          for v in range(DIRECT_VECTORS)]
        updated = []
        for p in range(DIRECT_PIXELS):
            word = splat(builder.load(builder.gep(pixel_data[p], [offset])), vector)
            for v in range(DIRECT_VECTORS):
                accumulator = accumulators[p * DIRECT_VECTORS + v]
                updated.append(builder.add(accumulator, builder.call(ctpop, [builder.and_(word, weight_vectors[v])])))
        return updated

    return helpers.counted_loop("direct_counts", length, [zero] * (DIRECT_PIXELS * DIRECT_VECTORS), step)


def _direct_products(helpers, counts):
    """The counts of `_direct_counts` times their channels' scales (the direct micro-kernels'
    arguments 8 and 9: scales, scales_start), as float64: [v][p], pixel p's channels 8v..8v+7."""
    builder, args = helpers.builder, helpers.args
    i64, _, float_vector, _ = _popcount_types(builder)
    scales_data = builder.gep(helpers.data(8), [args[9]])
    products = []
    for v in range(DIRECT_VECTORS):
        scale = builder.load(helpers.vector_at(scales_data, ir.Constant(i64, PIXELS * v), float_vector), align=8)
        products.append([builder.fmul(scale, builder.sitofp(counts[p * DIRECT_VECTORS + v], float_vector))
                         for p in range(DIRECT_PIXELS)])
    return products


@intrinsic
def popcount_direct_block(typingctx, activations, bases, bases_start, shift, offsets, length, weights, weight_start,
                          scales, scales_start, result, result_start, result_stride, accumulate):
    """result[result_start + o * result_stride + p] (+)= scales[scales_start + o] * sum_t popcount(
           activations[bases[bases_start + p] + shift + offsets[t]] & weights[weight_start + 16 t + o])
    for p < 8 (pixels), o < 16 (channels); "+=" when `accumulate` (a bool), "=" otherwise.

    A direct convolution: `bases` holds where each of the 8 output pixels' windows start in the
    flattened activation planes, `offsets` where each of the `length` words of a window (kernel
    tap and channel word) lies from there, so the activations are read in place, at any stride,
    dilation or row crossing, with no gathered copy. Each step loads the step's 2 weight vectors
    (word t of 16 output channels, interleaved) and, per pixel, one activation word broadcast to
    all lanes (folded into the AND as an embedded broadcast on AVX-512): 16 AND + popcount + add
    into 16 int64 accumulator vectors (pixel p, channels 8v..8v+7) that stay in registers over
    the whole window. The exact counts are converted to float64 once per call and multiplied by
    the channel's scale, each 8 x 8 block is transposed in registers so that a channel's 8 pixels
    are contiguous (the channel-major layout of the epilogue), then stored in `result` or added
    to it (a multiply then an add, no fused rounding).

    activations, weights: 1-D contiguous uint64; bases, offsets: 1-D contiguous int64; length
    >= 1; scales, result: 1-D contiguous float64; the other arguments int64. Bounds are the
    caller's contract: nothing is checked.
    """
    u64_array = types.Array(types.uint64, 1, "C")
    i64_array = types.Array(types.int64, 1, "C")
    f64_array = types.Array(types.float64, 1, "C")
    signature = types.void(u64_array, i64_array, types.int64, types.int64, i64_array, types.int64, u64_array,
                           types.int64, f64_array, types.int64, f64_array, types.int64, types.int64, types.boolean)

    def codegen(context, builder, sig, args):
        result_start, result_stride, accumulate = args[11], args[12], args[13]
        i64, _, float_vector, _ = _popcount_types(builder)
        helpers = CodegenHelpers(context, builder, sig, args)
        data, vector_at = helpers.data, helpers.vector_at
        products = _direct_products(helpers, _direct_counts(helpers))
        result_data = builder.gep(data(10), [result_start])
        columns, pointers = [], []
        for v in range(DIRECT_VECTORS):
            columns.extend(_transpose(builder, products[v]))
            pointers.extend(vector_at(result_data, builder.mul(ir.Constant(i64, PIXELS * v + lane), result_stride),
                                      float_vector) for lane in range(PIXELS))
        # A branch, not a select: storing needs no load of what is overwritten.
        with builder.if_else(accumulate) as (then, otherwise):
            with then:
                for column, pointer in zip(columns, pointers):
                    builder.store(builder.fadd(builder.load(pointer, align=8), column), pointer, align=8)
            with otherwise:
                for column, pointer in zip(columns, pointers):
                    builder.store(column, pointer, align=8)
        return context.get_dummy_value()

    return signature, codegen


def popcount_direct_block_reference(activations, bases, bases_start, shift, offsets, length, weights, weight_start,
                                    scales, scales_start, result, result_start, result_stride, accumulate):
    """Plain-numpy twin of `popcount_direct_block` (same arguments, same effect on `result`)."""
    block = weights[weight_start:weight_start + DIRECT_CHANNELS * length].reshape(length, DIRECT_CHANNELS)
    for p in range(DIRECT_PIXELS):
        words = activations[bases[bases_start + p] + shift + offsets[:length]]
        anded = words[:, None] & block
        bits = np.unpackbits(anded.astype("<u8").view(np.uint8).reshape(length, DIRECT_CHANNELS, 8), axis=-1)
        counts = bits.sum(axis=(0, 2)).astype(np.float64)
        target = result_start + np.arange(DIRECT_CHANNELS) * result_stride + p
        products = scales[scales_start:scales_start + DIRECT_CHANNELS] * counts
        result[target] = result[target] + products if accumulate else products


@intrinsic
def popcount_direct_planes(typingctx, activations, bases, bases_start, shift, offsets, length, weights, weight_start,
                           scales, scales_start, partial, accumulate, finish, constant, lowest_weight, slot_start,
                           act_terms, act_start, relu, thresholds, threshold_stride, n_thresholds, words, word_bases,
                           plane_stride, block_offset, valid_pixels):
    """The direct micro-kernel of `popcount_direct_block` (same first 10 arguments, same counts),
    kept pixel-major, with the epilogue of an output that only feeds the next layer's bit-planes
    done in registers:

        product[p, o] = scales[scales_start + o] * counts[p, o]        for p < 8, o < 16
        total = partial[16 p + o] + product when `accumulate`, else product
        not `finish`: partial[16 p + o] = total (a tile's sum over the (k, j) pairs so far)
        `finish`: value = constant[s] + lowest_weight[s] * act_terms[act_start + p] + total
                  (s = slot_start + o; float64, in that order; max(value, 0) when `relu`), then for
                  each plane j < n_thresholds the bit of float32(value) >= thresholds[j *
                  threshold_stride + s]: the 16 bits of pixel p (channel o at bit o) go to
                  words[word_bases[bases_start + p] + j * plane_stride + block_offset], for the first
                  `valid_pixels` pixels only.

    These are the operations, in the same order, of binary_conv_kernel's epilogue, so the bits equal
    those it packs from its float32 output. `partial`: float64 scratch of 128 values. `words`: the
    reader's planes as 1-D contiguous uint16 (engine/bits.py layout: 16 channels from a multiple of
    16 are one uint16, little-endian); word_bases: int64. Bounds are the caller's contract.
    """
    u64_array = types.Array(types.uint64, 1, "C")
    i64_array = types.Array(types.int64, 1, "C")
    f64_array = types.Array(types.float64, 1, "C")
    f32_array = types.Array(types.float32, 1, "C")
    signature = types.void(u64_array, i64_array, types.int64, types.int64, i64_array, types.int64, u64_array,
                           types.int64, f64_array, types.int64, f64_array, types.boolean, types.boolean, f64_array,
                           f64_array, types.int64, f64_array, types.int64, types.boolean, f32_array, types.int64,
                           types.int64, types.Array(types.uint16, 1, "C"), i64_array, types.int64, types.int64,
                           types.int64)

    def codegen(context, builder, sig, args):
        accumulate, finish, slot_start, act_start, relu = args[11], args[12], args[15], args[17], args[18]
        threshold_stride, n_thresholds, plane_stride, block_offset, valid_pixels = args[20], args[21], args[24], \
            args[25], args[26]
        i64, _, float_vector, _ = _popcount_types(builder)
        helpers = CodegenHelpers(context, builder, sig, args)
        data, vector_at = helpers.data, helpers.vector_at
        counts = _direct_counts(helpers)

        products = _direct_products(helpers, counts)
        partial_data = data(10)
        totals = []
        for v in range(DIRECT_VECTORS):
            for p in range(DIRECT_PIXELS):
                pointer = vector_at(partial_data, ir.Constant(i64, DIRECT_CHANNELS * p + PIXELS * v), float_vector)
                product = products[v][p]
                totals.append((p, v, pointer, builder.select(accumulate, builder.fadd(builder.load(pointer, align=8),
                                                                                      product), product)))
        with builder.if_else(finish) as (then, otherwise):
            with otherwise:
                for _, _, pointer, total in totals:
                    builder.store(total, pointer, align=8)
            with then:
                _planes_epilogue(helpers, totals, slot_start, act_start, relu, threshold_stride, n_thresholds,
                                 plane_stride, block_offset, valid_pixels)
        return context.get_dummy_value()

    return signature, codegen


def _planes_epilogue(helpers, totals, slot_start, act_start, relu, threshold_stride, n_thresholds, plane_stride,
                     block_offset, valid_pixels):
    """`popcount_direct_planes`'s epilogue (its `finish` branch): totals [(p, v, _, float64 vector)]."""
    builder, data, vector_at, splat = helpers.builder, helpers.data, helpers.vector_at, helpers.splat
    i64, _, float_vector, _ = _popcount_types(builder)
    i8, i16 = ir.IntType(8), ir.IntType(16)
    single_vector = ir.VectorType(ir.FloatType(), PIXELS)

    def load(index, offset, kind):
        return builder.load(vector_at(data(index), offset, kind), align=4)

    slot_vectors = [builder.add(slot_start, ir.Constant(i64, PIXELS * v)) for v in range(DIRECT_VECTORS)]
    bases = [load(13, start, float_vector) for start in slot_vectors]
    weights = [load(14, start, float_vector) for start in slot_vectors]
    act_data = builder.gep(data(16), [act_start])
    float_zero = ir.Constant(float_vector, [0.0] * PIXELS)
    values = {}
    for p, v, _, total in totals:
        act = splat(builder.load(builder.gep(act_data, [ir.Constant(i64, p)])), float_vector)
        value = builder.fadd(builder.fadd(bases[v], builder.fmul(weights[v], act)), total)
        rectified = builder.select(builder.fcmp_ordered(">", value, float_zero), value, float_zero)
        values[p, v] = builder.fptrunc(builder.select(relu, rectified, value), single_vector)
    word_bases = builder.gep(data(23), [helpers.args[2]])
    targets = [builder.add(builder.load(builder.gep(word_bases, [ir.Constant(i64, p)])), block_offset)
               for p in range(DIRECT_PIXELS)]
    words_data = data(22)

    def plane(j, _):
        first = builder.add(builder.mul(j, threshold_stride), slot_start)
        thresholds = [load(19, builder.add(first, ir.Constant(i64, PIXELS * v)), single_vector)
                      for v in range(DIRECT_VECTORS)]
        shift = builder.mul(j, plane_stride)
        for p in range(DIRECT_PIXELS):
            halves = [builder.zext(builder.bitcast(builder.fcmp_ordered(">=", values[p, v], thresholds[v]), i8), i16)
                      for v in range(DIRECT_VECTORS)]
            bits = builder.or_(halves[0], builder.shl(halves[1], ir.Constant(i16, PIXELS)))
            pointer = builder.gep(words_data, [builder.add(targets[p], shift)])
            if p == 0:
                builder.store(bits, pointer, align=2)
                continue
            with builder.if_then(builder.icmp_signed("<", ir.Constant(i64, p), valid_pixels)):
                builder.store(bits, pointer, align=2)
        return []

    helpers.counted_loop("planes_epilogue", n_thresholds, [], plane)


def popcount_direct_planes_reference(activations, bases, bases_start, shift, offsets, length, weights, weight_start,
                                     scales, scales_start, partial, accumulate, finish, constant, lowest_weight,
                                     slot_start, act_terms, act_start, relu, thresholds, threshold_stride,
                                     n_thresholds, words, word_bases, plane_stride, block_offset, valid_pixels):
    """Plain-numpy twin of `popcount_direct_planes` (same arguments, same effect on `partial` and
    `words`)."""
    result = np.zeros(DIRECT_CHANNELS * DIRECT_PIXELS)  # [o, p], channel-major as the block's twin
    popcount_direct_block_reference(activations, bases, bases_start, shift, offsets, length, weights, weight_start,
                                    scales, scales_start, result, 0, DIRECT_PIXELS, False)
    product = result.reshape(DIRECT_CHANNELS, DIRECT_PIXELS).T  # [p, o]
    total = partial.reshape(DIRECT_PIXELS, DIRECT_CHANNELS) + product if accumulate else product
    if not finish:
        partial[:] = total.ravel()
        return
    slots = slice(slot_start, slot_start + DIRECT_CHANNELS)
    act = act_terms[act_start:act_start + DIRECT_PIXELS, None]
    value = (constant[None, slots] + lowest_weight[None, slots] * act) + total
    if relu:
        value = np.where(value > 0, value, 0.0)
    value = value.astype(np.float32)
    for j in range(n_thresholds):
        passed = value >= thresholds[j * threshold_stride + slot_start:j * threshold_stride + slot_start
                                     + DIRECT_CHANNELS][None, :]
        bits = (passed.astype(np.uint16) << np.arange(DIRECT_CHANNELS, dtype=np.uint16)).sum(axis=1,
                                                                                              dtype=np.uint16)
        for p in range(valid_pixels):
            words[word_bases[bases_start + p] + j * plane_stride + block_offset] = bits[p]


# The 8 x 8 bit transpose of a uint64 whose byte r holds row r (bit c of byte r at bit 8 r + c):
# three rounds of swapping bit pairs, 2 x 2 and 4 x 4 blocks (delta swaps).
_BIT_TRANSPOSE_ROUNDS = ((7, 0x00AA00AA00AA00AA), (14, 0x0000CCCC0000CCCC), (28, 0x00000000F0F0F0F0))


def _transpose_bits8(builder, value):
    """The 8 x 8 bit transpose of i64 `value` (byte r, bit c -> byte c, bit r)."""
    i64 = ir.IntType(64)
    for shift, mask in _BIT_TRANSPOSE_ROUNDS:
        distance = ir.Constant(i64, shift)
        swap = builder.and_(builder.xor(value, builder.lshr(value, distance)), ir.Constant(i64, mask))
        value = builder.xor(value, builder.xor(swap, builder.shl(swap, distance)))
    return value


@intrinsic
def popcount_direct_output(typingctx, activations, bases, bases_start, shift, offsets, length, weights, weight_start,
                           scales, scales_start, partial, accumulate, constant, lowest_weight, slot_start, act_terms,
                           act_start, relu, residual, has_residual, y, y_start, channel_stride, valid_channels,
                           valid_pixels, thresholds, threshold_stride, n_thresholds, words, word_bases, plane_stride,
                           block_offset):
    """The last (k, j) pair of a tile of `popcount_direct_block` (same first 10 arguments, same
    counts, products and transpose) with the float32 output's epilogue in registers, channel-major:

        total[o, p] = partial[8 o + p] + product when `accumulate` (the earlier pairs' sums, from
                      popcount_direct_block with result_stride 8), else product
        value = constant[s] + lowest_weight[s] * act_terms[act_start + p] + total (+ float64 of
                residual[y_start + o * channel_stride + p] when `has_residual`; then max(value, 0)
                when `relu`), s = slot_start + o, in that order in float64, rounded to float32;
        y[y_start + o * channel_stride + p] = value for o < valid_channels, p < valid_pixels;
        each plane j < n_thresholds: the bits of value >= thresholds[j * threshold_stride + s], the
                16 of pixel p (channel o at bit o) stored at words[word_bases[bases_start + p] + j *
                plane_stride + block_offset], p < valid_pixels.

    These are the operations, in order, of binary_conv_kernel's general epilogue: the same float32
    values and bits. A channel's 8 pixels are compared at once; an 8 x 8 bit transpose per 8
    channels gives each pixel's bits. `residual` may be `y` itself when not `has_residual` (read,
    never used). Bounds are the caller's contract: y and residual hold the valid channels' rows.
    """
    u64_array = types.Array(types.uint64, 1, "C")
    i64_array = types.Array(types.int64, 1, "C")
    f64_array = types.Array(types.float64, 1, "C")
    f32_array = types.Array(types.float32, 1, "C")
    signature = types.void(u64_array, i64_array, types.int64, types.int64, i64_array, types.int64, u64_array,
                           types.int64, f64_array, types.int64, f64_array, types.boolean, f64_array, f64_array,
                           types.int64, f64_array, types.int64, types.boolean, f32_array, types.boolean, f32_array,
                           types.int64, types.int64, types.int64, types.int64, f32_array, types.int64, types.int64,
                           types.Array(types.uint16, 1, "C"), i64_array, types.int64, types.int64)

    def codegen(context, builder, sig, args):
        (accumulate, slot_start, act_start, relu, has_residual, y_start, channel_stride, valid_channels,
         valid_pixels, threshold_stride, n_thresholds, plane_stride, block_offset) = (
            args[11], args[14], args[16], args[17], args[19], args[21], args[22], args[23], args[24], args[26],
            args[27], args[30], args[31])
        i64, _, float_vector, _ = _popcount_types(builder)
        i8, i16 = ir.IntType(8), ir.IntType(16)
        single_vector = ir.VectorType(ir.FloatType(), PIXELS)
        helpers = CodegenHelpers(context, builder, sig, args)
        data, vector_at, splat = helpers.data, helpers.vector_at, helpers.splat
        counts = _direct_counts(helpers)
        columns = []
        for products in _direct_products(helpers, counts):
            columns.extend(_transpose(builder, products))
        act = builder.load(vector_at(data(15), act_start, float_vector), align=8)
        float_zero = ir.Constant(float_vector, [0.0] * PIXELS)
        last_channel = builder.sub(valid_channels, ir.Constant(i64, 1))
        values = []
        for o, column in enumerate(columns):
            previous = builder.load(vector_at(data(10), ir.Constant(i64, PIXELS * o), float_vector), align=8)
            total = builder.select(accumulate, builder.fadd(previous, column), column)
            slot = builder.add(slot_start, ir.Constant(i64, o))
            base = splat(builder.load(builder.gep(data(12), [slot])), float_vector)
            weight = splat(builder.load(builder.gep(data(13), [slot])), float_vector)
            value = builder.fadd(builder.fadd(base, builder.fmul(weight, act)), total)
            # A padding slot reads the last valid channel's row (its value is never stored).
            channel = builder.select(builder.icmp_signed("<", ir.Constant(i64, o), valid_channels),
                                     ir.Constant(i64, o), last_channel)
            row = builder.add(y_start, builder.mul(channel, channel_stride))
            shortcut = builder.fpext(helpers.load_lanes(builder.gep(data(18), [row]), single_vector, valid_pixels),
                                     float_vector)
            value = builder.select(has_residual, builder.fadd(value, shortcut), value)
            rectified = builder.select(builder.fcmp_ordered(">", value, float_zero), value, float_zero)
            value = builder.fptrunc(builder.select(relu, rectified, value), single_vector)
            values.append(value)
            with builder.if_then(builder.icmp_signed("<", ir.Constant(i64, o), valid_channels)):
                helpers.store_lanes(f"output{o}", builder.gep(data(20), [row]), value, valid_pixels)
        word_bases = builder.gep(data(29), [args[2]])
        targets = [builder.add(builder.load(builder.gep(word_bases, [ir.Constant(i64, p)])), block_offset)
                   for p in range(DIRECT_PIXELS)]

        def plane(j, _):
            first = builder.add(builder.mul(j, threshold_stride), slot_start)
            halves = []
            for half in range(DIRECT_VECTORS):
                rows = ir.Constant(i64, 0)
                for lane in range(PIXELS):
                    o = half * PIXELS + lane
                    threshold = splat(builder.load(builder.gep(data(25), [builder.add(first, ir.Constant(i64, o))])),
                                      single_vector)
                    mask = builder.bitcast(builder.fcmp_ordered(">=", values[o], threshold), i8)
                    rows = builder.or_(rows, builder.shl(builder.zext(mask, i64), ir.Constant(i64, 8 * lane)))
                halves.append(_transpose_bits8(builder, rows))  # byte p: pixel p's bits of these 8 channels
            shift = builder.mul(j, plane_stride)
            for p in range(DIRECT_PIXELS):
                low = builder.trunc(builder.lshr(halves[0], ir.Constant(i64, 8 * p)), i8)
                high = builder.trunc(builder.lshr(halves[1], ir.Constant(i64, 8 * p)), i8)
                bits = builder.or_(builder.zext(low, i16), builder.shl(builder.zext(high, i16), ir.Constant(i16, 8)))
                with builder.if_then(builder.icmp_signed("<", ir.Constant(i64, p), valid_pixels)):
                    builder.store(bits, builder.gep(data(28), [builder.add(targets[p], shift)]), align=2)
            return []

        with builder.if_then(builder.icmp_signed(">", n_thresholds, ir.Constant(i64, 0))):
            helpers.counted_loop("output_planes", n_thresholds, [], plane)
        return context.get_dummy_value()

    return signature, codegen


def popcount_direct_output_reference(activations, bases, bases_start, shift, offsets, length, weights, weight_start,
                                     scales, scales_start, partial, accumulate, constant, lowest_weight, slot_start,
                                     act_terms, act_start, relu, residual, has_residual, y, y_start, channel_stride,
                                     valid_channels, valid_pixels, thresholds, threshold_stride, n_thresholds, words,
                                     word_bases, plane_stride, block_offset):
    """Plain-numpy twin of `popcount_direct_output` (same arguments, same effect on y and words)."""
    total = np.array(partial[:DIRECT_CHANNELS * DIRECT_PIXELS]) if accumulate else \
        np.zeros(DIRECT_CHANNELS * DIRECT_PIXELS)
    popcount_direct_block_reference(activations, bases, bases_start, shift, offsets, length, weights, weight_start,
                                    scales, scales_start, total, 0, DIRECT_PIXELS, accumulate)
    total = total.reshape(DIRECT_CHANNELS, DIRECT_PIXELS)
    slots = slice(slot_start, slot_start + DIRECT_CHANNELS)
    value = (constant[slots, None] + lowest_weight[slots, None] * act_terms[None, act_start:act_start + DIRECT_PIXELS]
             ) + total
    rows = y_start + np.minimum(np.arange(DIRECT_CHANNELS), valid_channels - 1)[:, None] * channel_stride \
        + np.arange(DIRECT_PIXELS)[None, :]
    if has_residual:
        value = value + np.where(np.arange(DIRECT_PIXELS)[None, :] < valid_pixels,
                                 residual[np.minimum(rows, len(residual) - 1)], 0).astype(np.float64)
    if relu:
        value = np.where(value > 0, value, 0.0)
    value = value.astype(np.float32)
    for o in range(valid_channels):
        y[rows[o, :valid_pixels]] = value[o, :valid_pixels]
    for j in range(n_thresholds):
        passed = value >= thresholds[j * threshold_stride + slot_start:j * threshold_stride + slot_start
                                     + DIRECT_CHANNELS][:, None]
        bits = (passed.astype(np.uint16) << np.arange(DIRECT_CHANNELS, dtype=np.uint16)[:, None]).sum(axis=0,
                                                                                                     dtype=np.uint16)
        for p in range(valid_pixels):
            words[word_bases[bases_start + p] + j * plane_stride + block_offset] = bits[p]
