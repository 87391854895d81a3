"""Direct integer convolution of IntConv (engine/ops/int_conv.py): uint8 input x int8 weights,
int32 sums in registers, the float64 rescale and the epilogue before the one store.

    y[b, o, oy, ox] = act(float32((sum_t w[o, t] * q[b, t(oy, ox)] - zero_point * sum_t w[o, t])
                                  * factor[o] + bias[o] + residual[b, o, oy, ox]))

with q the padded uint8 input (the zero point in the padding), t over the taps (c, ky, kx) of o's
group, the products and sums exact in int32 (|sum| <= 255 * 128 * taps < 2^31, int_conv.MAX_TAPS)
and the rescale in float64 with one rounding to float32, as int_conv's reference does.

Quads. VPDPBUSD (AVX-512 VNNI) multiplies 4 unsigned bytes by 4 signed bytes per int32 lane and
adds the 4 products to the lane: 64 multiply-adds per instruction, exact (no saturation). So the
input is laid out once per call as a quad image: 4 bytes per pixel, the inputs of 4 taps that share
their output pixel's offset, so that 16 consecutive output pixels of a row read 64 consecutive
bytes for each step of 4 taps. Two ways to make the quads, chosen per layer (`plan_steps`, fewer
steps wins):

- "channels": bytes k = 0..3 of quad plane u hold input channels 4u + k of the group (no waste
  when C/group is a multiple of 4: a 3x3 64-channel conv takes 16 * 9 = 144 steps for 576 taps);
- "rows": bytes k of plane c hold channel c at phase rows i, i + d, i + 2d, i + 3d
  (d = dh / gcd(sh, dh)), i.e. kernel rows ky, ky + s, ky + 2s, ky + 3s (s = sh / gcd(sh, dh)) that
  land on the same stride phase: for the 7x7/2 stem (3 channels) 3 * 7 * (1 + 1) = 42 steps for
  147 taps, where channel quads would take 49.

Either way the image is split by stride phase (as conv.stride_phases splits the float input), so
that a step of 16 pixels is one contiguous run at a fixed offset (`plan_steps`' offsets) from the
output pixel's own. Bytes that no tap reads (channels past C/group, rows past a kernel row class)
meet zero weights.

The micro-kernel `quad_conv_block` (LLVM IR, as engine/ops/conv_direct.py's float `conv_block`):
8 output channels x up to 3 vectors of 16 pixels of one output row, 24 int32 accumulators that
stay in registers while it walks all steps; each step loads the pixels' vectors once and, per
channel, broadcasts the channel's 4 weight bytes into a VPDPBUSD. Then, per accumulator, minus
zero_point * sum of the channel's weights, converted to float64, times the factor, plus the bias
(and the residual), the ReLU, one rounding to float32 and the store: no int32 or float64
intermediate array. Where the target has no AVX-512 VNNI the same sums come from generic IR that
LLVM matches to PMADDWD (pairs of products into twice as many int32 lanes, the pairs of a pixel
added once after the last step; `_multiply_add`) and legalizes on any CPU: on this machine
compiled for Haswell (AVX2) it ran the stem at 8.7 ms, against 14.8 ms for the DFNT and 26.9 ms
when the 4 products of a lane were added at every step. Integer sums are exact in any order and
each output's float operations are fixed, so results do not depend on the thread count or the
CPU.
"""
import math

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.core.registry import cpu_target
from numba.extending import intrinsic

from ..jit import jit, parallel_jit
from ..llvm_ir import CodegenHelpers

LANES = 16  # int32 lanes of a 512-bit vector: output pixels per vector
CHANNELS_PER_BLOCK = 8
MAX_VECTORS = 3  # 8 x 3 accumulators: 24 of the 32 vector registers
TAPS_PER_STEP = 4  # bytes of a quad, products summed per int32 lane by one VPDPBUSD
RESIDUAL_STRIDE = LANES * MAX_VECTORS  # channel stride of the residual scratch rows


