"""Direct float convolution for convs with few input channels (ResNet's 7x7/2 stem, 3 -> 64):

    y[b, o, oy, ox] = bias[o] + sum_{c, ky, kx} w[o, c, ky, kx] * x_padded[b, c, oy * sh + ky * dh, ox * sw + kx * dw]

No im2col matrix: the input is split by stride phase once per sample (`conv.stride_phases`), so
that tap (c, ky, kx) of 16 consecutive output pixels of a row is 16 consecutive floats, at a
fixed offset from the output pixel's own (`tap_offsets`). The micro-kernel `conv_block` is
written in LLVM IR (as engine/popcount_block.py is): a block of 8 output channels x up to 3
vectors of 16 pixels of one output row, 24 accumulators of <16 x float> that stay in registers
while it walks all C * kh * kw taps; each tap loads the pixels' vectors once, broadcasts the 8
channels' weights (packed [channel block, tap, 8], contiguous) and does fused multiply-adds
(`llvm.fma`): 24 FMAs for 3 vector loads and 8 broadcasts, so the two FMA ports, not the loads
(most of the pixel loads straddle two cache lines), set the pace. On the stem's 112-pixel rows
(7 vectors: calls of 2 + 2 + 3) 8 x 3 ran 10% faster than 4 x 6 (4 + 3) and 6 x 4, and as fast
as 8 x 2. The bias is the accumulators' start and the ReLU (when fused and no residual
follows) is applied before the store, so each output is written once. numba's own loop
vectorizer keeps such accumulators in memory, which halves the rate.

Rows are spread over threads (`prange` over output rows); each output value is computed by the
same sequence of operations at any thread count, so results do not depend on it. The sum runs in
float32 with one rounding per tap (fused multiply-add): within FLOAT32_RTOL of the float64
reference, like the BLAS path.

LLVM legalizes the same IR where AVX-512 is missing (split vectors; `llvm.fma` as AVX2 FMAs or a
scalar `fma`), so the results are the same on any x86 (tested with NUMBA_CPU_NAME=generic).

Grouped convs run here as well, each group's blocks over its own taps; a depthwise conv (one
output channel per group) through `conv_row`, a one-channel variant of the micro-kernel, since
conv_block would compute 8 channels for each one kept. On outputs narrower than a vector the rows
of the stride phases are laid end to end (conv.VIRTUAL_ROW). Where this replaced im2col with one
small GEMM per group, depthwise 3x3 convs ran 5-10x faster (docs/benchmarks.md).

1x1 convs (one group) run here too, with no row structure: `pointwise_conv` walks each channel's
pixels end to end in the same blocks (where im2col + GEMM copied the input twice and shared a
sample's few chunks among Python threads: 1.2-2x slower at 1 thread, and slower still at 2).

Which convs run here is `conv.uses_direct` and `conv.uses_pointwise` (measured with
benchmarks/float_conv.py).
"""
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..jit import parallel_jit
from ..llvm_ir import CodegenHelpers

LANES = 16  # float32 lanes of a 512-bit vector
CHANNELS_PER_BLOCK = 8
MAX_VECTORS = 3  # 8 x 3 accumulators: 24 of the 32 vector registers


def _conv_block_intrinsic(rows, max_vectors, name, doc):
    """A numba intrinsic of the register-blocked direct-conv micro-kernel with `rows` output
    channels x up to `max_vectors` vectors of 16 pixels per call (see `conv_block`)."""

    def typing(typingctx, source, source_start, tap_offsets, taps, weights, weight_start, bias, bias_start, out,
               out_start, out_channel_stride, vectors, last_lanes, channels, relu):
        f32_array = types.Array(types.float32, 1, "C")
        i64_array = types.Array(types.int64, 1, "C")
        signature = types.void(f32_array, types.int64, i64_array, types.int64, f32_array, types.int64, f32_array,
                               types.int64, f32_array, types.int64, types.int64, types.int64, types.int64, types.int64,
                               types.boolean)
        return signature, _conv_block_codegen(rows, max_vectors)

    typing.__name__ = typing.__qualname__ = name
    typing.__doc__ = doc
    return intrinsic(typing)


