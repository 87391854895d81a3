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
channel-major in float64), and `popcount_direct_epilogue`, which keeps a tile pixel-major over its
(k, j) pairs and finishes it in registers after the last: residual, ReLU, the float32 output
(channel-major or channels-last) and the next layer's thermometer planes (16 bits per pixel).
Each has a `_reference` twin.

numba inlines these intrinsics into their callers, so the on-disk cache of a calling kernel is
stamped with this file's contents too (engine/jit.py).
"""
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .llvm_ir import I32, CodegenHelpers

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

# The 8 x 8 transpose of 8-lane vectors in three shuffle stages: pairs of rows interleave their
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
def popcount_direct_epilogue(typingctx, activations, bases, bases_start, shift, offsets, length, weights,
                             weight_start, scales, scales_start, partial, accumulate, finish, constant, lowest_weight,
                             slot_start, act_terms, act_start, relu, residual, has_residual, residual_start,
                             residual_channel_stride, residual_pixel_stride, y, write_y, y_start, y_channel_stride,
                             y_pixel_stride, valid_channels, valid_pixels, thresholds, threshold_stride,
                             n_thresholds, words, word_bases, plane_stride, block_offset):
    """The direct micro-kernel of `popcount_direct_block` (same first 10 arguments, same counts),
    kept pixel-major, for one (k, j) pair of a tile, with the tile's epilogue in registers after
    its last pair:

        product[p, o] = scales[scales_start + o] * counts[p, o]        for p < 8, o < 16
        total = partial[16 p + o] + product when `accumulate`, else product
        not `finish`: partial[16 p + o] = total (a tile's sum over the (k, j) pairs so far)
        `finish`: value = constant[s] + lowest_weight[s] * act_terms[act_start + p] + total
                  (+ float64 of residual[residual_start + o * residual_channel_stride + p *
                  residual_pixel_stride] when `has_residual`; then max(value, 0) when `relu`),
                  s = slot_start + o, in that order in float64, rounded to float32;
                  y[y_start + o * y_channel_stride + p * y_pixel_stride] = value when `write_y`;
                  each plane j < n_thresholds: the bits of value >= thresholds[j * threshold_stride
                  + s], the 16 of pixel p (channel o at bit o) stored at words[word_bases[bases_start
                  + p] + j * plane_stride + block_offset];
                  only for o < valid_channels and p < valid_pixels (the planes' bits: all 16
                  channels, their slots' thresholds are +inf past the valid ones).

    These are the operations, in order, of binary_conv_kernel's general epilogue: the same float32
    values and bits. y and residual are each either channels-last (channel stride 1: a pixel's 16
    channels are two 8-float vectors) or channel-major (pixel stride 1: a channel's 8 pixels are one
    vector, and 8 x 8 transposes of float32 vectors turn them to and from the pixel-major values).
    `partial`: float64 scratch of 128 values. `words`: the reader's planes as 1-D contiguous uint16
    (engine/bits.py layout: 16 channels from a multiple of 16 are one uint16, little-endian);
    word_bases: int64. `residual` and `y` may be any float32 array when unused (never read or
    written). Bounds are the caller's contract: y and residual hold the valid channels and pixels.
    """
    u64_array = types.Array(types.uint64, 1, "C")
    i64_array = types.Array(types.int64, 1, "C")
    f64_array = types.Array(types.float64, 1, "C")
    f32_array = types.Array(types.float32, 1, "C")
    i64, boolean = types.int64, types.boolean
    signature = types.void(u64_array, i64_array, i64, i64, i64_array, i64, u64_array, i64, f64_array, i64, f64_array,
                           boolean, boolean, f64_array, f64_array, i64, f64_array, i64, boolean,
                           f32_array, boolean, i64, i64, i64, f32_array, boolean, i64, i64, i64, i64, i64,
                           f32_array, i64, i64, types.Array(types.uint16, 1, "C"), i64_array, i64, i64)

    def codegen(context, builder, sig, args):
        accumulate, finish = args[11], args[12]
        helpers = CodegenHelpers(context, builder, sig, args)
        i64, _, float_vector, _ = _popcount_types(builder)
        products = _direct_products(helpers, _direct_counts(helpers))
        totals = {}
        for v in range(DIRECT_VECTORS):
            for p in range(DIRECT_PIXELS):
                pointer = helpers.vector_at(helpers.data(10), ir.Constant(i64, DIRECT_CHANNELS * p + PIXELS * v),
                                            float_vector)
                product = products[v][p]
                totals[p, v] = (pointer, builder.select(accumulate, builder.fadd(builder.load(pointer, align=8),
                                                                                 product), product))
        with builder.if_else(finish) as (then, otherwise):
            with otherwise:
                for pointer, total in totals.values():
                    builder.store(total, pointer, align=8)
            with then:
                _tile_epilogue(helpers, {key: total for key, (_, total) in totals.items()})
        return context.get_dummy_value()

    return signature, codegen


def _lane_counts(builder, valid_channels):
    """The valid lanes of each 8-channel vector of a tile: min(max(valid_channels - 8 v, 0), 8)."""
    i64 = ir.IntType(64)
    counts = []
    for v in range(DIRECT_VECTORS):
        left = builder.sub(valid_channels, ir.Constant(i64, PIXELS * v))
        left = builder.select(builder.icmp_signed("<", left, ir.Constant(i64, 0)), ir.Constant(i64, 0), left)
        counts.append(builder.select(builder.icmp_signed(">", left, ir.Constant(i64, PIXELS)),
                                     ir.Constant(i64, PIXELS), left))
    return counts


def _tile_slot(builder, tile, p, v):
    """Pointer to entry (p, v) of a tile's alloca of float32 vectors ([p * DIRECT_VECTORS + v])."""
    return builder.gep(tile, [ir.Constant(I32, 0), ir.Constant(I32, p * DIRECT_VECTORS + v)])


def _load_tile(helpers, tile, array, start, channel_stride, pixel_stride, valid_channels, valid_pixels):
    """Store into `tile` (an alloca of DIRECT_PIXELS * DIRECT_VECTORS float32 vectors, see
    `_tile_slot`) the float32 vector of channels 8v..8v+7 of pixel p of a tile at array[start + o *
    channel_stride + p * pixel_stride], channels-last when channel_stride is 1, else channel-major;
    0 in the lanes of invalid pixels and channels (nothing past the valid ones is read)."""
    builder = helpers.builder
    i64 = ir.IntType(64)
    single_vector = ir.VectorType(ir.FloatType(), PIXELS)
    data = helpers.data(array)
    zero = ir.Constant(single_vector, [0.0] * PIXELS)
    last_pixel = builder.sub(valid_pixels, ir.Constant(i64, 1))
    last_channel = builder.sub(valid_channels, ir.Constant(i64, 1))
    with builder.if_else(builder.icmp_signed("==", channel_stride, ir.Constant(i64, 1))) as (last, major):
        with last:
            counts = _lane_counts(builder, valid_channels)
            for p in range(DIRECT_PIXELS):
                valid = builder.icmp_signed("<", ir.Constant(i64, p), valid_pixels)
                row = builder.add(start, builder.mul(builder.select(valid, ir.Constant(i64, p), last_pixel),
                                                     pixel_stride))
                for v in range(DIRECT_VECTORS):
                    pointer = builder.gep(data, [builder.add(row, ir.Constant(i64, PIXELS * v))])
                    vector = helpers.load_lanes(pointer, single_vector, counts[v])
                    builder.store(builder.select(valid, vector, zero), _tile_slot(builder, tile, p, v))
        with major:
            for v in range(DIRECT_VECTORS):
                rows = []
                for lane in range(PIXELS):
                    o = ir.Constant(i64, PIXELS * v + lane)
                    valid = builder.icmp_signed("<", o, valid_channels)
                    pointer = builder.gep(data, [builder.add(start, builder.mul(builder.select(valid, o, last_channel),
                                                                                channel_stride))])
                    rows.append(builder.select(valid, helpers.load_lanes(pointer, single_vector, valid_pixels), zero))
                for p, column in enumerate(_transpose(builder, rows)):
                    builder.store(column, _tile_slot(builder, tile, p, v))


def _store_tile(helpers, values, array, start, channel_stride, pixel_stride, valid_channels, valid_pixels):
    """Store the tile's float32 values {(p, v): vector} at array[start + o * channel_stride + p *
    pixel_stride] for o < valid_channels, p < valid_pixels (the layouts of `_load_tile`)."""
    builder = helpers.builder
    i64 = ir.IntType(64)
    data = helpers.data(array)
    with builder.if_else(builder.icmp_signed("==", channel_stride, ir.Constant(i64, 1))) as (last, major):
        with last:
            counts = _lane_counts(builder, valid_channels)
            for p in range(DIRECT_PIXELS):
                with builder.if_then(builder.icmp_signed("<", ir.Constant(i64, p), valid_pixels)):
                    row = builder.add(start, builder.mul(ir.Constant(i64, p), pixel_stride))
                    for v in range(DIRECT_VECTORS):
                        pointer = builder.gep(data, [builder.add(row, ir.Constant(i64, PIXELS * v))])
                        helpers.store_lanes(f"pixel{p}.{v}", pointer, values[p, v], counts[v])
        with major:
            for v in range(DIRECT_VECTORS):
                columns = _transpose(builder, [values[p, v] for p in range(DIRECT_PIXELS)])
                for lane, column in enumerate(columns):
                    o = ir.Constant(i64, PIXELS * v + lane)
                    with builder.if_then(builder.icmp_signed("<", o, valid_channels)):
                        pointer = builder.gep(data, [builder.add(start, builder.mul(o, channel_stride))])
                        helpers.store_lanes(f"channel{PIXELS * v + lane}", pointer, column, valid_pixels)


def _tile_epilogue(helpers, totals):
    """`popcount_direct_epilogue`'s epilogue (its `finish` branch): totals {(p, v): float64 vector}."""
    builder, args, data, vector_at, splat = (helpers.builder, helpers.args, helpers.data, helpers.vector_at,
                                             helpers.splat)
    (slot_start, act_start, relu, has_residual, residual_start, residual_channel_stride, residual_pixel_stride,
     write_y, y_start, y_channel_stride, y_pixel_stride, valid_channels, valid_pixels, threshold_stride,
     n_thresholds, plane_stride, block_offset) = (args[15], args[17], args[18], args[20], args[21], args[22],
                                                  args[23], args[25], args[26], args[27], args[28], args[29],
                                                  args[30], args[32], args[33], args[36], args[37])
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
    shortcut_tile = cgutils.alloca_once(builder, ir.ArrayType(single_vector, DIRECT_PIXELS * DIRECT_VECTORS))
    with builder.if_then(has_residual):
        _load_tile(helpers, shortcut_tile, 19, residual_start, residual_channel_stride, residual_pixel_stride,
                   valid_channels, valid_pixels)
    values = {}
    for (p, v), total in totals.items():
        act = splat(builder.load(builder.gep(act_data, [ir.Constant(i64, p)])), float_vector)
        value = builder.fadd(builder.fadd(bases[v], builder.fmul(weights[v], act)), total)
        shortcut = builder.load(_tile_slot(builder, shortcut_tile, p, v))  # read, unused, without a residual
        value = builder.select(has_residual, builder.fadd(value, builder.fpext(shortcut, float_vector)), value)
        rectified = builder.select(builder.fcmp_ordered(">", value, float_zero), value, float_zero)
        values[p, v] = builder.fptrunc(builder.select(relu, rectified, value), single_vector)
    with builder.if_then(write_y):
        _store_tile(helpers, values, 24, y_start, y_channel_stride, y_pixel_stride, valid_channels, valid_pixels)
    word_bases = builder.gep(data(35), [args[2]])
    targets = [builder.add(builder.load(builder.gep(word_bases, [ir.Constant(i64, p)])), block_offset)
               for p in range(DIRECT_PIXELS)]
    words_data = data(34)

    def plane(j, _):
        first = builder.add(builder.mul(j, threshold_stride), slot_start)
        thresholds = [load(31, builder.add(first, ir.Constant(i64, PIXELS * v)), single_vector)
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

    with builder.if_then(builder.icmp_signed(">", n_thresholds, ir.Constant(i64, 0))):
        helpers.counted_loop("planes_epilogue", n_thresholds, [], plane)


def popcount_direct_epilogue_reference(activations, bases, bases_start, shift, offsets, length, weights,
                                       weight_start, scales, scales_start, partial, accumulate, finish, constant,
                                       lowest_weight, slot_start, act_terms, act_start, relu, residual, has_residual,
                                       residual_start, residual_channel_stride, residual_pixel_stride, y, write_y,
                                       y_start, y_channel_stride, y_pixel_stride, valid_channels, valid_pixels,
                                       thresholds, threshold_stride, n_thresholds, words, word_bases, plane_stride,
                                       block_offset):
    """Plain-numpy twin of `popcount_direct_epilogue` (same arguments, same effect on `partial`, `y`
    and `words`)."""
    result = np.zeros(DIRECT_CHANNELS * DIRECT_PIXELS)  # [o, p], channel-major as the block's twin
    popcount_direct_block_reference(activations, bases, bases_start, shift, offsets, length, weights, weight_start,
                                    scales, scales_start, result, 0, DIRECT_PIXELS, False)
    product = result.reshape(DIRECT_CHANNELS, DIRECT_PIXELS).T  # [p, o]
    total = partial.reshape(DIRECT_PIXELS, DIRECT_CHANNELS) + product if accumulate else product
    if not finish:
        partial[:] = total.ravel()
        return
    slots = slice(slot_start, slot_start + DIRECT_CHANNELS)
    value = (constant[None, slots] + lowest_weight[None, slots] * act_terms[act_start:act_start + DIRECT_PIXELS, None]
             ) + total
    channels, pixels = np.arange(valid_channels), np.arange(valid_pixels)
    if has_residual:  # 0 for the invalid pixels and channels, as the kernel reads them
        shortcut = np.zeros((DIRECT_PIXELS, DIRECT_CHANNELS))
        where = residual_start + channels[None, :] * residual_channel_stride + pixels[:, None] * residual_pixel_stride
        shortcut[:valid_pixels, :valid_channels] = residual[where]
        value = value + shortcut
    if relu:
        value = np.where(value > 0, value, 0.0)
    value = value.astype(np.float32)
    if write_y:
        y[y_start + channels[None, :] * y_channel_stride + pixels[:, None] * y_pixel_stride] = \
            value[:valid_pixels, :valid_channels]
    for j in range(n_thresholds):
        passed = value >= thresholds[j * threshold_stride + slot_start:j * threshold_stride + slot_start
                                     + DIRECT_CHANNELS][None, :]
        bits = (passed.astype(np.uint16) << np.arange(DIRECT_CHANNELS, dtype=np.uint16)).sum(axis=1,
                                                                                              dtype=np.uint16)
        for p in range(valid_pixels):
            words[word_bases[bases_start + p] + j * plane_stride + block_offset] = bits[p]