def _has_vnni(context):
    """Whether numba compiles for a target with AVX-512 VNNI (its target machine's features)."""
    return "+avx512vnni" in getattr(context.codegen(), "_tm_features", "")


def target_has_vnni():
    """Whether the kernels numba compiles here use VPDPBUSD (`_has_vnni` of its CPU target)."""
    return _has_vnni(cpu_target.target_context)


@intrinsic
def quad_conv_block(typingctx, source, source_start, offsets, steps, weights, weight_start, corrections, factors,
                    bias, channel_start, out, out_start, out_channel_stride, residual, residual_start, vectors,
                    last_lanes, channels, relu, has_residual):
    """For r < channels, v < vectors, lane < 16 (lane < last_lanes in the last vector), with
    o = channel_start + r, n = 16 v + lane:

        acc = sum_{t < steps} sum_{k < 4} uint8(source[source_start + offsets[t] + n] byte k)
                                          * int8(weights[weight_start + 8 t + r] byte k)
        out[out_start + r * out_channel_stride + n] = float32(act(float64(acc - corrections[o])
            * factors[o] + bias[o] (+ residual[residual_start + r * 48 + n] when has_residual)))

    act = max(., 0) when `relu`. acc in int32 (wrapping; exact while the true sum fits). source,
    weights, corrections: 1-D contiguous int32 (source and weights as 4 packed bytes, byte k the
    k-th least significant); factors, bias: float64; out, residual: float32; offsets: int64; the
    other arguments int64 (1 <= vectors <= MAX_VECTORS, 1 <= last_lanes <= 16,
    1 <= channels <= 8, steps >= 1) but relu and has_residual (bool). Every lane's source, and
    the residual's 8 rows of 48 when has_residual, are read, stored or not. Bounds are the
    caller's contract: nothing is checked.
    """
    i32_array = types.Array(types.int32, 1, "C")
    i64_array = types.Array(types.int64, 1, "C")
    f64_array = types.Array(types.float64, 1, "C")
    f32_array = types.Array(types.float32, 1, "C")
    signature = types.void(i32_array, types.int64, i64_array, types.int64, i32_array, types.int64, i32_array,
                           f64_array, f64_array, types.int64, f32_array, types.int64, types.int64, f32_array,
                           types.int64, types.int64, types.int64, types.int64, types.boolean, types.boolean)

    def codegen(context, builder, sig, args):
        (_, source_start, _, steps, _, weight_start, _, _, _, channel_start, _, out_start, out_channel_stride, _,
         residual_start, vectors, last_lanes, channels, relu, has_residual) = args
        i32, i64 = ir.IntType(32), ir.IntType(64)
        f32, f64 = ir.FloatType(), ir.DoubleType()
        lanes = ir.VectorType(i32, LANES)
        doubles = ir.VectorType(f64, LANES)
        floats = ir.VectorType(f32, LANES)
        helpers = CodegenHelpers(context, builder, sig, args)
        data = helpers.data
        zero_sums, multiply_add, finish = _multiply_add(builder, _has_vnni(context))

        def constant(value):
            return ir.Constant(i64, value)

        source_data = builder.gep(data(0), [source_start])
        offsets_data = data(2)
        weight_data = builder.gep(data(4), [weight_start])
        out_data = builder.gep(data(10), [out_start])
        residual_data = builder.gep(data(13), [residual_start])
        zero_doubles = ir.Constant(doubles, [0.0] * LANES)
        def step(t, count, accumulators):
            step_source = builder.gep(source_data, [builder.load(builder.gep(offsets_data, [t]))])
            pixels = [builder.load(helpers.vector_at(step_source, constant(LANES * v), lanes), align=4)
                      for v in range(count)]
            step_weights = builder.gep(weight_data, [builder.mul(t, constant(CHANNELS_PER_BLOCK))])
            updated = []
            for r in range(CHANNELS_PER_BLOCK):
                weight = helpers.splat(builder.load(builder.gep(step_weights, [constant(r)])), lanes)
                updated.append([multiply_add(accumulators[r][v], pixels[v], weight) for v in range(count)])
            return updated

        def store_row(count, r, values):
            o = builder.add(channel_start, constant(r))
            correction = helpers.splat(builder.load(builder.gep(data(6), [o])), lanes)
            factor = helpers.splat(builder.load(builder.gep(data(7), [o])), doubles)
            offset = helpers.splat(builder.load(builder.gep(data(8), [o])), doubles)
            row_out = builder.gep(out_data, [builder.mul(constant(r), out_channel_stride)])
            row_residual = builder.gep(residual_data, [constant(r * RESIDUAL_STRIDE)])
            for v, sums in enumerate(values):
                # The reference's operations in its order, each rounded in float64 (no fused
                # multiply-add: fastmath flags are off), then one rounding to float32.
                value = builder.sitofp(builder.sub(finish(sums), correction), doubles)
                value = builder.fadd(builder.fmul(value, factor), offset)
                shortcut = builder.fpext(builder.load(helpers.vector_at(row_residual, constant(LANES * v), floats),
                                                      align=4), doubles)
                value = builder.select(has_residual, builder.fadd(value, shortcut), value)
                value = builder.select(relu, builder.select(builder.fcmp_ordered("<", value, zero_doubles),
                                                            zero_doubles, value), value)
                value = builder.fptrunc(value, floats)
                if v < count - 1:
                    builder.store(value, helpers.vector_at(row_out, constant(LANES * v), floats), align=4)
                else:  # the row's last vector: whole, or its first last_lanes lanes
                    helpers.store_lanes(f"quad_conv_block.last{count}.{r}",
                                        builder.gep(row_out, [constant(LANES * v)]), value, last_lanes)

        # channel 0 always exists; the others only when `channels` says so
        helpers.rows_by_vectors("quad_conv_block", vectors, MAX_VECTORS, steps, [zero_sums] * CHANNELS_PER_BLOCK,
                                step, store_row, channels)
        return context.get_dummy_value()

    return signature, codegen