def _conv_block_codegen(rows, max_vectors):
    def codegen(context, builder, sig, args):
        (_, source_start, _, taps, _, weight_start, _, bias_start, _, out_start, out_channel_stride, vectors,
         last_lanes, channels, relu) = args
        i64, f32 = ir.IntType(64), ir.FloatType()
        vector = ir.VectorType(f32, LANES)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector, [vector] * 3),
                                             f"llvm.fma.v{LANES}f32")

        helpers = CodegenHelpers(context, builder, sig, args)
        data = helpers.data

        def constant(value):
            return ir.Constant(i64, value)

        def splat(value):
            return helpers.splat(value, vector)

        def vector_at(pointer, offset):
            return helpers.vector_at(pointer, offset, vector)

        source_data = builder.gep(data(0), [source_start])
        offsets_data = data(2)
        weight_data = builder.gep(data(4), [weight_start])
        bias_data = builder.gep(data(6), [bias_start])
        out_data = builder.gep(data(8), [out_start])
        zero = ir.Constant(vector, [0.0] * LANES)
        starts = [splat(builder.load(builder.gep(bias_data, [constant(r)]))) for r in range(rows)]

        def step(t, count, accumulators):
            tap_source = builder.gep(source_data, [builder.load(builder.gep(offsets_data, [t]))])
            pixels = [builder.load(vector_at(tap_source, constant(LANES * v)), align=4) for v in range(count)]
            tap_weights = builder.gep(weight_data, [builder.mul(t, constant(CHANNELS_PER_BLOCK))])
            updated = []
            for r in range(rows):
                weight = splat(builder.load(builder.gep(tap_weights, [constant(r)])))
                updated.append([builder.call(fma, [weight, pixels[v], accumulators[r][v]]) for v in range(count)])
            return updated

        def store_row(count, r, values):
            row_out = builder.gep(out_data, [builder.mul(constant(r), out_channel_stride)])
            for v, value in enumerate(values):
                value = builder.select(relu, builder.select(builder.fcmp_ordered("<", value, zero), zero, value),
                                       value)
                if v < count - 1:
                    builder.store(value, vector_at(row_out, constant(LANES * v)), align=4)
                else:  # the row's last vector: whole, or its first last_lanes lanes
                    helpers.store_lanes(f"conv_block.last{count}.{r}", builder.gep(row_out, [constant(LANES * v)]),
                                        value, last_lanes)

        # channel 0 always exists; the others only when `channels` says so
        helpers.rows_by_vectors("conv_block", vectors, max_vectors, taps, starts, step, store_row, channels)
        return context.get_dummy_value()

    return codegen


conv_block = _conv_block_intrinsic(CHANNELS_PER_BLOCK, MAX_VECTORS, "conv_block", """\
    For r < channels, v < vectors, lane < 16 (lane < last_lanes in the last vector):

        out[out_start + r * out_channel_stride + 16 v + lane] = act(bias[bias_start + r]
            + sum_{t < taps} weights[weight_start + 8 t + r] * source[source_start + tap_offsets[t] + 16 v + lane])

    with act = max(., 0) when `relu`, else the identity; the sum in float32 with a fused
    multiply-add per tap, in tap order. source, weights, bias, out: 1-D contiguous float32;
    tap_offsets: 1-D contiguous int64; the other arguments int64 (1 <= vectors <= MAX_VECTORS,
    1 <= last_lanes <= 16, 1 <= channels <= 8, taps >= 1) but relu (bool). Every lane's source is
    read, stored or not. Bounds are the caller's contract: nothing is checked.""")

# One output channel per call (a depthwise conv's): its row in up to ROW_VECTORS vectors.
ROW_VECTORS = 4
conv_row = _conv_block_intrinsic(1, ROW_VECTORS, "conv_row", """\
    `conv_block` for one output channel (channels = 1; r = 0 only) and 1 <= vectors <= ROW_VECTORS:
    each tap one broadcast weight and `vectors` fused multiply-adds, where conv_block would compute
    all 8 of its channels.""")