def _multiply_add(builder, vnni):
    """(zero, step, finish) for accumulators of 16 int32 sums of 4 products uint8 x int8 each (the
    bytes of <16 x i32> `pixels` unsigned, those of `weight` signed): step(accumulator, pixels,
    weight) adds the products, finish(accumulator) gives the <16 x i32> sums. With AVX-512 VNNI an
    accumulator is <16 x i32> and a step one VPDPBUSD. Without it, generic IR that LLVM matches to
    PMADDWD (products of byte pairs summed into 32 int32 lanes, the bytes zero- and sign-extended
    to 16 bits, so exact): the accumulator is <32 x i32>, each lane holding 2 of a pixel's 4
    products, and the two halves of each pixel are added once, in finish."""
    i8, i32 = ir.IntType(8), ir.IntType(32)
    lanes = ir.VectorType(i32, LANES)
    if vnni:
        function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(lanes, [lanes] * 3),
                                                  "llvm.x86.avx512.vpdpbusd.512")
        return (ir.Constant(lanes, [0] * LANES),
                lambda accumulator, pixels, weight: builder.call(function, [accumulator, pixels, weight]),
                lambda accumulator: accumulator)
    as_bytes = ir.VectorType(i8, TAPS_PER_STEP * LANES)
    products = ir.VectorType(i32, TAPS_PER_STEP * LANES)
    pairs = ir.VectorType(i32, 2 * LANES)

    def halves(vector, count):
        """(even lanes, odd lanes) of `vector`, `count` lanes each."""
        return [builder.shuffle_vector(vector, vector, ir.Constant(ir.VectorType(i32, count),
                                                                   list(range(first, 2 * count, 2))))
                for first in (0, 1)]

    def step(accumulator, pixels, weight):
        product = builder.mul(builder.zext(builder.bitcast(pixels, as_bytes), products),
                              builder.sext(builder.bitcast(weight, as_bytes), products))
        even, odd = halves(product, 2 * LANES)
        return builder.add(accumulator, builder.add(even, odd))

    def finish(accumulator):
        even, odd = halves(accumulator, LANES)
        return builder.add(even, odd)

    return ir.Constant(pairs, [0] * 2 * LANES), step, finish


# ---- the layout: quad planes, steps and their offsets ------------------------------------------

def row_quad_spacing(strides, dilations):
    """(kernel row step s, phase row step d) of the "rows" quads: kernel rows ky and ky + s land on
    the same stride phase, d phase rows apart (s = sh / gcd(sh, dh), d = dh / gcd(sh, dh))."""
    common = math.gcd(strides[0], dilations[0])
    return strides[0] // common, dilations[0] // common


def plan_steps(weight_shape, group, strides, dilations, kind=None):
    """The quads of a layer: (kind, steps) with kind "channels" or "rows" (`kind`, or whichever
    takes fewer steps; channels on a tie) and steps a list of (plane, ky, kx, ky_step) for the
    planes of one group. Step (plane, ky, kx, ky_step) reads, for k < 4, tap (channel `plane`,
    row ky + k * ky_step, column kx) for "rows" (ky_step = s of `row_quad_spacing`; rows past kh
    unused), tap (channel 4 * plane + k, ky, kx) for "channels" (ky_step 0; channels past C/group
    unused)."""
    _, group_in, kh, kw = weight_shape
    channel_steps = [(plane, ky, kx, 0) for plane in range(-(-group_in // TAPS_PER_STEP))
                     for ky in range(kh) for kx in range(kw)]
    ky_step, _ = row_quad_spacing(strides, dilations)
    row_steps = []
    for c in range(group_in):
        for first in range(ky_step):  # the kernel rows of one stride phase: first, first + s, ...
            rows = list(range(first, kh, ky_step))
            for start in range(0, len(rows), TAPS_PER_STEP):
                row_steps += [(c, rows[start], kx, ky_step) for kx in range(kw)]
    if kind == "rows" or (kind is None and len(row_steps) < len(channel_steps)):
        return "rows", row_steps
    return "channels", channel_steps


def pack_weights(weight, group, kind, steps):
    """int32 [group * blocks * len(steps) * 8] (4 packed int8 each): block j of group g, step t,
    channel r holds the weights of output channel g * O/group + 8 j + r for step t's 4 taps
    (`plan_steps`), byte k for tap k; zero for taps and channels that do not exist."""
    out_channels, group_in, kh, kw = weight.shape
    group_out = out_channels // group
    blocks = -(-group_out // CHANNELS_PER_BLOCK)
    packed = np.zeros((group, blocks * CHANNELS_PER_BLOCK, len(steps), TAPS_PER_STEP), np.int8)
    grouped = weight.reshape(group, group_out, group_in, kh, kw)
    for t, (plane, ky, kx, ky_step) in enumerate(steps):
        for k in range(TAPS_PER_STEP):
            c, row = (plane, ky + k * ky_step) if kind == "rows" else (TAPS_PER_STEP * plane + k, ky)
            if c < group_in and row < kh:
                packed[:, :group_out, t, k] = grouped[:, :, c, row, kx]
    packed = packed.reshape(group, blocks, CHANNELS_PER_BLOCK, len(steps), TAPS_PER_STEP).transpose(0, 1, 3, 2, 4)
    return np.ascontiguousarray(packed).view(np.int32).ravel()


def image_shape(channels, group, kind, strides, kernel_hw, dilations, out_hw):
    """(planes, sh, sw, rows, columns) of one sample's quad image: planes = group * (C/group for
    "rows", ceil(C/group / 4) for "channels"); each phase rows x columns quads, with rows =
    out_h + dh * (kh - 1) // sh and columns = out_w + dw * (kw - 1) // sw (conv.stride_phases)."""
    group_in = channels // group
    planes = group * (group_in if kind == "rows" else -(-group_in // TAPS_PER_STEP))
    rows = out_hw[0] + dilations[0] * (kernel_hw[0] - 1) // strides[0]
    columns = out_hw[1] + dilations[1] * (kernel_hw[1] - 1) // strides[1]
    return planes, strides[0], strides[1], rows, columns


def step_offsets(steps, shape, kernel_hw, strides, dilations):
    """int64 [len(steps)]: the offset, in quads of a sample's flattened quad image [planes, sh, sw,
    rows, columns] (`image_shape`), of step t's quad for output pixel (0, 0) of group 0; output
    pixel (oy, ox) of group g adds g * planes / group * sh * sw * rows * columns + oy * columns + ox."""
    _, sh, sw, rows, columns = shape
    dh, dw = dilations
    offsets = np.empty(len(steps), np.int64)
    for t, (plane, ky, kx, _) in enumerate(steps):
        phase = (ky * dh % sh) * sw + kx * dw % sw
        offsets[t] = ((plane * sh * sw + phase) * rows + ky * dh // sh) * columns + kx * dw // sw
    return offsets


def phase_rows(kind, shape, strides, dilations):
    """Rows of each stride phase that `quad_image` reads: the image's rows, and for "rows" quads
    the 3 * d more that the last quads' upper bytes reach (d of `row_quad_spacing`)."""
    return shape[3] + (3 * row_quad_spacing(strides, dilations)[1] if kind == "rows" else 0)


def split_phases(q, strides, rows, columns):
    """uint8 [B, C, sh, sw, rows, columns]: phases[b, c, p, r, i, j] = q[b, c, i * sh + p, j * sw + r]
    (0 past q's edge); for stride 1 with q of that size, q itself (a view)."""
    batch, channels, height, width = q.shape
    sh, sw = strides
    if (sh, sw) == (1, 1) and (height, width) == (rows, columns):
        return q.reshape(batch, channels, 1, 1, rows, columns)
    phases = np.zeros((batch, channels, sh, sw, rows, columns), np.uint8)
    for p in range(sh):
        for r in range(sw):
            part = q[:, :, p::sh, r::sw][:, :, :rows, :columns]
            phases[:, :, p, r, :part.shape[2], :part.shape[3]] = part
    return phases


@jit
def quad_image(phases, group, rows_kind, row_spacing, image):
    """Fill image (uint32 [B, planes, sh, sw, rows, columns], `image_shape`) from the stride phases
    of the padded uint8 input (`split_phases`, with `phase_rows` rows): byte k of
    image[b, m, p, r, i, j] is phases[b, c, p, r, y, j] with, for "rows" (rows_kind), c = m and
    y = i + k * row_spacing, for "channels" c = g * C/group + 4 u + k (m = g * planes/group + u) and
    y = i; 0 for channels past the group's (no tap reads those bytes)."""
    batch, channels = phases.shape[:2]
    _, planes, sh, sw, rows, columns = image.shape
    group_in = channels // group
    group_planes = planes // group
    zeros = np.zeros(columns, np.uint8)
    for b in range(batch):
        for m in range(planes):
            g, u = m // group_planes, m % group_planes
            for p in range(sh):
                for r in range(sw):
                    for i in range(rows):
                        # Four whole source rows, so that the loop below is one contiguous pass.
                        if rows_kind:
                            first = phases[b, m, p, r, i]
                            second = phases[b, m, p, r, i + row_spacing]
                            third = phases[b, m, p, r, i + 2 * row_spacing]
                            fourth = phases[b, m, p, r, i + 3 * row_spacing]
                        else:
                            c = g * group_in + TAPS_PER_STEP * u
                            present = group_in - TAPS_PER_STEP * u
                            first = phases[b, c, p, r, i]
                            second = phases[b, c + 1, p, r, i] if present > 1 else zeros
                            third = phases[b, c + 2, p, r, i] if present > 2 else zeros
                            fourth = phases[b, c + 3, p, r, i] if present > 3 else zeros
                        target = image[b, m, p, r, i]
                        for j in range(columns):
                            target[j] = (np.uint32(first[j]) | (np.uint32(second[j]) << np.uint32(8))
                                         | (np.uint32(third[j]) << np.uint32(16))
                                         | (np.uint32(fourth[j]) << np.uint32(24)))


@parallel_jit
def direct_row_chunks(source, sample_quads, group_quads, offsets, weights, corrections, factors, bias, out, residual,
                      has_residual, relu, group, group_out, out_h, out_w, columns, rows, rows_per_task):
    """`direct_rows` over all `rows` output rows (of every sample), one parallel iteration per chunk of
    `rows_per_task` rows (the chunks depend on the shapes only)."""
    for task in prange((rows + rows_per_task - 1) // rows_per_task):
        first = task * rows_per_task
        direct_rows(source, sample_quads, group_quads, offsets, weights, corrections, factors, bias, out, residual,
                    has_residual, relu, group, group_out, out_h, out_w, columns, first, min(first + rows_per_task, rows))


@jit
def direct_rows(source, sample_quads, group_quads, offsets, weights, corrections, factors, bias, out, residual,
                has_residual, relu, group, group_out, out_h, out_w, columns, first_task, stop_task):
    """The output rows first_task .. stop_task - 1 (row t: sample t // out_h, row t % out_h) of
    every output channel: `quad_conv_block` over blocks of 8 channels of each group and up to 3
    vectors of 16 pixels. source: the flattened quad images (int32, sample_quads per sample,
    group_quads per group, 15 quads of slack after the last), weights from `pack_weights`,
    out and residual: float32 [B, O, out_h, out_w] (residual [1, 1, 1, 1] when has_residual is
    false)."""
    steps = offsets.shape[0]
    out_channels = group * group_out
    blocks = (group_out + CHANNELS_PER_BLOCK - 1) // CHANNELS_PER_BLOCK
    row_vectors = (out_w + LANES - 1) // LANES
    calls = (row_vectors + MAX_VECTORS - 1) // MAX_VECTORS
    plane = out_h * out_w
    flat_out = out.reshape(-1)
    scratch = np.zeros(CHANNELS_PER_BLOCK * RESIDUAL_STRIDE, np.float32)
    for task in range(first_task, stop_task):
        b, oy = task // out_h, task % out_h
        for g in range(group):
            for block in range(blocks):
                first_channel = g * group_out + block * CHANNELS_PER_BLOCK
                channels = min(CHANNELS_PER_BLOCK, group_out - block * CHANNELS_PER_BLOCK)
                first_vector = 0
                for call in range(calls):
                    # the row's vectors split as evenly as calls allow (7 = 2 + 2 + 3, not 3 + 3 + 1)
                    vectors = (row_vectors * (call + 1)) // calls - first_vector
                    first_pixel = first_vector * LANES
                    pixels = min(vectors * LANES, out_w - first_pixel)
                    last_lanes = pixels - (vectors - 1) * LANES
                    if has_residual:
                        for r in range(channels):
                            shortcut = residual[b, first_channel + r, oy]
                            for n in range(pixels):
                                scratch[r * RESIDUAL_STRIDE + n] = shortcut[first_pixel + n]
                    quad_conv_block(source, b * sample_quads + g * group_quads + oy * columns + first_pixel, offsets,
                                    steps, weights, (g * blocks + block) * steps * CHANNELS_PER_BLOCK, corrections,
                                    factors, bias, first_channel, flat_out,
                                    (b * out_channels + first_channel) * plane + oy * out_w + first_pixel, plane,
                                    scratch, 0, vectors, last_lanes, channels, relu, has_residual)
                    first_vector += vectors