def pack_weights(weight, group=1):
    """weight [O, C/group, kh, kw] -> 1-D float32 [group * blocks * C/group * kh * kw * 8], blocks of
    8 output channels per group: block j of group g, tap t, channel r holds
    weight[g * O/group + 8 j + r].reshape(-1)[t] (zero for channels past the group's)."""
    out_channels = weight.shape[0]
    group_out = out_channels // group
    blocks = -(-group_out // CHANNELS_PER_BLOCK)
    taps = int(np.prod(weight.shape[1:]))
    padded = np.zeros((group, blocks * CHANNELS_PER_BLOCK, taps), np.float32)
    padded[:, :group_out] = weight.reshape(group, group_out, taps)
    return np.ascontiguousarray(padded.reshape(group * blocks, CHANNELS_PER_BLOCK, taps).transpose(0, 2, 1)).ravel()


def tap_offsets(phases_shape, kernel_hw, strides, dilations):
    """int64 [C * kh * kw]: the offset, in a flattened sample of stride phases [sh, sw, C, rows,
    columns] (`conv.stride_phases`), of tap (c, ky, kx) of output pixel (0, 0); output pixel
    (oy, ox) adds oy * columns + ox."""
    stride_h, stride_w, channels, rows, columns = phases_shape
    (kh, kw), (sh, sw), (dh, dw) = kernel_hw, strides, dilations
    offsets = np.empty((channels, kh, kw), np.int64)
    for c in range(channels):
        for ky in range(kh):
            for kx in range(kw):
                phase = (ky * dh % sh) * stride_w + kx * dw % sw
                offsets[c, ky, kx] = ((phase * channels + c) * rows + ky * dh // sh) * columns + kx * dw // sw
    return offsets.ravel()


@parallel_jit
def direct_conv(source, sample, offsets, weights, bias, out, batch, out_channels, out_h, out_w, columns, relu, group):
    """out[((b * O + o) * out_h + oy) * out_w + ox] = act(bias[o] + sum_t weights[(g * blocks + j) *
    8 * taps + 8 t + r] * source[b * sample + offsets[g * taps + t] + oy * columns + ox]) for
    b < batch, o = g * O/group + 8 j + r (group g, its block j, taps = C/group * kh * kw): `source`
    the flattened stride phases of the batch, `sample` floats per sample, with at least 15 floats
    after the last one any output reads (the last vector of a row reads whole), `offsets` the
    `tap_offsets` of all C input channels (group g's taps are consecutive), `weights` from
    pack_weights(weight, group), `bias` [O + 8] (each block reads 8). The (sample, output row)
    pairs are spread over threads; a depthwise conv (one output channel per group) runs
    `conv_row`, one channel per micro-kernel call."""
    taps = offsets.shape[0] // group
    group_out = out_channels // group
    blocks = -(-group_out // CHANNELS_PER_BLOCK)
    row_vectors = -(-out_w // LANES)
    # the row's vectors split as evenly as calls allow (7 = 2 + 2 + 3, not 3 + 3 + 1)
    calls = -(-row_vectors // (ROW_VECTORS if group_out == 1 else MAX_VECTORS))
    plane = out_h * out_w
    for row in prange(batch * out_h):
        b, oy = row // out_h, row % out_h
        row_source, row_out = b * sample + oy * columns, b * out_channels * plane + oy * out_w
        for g in range(group):
            group_offsets = offsets[g * taps:(g + 1) * taps]
            for block in range(blocks):
                first_channel = g * group_out + block * CHANNELS_PER_BLOCK
                channels = min(CHANNELS_PER_BLOCK, group_out - block * CHANNELS_PER_BLOCK)
                weight_start = (g * blocks + block) * CHANNELS_PER_BLOCK * taps
                for call in range(calls):
                    first_vector = (row_vectors * call) // calls
                    vectors = (row_vectors * (call + 1)) // calls - first_vector
                    first_pixel = first_vector * LANES
                    last_lanes = min(LANES, out_w - (first_vector + vectors - 1) * LANES)
                    start = row_out + first_channel * plane + first_pixel
                    if group_out == 1:
                        conv_row(source, row_source + first_pixel, group_offsets, taps, weights, weight_start, bias,
                                 first_channel, out, start, plane, vectors, last_lanes, 1, relu)
                    else:
                        conv_block(source, row_source + first_pixel, group_offsets, taps, weights, weight_start,
                                   bias, first_channel, out, start, plane, vectors, last_lanes, channels, relu)


# pointwise_conv's work items: up to POINTWISE_BLOCKS blocks of 8 output channels over a range of
# 48-pixel chunks whose input (C x pixels float32) fits POINTWISE_INPUT_BYTES (it stays in L2 while
# the item's blocks walk it; a block's weights stay in L1 over the chunks), the ranges narrowed until
# a sample has at least POINTWISE_ITEMS items for the threads to share. The items depend on the
# shapes only.
POINTWISE_BLOCKS = 8
POINTWISE_INPUT_BYTES = 512 * 1024
POINTWISE_ITEMS = 8


@parallel_jit
def pointwise_conv(source, sample, offsets, weights, bias, out, batch, out_channels, pixels, relu):
    """A 1x1 conv as `direct_conv` with each sample's output rows laid end to end:
    out[(b * O + o) * pixels + p] = act(bias[o] + sum_t weights[(o // 8) * 8 * taps + 8 t + o % 8] *
    source[b * sample + offsets[t] + p]) for p < pixels, each 8-channel block computed over chunks
    of 48 pixels (3 vectors; the last chunk shorter) by `conv_block`. `source`: the flattened stride
    phases of a 1x1 conv (channel c's pixels contiguous from offsets[t]) with at least 15 floats
    after the last one read. Work items: see POINTWISE_BLOCKS, for every sample; each output's sum
    is the same at any thread count."""
    taps = offsets.shape[0]
    chunk_pixels = LANES * MAX_VECTORS
    blocks = -(-out_channels // CHANNELS_PER_BLOCK)
    chunks = -(-pixels // chunk_pixels)
    block_groups = -(-blocks // POINTWISE_BLOCKS)
    fitting = max(1, POINTWISE_INPUT_BYTES // (4 * taps * chunk_pixels))  # chunks whose input fits
    ranges = min(chunks, max(-(-chunks // fitting), -(-POINTWISE_ITEMS // block_groups)))
    range_chunks = -(-chunks // ranges)
    ranges = -(-chunks // range_chunks)
    items = ranges * block_groups
    for item in prange(batch * items):
        b, within = item // items, item % items
        first_chunk = (within // block_groups) * range_chunks
        first_block = (within % block_groups) * POINTWISE_BLOCKS
        for block in range(first_block, min(blocks, first_block + POINTWISE_BLOCKS)):
            channels = min(CHANNELS_PER_BLOCK, out_channels - block * CHANNELS_PER_BLOCK)
            for chunk in range(first_chunk, min(chunks, first_chunk + range_chunks)):
                first_pixel = chunk * chunk_pixels
                count = min(chunk_pixels, pixels - first_pixel)
                vectors = -(-count // LANES)
                conv_block(source, b * sample + first_pixel, offsets, taps, weights, block * CHANNELS_PER_BLOCK * taps,
                           bias, block * CHANNELS_PER_BLOCK, out,
                           (b * out_channels + block * CHANNELS_PER_BLOCK) * pixels + first_pixel, pixels, vectors,
                           count - (vectors - 1) * LANES, channels, relu)


def direct_conv_reference(x, weight, bias, strides, pads, dilations):
    """Plain-numpy twin: the same sum, one tap at a time over the zero-padded input, in float64.
    x [B, C, H, W], weight [O, C, kh, kw], bias [O] -> [B, O, out_h, out_w] float64."""
    top, left, bottom, right = pads
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    kh, kw = weight.shape[2:]
    (sh, sw), (dh, dw) = strides, dilations
    out_h = (padded.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (padded.shape[3] - dw * (kw - 1) - 1) // sw + 1
    y = np.zeros((x.shape[0], weight.shape[0], out_h, out_w)) + bias.astype(np.float64)[None, :, None, None]
    for ky in range(kh):
        for kx in range(kw):
            tap = padded[:, :, ky * dh:ky * dh + sh * (out_h - 1) + 1:sh, kx * dw:kx * dw + sw * (out_w - 1) + 1:sw]
            y += np.einsum("bchw,oc->bohw", tap, weight[:, :, ky, kx].astype(np.float64))
    return y
