"""IntConv and IntLinear: exact 8-bit integer convolution / linear layer (DESIGN.md section 2).

    q   = clip(rint(x / input_scale) + input_zero_point, 0, 255)                       uint8
    acc = sum over the taps of o's window of weight[o, c, ky, kx] * (q - input_zero_point)   exact integer
    y   = activation(acc * (input_scale * weight_scale[o]) + bias[o] + residual)

Quantizer: x is taken as float32, divided by input_scale in float64 and rounded half to even
(numpy's rint); both the reference and the kernels compute it this way, so q is the same bits.
Padding holds q = input_zero_point, the quantized real 0 (the float Conv pads x with 0).
Rescale: acc * (input_scale * weight_scale[o]) + bias[o] in float64 (the factor formed in float64
from the two float32 parameters), then the epilogue (residual, ReLU) in float64 and one rounding
to float32. The reference accumulates in int64; the kernels in int32 (direct) or modulo the
Fermat number 2^32 + 1 (DFNT, engine/ops/int_conv_dfnt.py), both exact because
|acc| <= 255 * 128 * taps < 2^31, which `infer_shapes` checks (taps = C/group * kh * kw).

The direct kernel (engine/ops/int_conv_direct.py: the uint8 input laid out once as quads of 4
taps, VPDPBUSD with AVX-512 VNNI, int32 sums of 8 output channels x up to 48 pixels in registers
over all taps) sums w * q over the raw uint8 q and subtracts input_zero_point * sum_w[o] (sum_w:
the sum of o's weights, precomputed); padding holds the zero point, so the correction is the same
at every output position; the rescale and the epilogue run on the registers before the one
store. The direct kernel's tasks (chunks of output rows) run over numba's threads (a prange:
Python threads calling it in turn ran no faster at 2 threads than at 1 on the stem); the DFNT's
(blocks of tiles) on numba.get_num_threads() Python threads (conv._run_tasks).

attrs: input_zero_point (int 0..255), strides, pads [top, left, bottom, right], dilations, group,
       activation (the epilogue of engine/ops/_epilogue.py).
params: weight int8 [O, C/group, kh, kw], weight_scale float32 [O] (> 0), input_scale float32 [1]
        (> 0), bias float32 [O].
IntLinear is the same on [batch, C] inputs with weight int8 [O, C, 1, 1] (no geometry attributes,
group 1); it runs as a 1x1 IntConv whose image row is the batch.
"""
import numpy as np

from ..errors import GraphError
from ..jit import jit
from . import _attrs, _epilogue, int_conv_dfnt, int_conv_direct
from .conv import conv_geometry, output_shape_with_epilogue, padded_input_and_columns_bytes, window_view
from .registry import Cost, Op, register

STORED_ATTRIBUTES = ("input_zero_point", "activation", "group")
STORED_PARAMETERS = ("weight", "weight_scale", "input_scale", "bias")
# |acc| <= 255 * 128 * taps must stay below 2^31 (int32 accumulation, the DFNT's modulus 2^32 + 1).
MAX_TAPS = (2 ** 31 - 1) // (255 * 128)
KERNELS = ("direct", "dfnt")


def _params(node):
    """(weight int8 [O, C/g, kh, kw], weight_scale float32 [O], input_scale float, zero point int,
    bias float32 [O]), validated."""
    weight = _attrs.param(node, "weight", np.int8, 4)
    weight_scale = _attrs.param(node, "weight_scale", np.float32, 1)
    input_scale = _attrs.param(node, "input_scale", np.float32, 1)
    bias = _attrs.param(node, "bias", np.float32, 1)
    out_channels = weight.shape[0]
    _attrs.expect_shape(node, "weight_scale", weight_scale.shape, (out_channels,))
    _attrs.expect_shape(node, "input_scale", input_scale.shape, (1,))
    _attrs.expect_shape(node, "bias", bias.shape, (out_channels,))
    zero_point = _attrs.int_attr(node, "input_zero_point", None, 0, 255)
    for key, values in (("weight_scale", weight_scale), ("input_scale", input_scale)):
        if not np.all(values > 0):
            raise GraphError(f"node {node.name!r} ({node.op}): parameter {key!r} must be positive, found "
                             f"{values[values <= 0][:4].tolist()}")
    taps = int(np.prod(weight.shape[1:]))
    if taps > MAX_TAPS:
        raise GraphError(f"node {node.name!r} ({node.op}): {taps} taps per output (C/group * kh * kw); an exact "
                         f"int32 accumulation holds at most {MAX_TAPS}")
    return weight, weight_scale, float(input_scale[0]), zero_point, bias


def quantize_input(x, input_scale, zero_point):
    """q = clip(rint(float32(x) / input_scale) + zero_point, 0, 255) as int64, shape of x (the
    division in float64, rounding half to even)."""
    scaled = np.asarray(x, dtype=np.float32).astype(np.float64) / np.float64(np.float32(input_scale))
    return np.clip(np.rint(scaled) + zero_point, 0, 255).astype(np.int64)


def rescale_factors(weight_scale, input_scale):
    """float64 [O]: input_scale * weight_scale[o], the factor that turns acc into y - bias."""
    return np.float64(np.float32(input_scale)) * weight_scale.astype(np.float64)


def integer_accumulation(node, q):
    """The exact int64 accumulation acc [B, O, out_h, out_w] of an IntConv on quantized input q
    (int64 [B, C, H, W]): sum over each window of weight * (q - zero point), padding = zero point."""
    weight, _, _, zero_point, _ = _params(node)
    group = node.attrs.get("group", 1)
    strides, pads, dilations, _ = conv_geometry(node, q.shape, weight.shape[2:])
    windows = window_view(q - zero_point, weight.shape[2:], strides, pads, dilations, pad_value=0)
    weight = weight.astype(np.int64)
    group_in, group_out = q.shape[1] // group, weight.shape[0] // group
    return np.concatenate([np.einsum("bcijhw,ocij->bohw", windows[:, g * group_in:(g + 1) * group_in],
                                     weight[g * group_out:(g + 1) * group_out]) for g in range(group)], axis=1)


# ---- IntConv ------------------------------------------------------------------------------

def _conv_infer_shapes(node, input_shapes):
    return [output_shape_with_epilogue(node, input_shapes, _params(node)[0])]


def _conv_reference(node, inputs):
    """Quantize, accumulate in int64, rescale in float64, epilogue."""
    _, weight_scale, input_scale, zero_point, bias = _params(node)
    acc = integer_accumulation(node, quantize_input(inputs[0], input_scale, zero_point))
    factors = rescale_factors(weight_scale, input_scale)[None, :, None, None]
    y = acc * factors + bias.astype(np.float64)[None, :, None, None]
    return [_epilogue.apply(node, y, [np.asarray(x, dtype=np.float64) for x in inputs])]


# Where the target has AVX-512 VNNI the direct kernel (64 multiply-adds per VPDPBUSD) runs every
# layer: at 1 thread (benchmarks/integer_conv.py and more shapes, docs/benchmarks.md) the DFNT
# took 6 to 10 times as long on the stem and the 3x3 conv, 3x on an 11x11 stride-1 kernel and
# still 1.5x on 33x33, the largest it transforms. Without VNNI (PMADDWD, 16 multiply-adds per 256-bit
# instruction; measured on this machine compiled for Haswell) the DFNT runs layers whose stride-1
# phase kernels (int_conv_dfnt.phase_weights) have at least DFNT_MIN_PHASE_TAPS taps: the direct
# kernel was faster up to 11x11 (DFNT 0.78x its speed) and slower from 13x13 (1.3x), since the
# DFNT's work per output hardly grows with the kernel and the direct kernel's does.
DFNT_MIN_PHASE_TAPS = 144


def choose_kernel(weight_shape, strides, dilations, vnni=None):
    """The faster exact kernel for a layer of this shape, "direct" or "dfnt": always the direct one
    on a target with AVX-512 VNNI (`vnni`; None: numba's target), else the DFNT for phase kernels
    of DFNT_MIN_PHASE_TAPS taps and more that fit its transform."""
    if vnni is None:
        vnni = int_conv_direct.target_has_vnni()
    _, _, kh, kw = weight_shape
    rows = ((kh - 1) * dilations[0]) // strides[0] + 1
    columns = ((kw - 1) * dilations[1]) // strides[1] + 1
    fits = int_conv_dfnt.choose_transform_size((rows, columns)) is not None
    return "dfnt" if not vnni and fits and rows * columns >= DFNT_MIN_PHASE_TAPS else "direct"


def make_conv_kernel(node, kernel=None, quads=None):
    """run(inputs, out=None) -> [y float32 [B, O, out_h, out_w]] with the `kernel` of KERNELS
    (None: `choose_kernel`); the direct kernel with the `quads` of int_conv_direct.plan_steps
    ("rows", "channels"; None: the one with fewer steps)."""
    weight, weight_scale, input_scale, zero_point, bias = _params(node)
    group = node.attrs.get("group", 1)
    out_channels = weight.shape[0]
    factors = rescale_factors(weight_scale, input_scale)
    bias64 = bias.astype(np.float64)
    relu = node.attrs.get("activation") == "relu"
    weight_sums = weight.astype(np.int64).reshape(out_channels, -1).sum(axis=1)
    corrections = (zero_point * weight_sums).astype(np.int32)  # |.| <= 255 * 128 * taps < 2^31
    kernel_hw = weight.shape[2:]
    no_residual = np.zeros((1, 1, 1, 1), dtype=np.float32)
    # Strides and dilations are the node's attributes, so the kernel, the DFNT's transformed
    # weights and the direct kernel's quads and packed weights are chosen and made once, on the
    # first run; the quads' offsets once per input shape.
    chosen_kernel, prepared, offsets_by_shape = [], [], {}

    def run(inputs, out=None):
        x = np.ascontiguousarray(inputs[0], dtype=np.float32)
        strides, pads, dilations, (out_h, out_w) = conv_geometry(node, x.shape, kernel_hw)
        if not chosen_kernel:
            chosen_kernel.append(kernel or choose_kernel(weight.shape, strides, dilations))
        chosen = chosen_kernel[0]
        batch = x.shape[0]
        y = np.empty((batch, out_channels, out_h, out_w), dtype=np.float32) if out is None else out
        has_residual = len(inputs) == 2
        residual = np.ascontiguousarray(inputs[1], dtype=np.float32) if has_residual else no_residual
        if chosen == "dfnt":
            if not prepared:
                prepared.append(int_conv_dfnt.prepare_weights(weight, group, strides, dilations))
            centered = _quantize_padded(x, input_scale, zero_point, pads).astype(np.int64) - zero_point
            acc = int_conv_dfnt.convolve(centered, prepared[0], (out_h, out_w))
            _rescale_kernel(acc, factors, bias64, residual, has_residual, relu, y)
            return [y]
        if not prepared:
            kind, steps = int_conv_direct.plan_steps(weight.shape, group, strides, dilations, quads)
            prepared.append((kind, steps, int_conv_direct.pack_weights(weight, group, kind, steps)))
        kind, steps, packed = prepared[0]
        shape = int_conv_direct.image_shape(x.shape[1], group, kind, strides, kernel_hw, dilations, (out_h, out_w))
        if shape not in offsets_by_shape:
            offsets_by_shape[shape] = int_conv_direct.step_offsets(steps, shape, kernel_hw, strides, dilations)
        offsets = offsets_by_shape[shape]
        sample_quads = int(np.prod(shape))
        # 15 quads of slack after the last sample: the last vector of a row reads whole.
        flat = np.empty(batch * sample_quads + int_conv_direct.LANES, np.uint32)
        flat[batch * sample_quads:] = 0
        image = flat[:batch * sample_quads].reshape((batch,) + shape)
        phases = int_conv_direct.split_phases(_quantize_padded(x, input_scale, zero_point, pads), strides,
                                              int_conv_direct.phase_rows(kind, shape, strides, dilations), shape[-1])
        row_spacing = int_conv_direct.row_quad_spacing(strides, dilations)[1]
        int_conv_direct.quad_image(phases, group, kind == "rows", row_spacing, image)
        source = flat.view(np.int32)
        group_quads = sample_quads // group
        # The kernel writes y as one flat array.
        target = y if y.flags.c_contiguous else np.empty(y.shape, dtype=np.float32)
        # Chunks of DIRECT_ROWS_PER_TASK output rows for the threads; the chunks do not depend on
        # the thread count.
        int_conv_direct.direct_row_chunks(source, sample_quads, group_quads, offsets, packed, corrections, factors,
                                          bias64, target, residual, has_residual, relu, group, out_channels // group,
                                          out_h, out_w, shape[-1], batch * out_h, DIRECT_ROWS_PER_TASK)
        if target is not y:
            y[...] = target
        return [y]

    return run


def _quantize_padded(x, input_scale, zero_point, pads):
    """uint8 [B, C, H + top + bottom, W + left + right]: quantize_input of x, the zero point in
    the padding."""
    top, left, bottom, right = pads
    batch, channels, height, width = x.shape
    q = np.full((batch, channels, height + top + bottom, width + left + right), zero_point, dtype=np.uint8)
    _quantize_kernel(x, np.float64(np.float32(input_scale)), zero_point, top, left, q)
    return q


@jit
def _quantize_kernel(x, input_scale, zero_point, top, left, q):
    """q[b, c, top + i, left + j] = quantize_input(x[b, c, i, j]) (one pass, on the calling thread: it
    is a small part of the layer, and a parallel region would leave the threading layer's workers
    spinning into the kernel that follows). Row by row, so that the loop vectorizes."""
    batch, channels, height, width = x.shape
    for b in range(batch):
        for c in range(channels):
            for i in range(height):
                source = x[b, c, i]
                target = q[b, c, top + i, left:left + width]
                for j in range(width):
                    value = np.rint(np.float64(source[j]) / input_scale) + zero_point
                    target[j] = np.uint8(min(max(value, 0.0), 255.0))


DIRECT_ROWS_PER_TASK = 8


@jit
def _rescale_kernel(acc, factors, bias, residual, has_residual, relu, y):
    """y[b, o, oy, ox] = epilogue(acc[b, oy, ox, o] * factors[o] + bias[o]) in float64, rounded once
    to float32 (acc channels last, y channels first; on the calling thread, as `_quantize_kernel`)."""
    batch, out_channels, out_h, out_w = y.shape
    for row in range(batch * out_h):
        b, oy = row // out_h, row % out_h
        for o in range(out_channels):
            target = y[b, o, oy]
            for ox in range(out_w):
                value = np.float64(acc[b, oy, ox, o]) * factors[o] + bias[o]
                if has_residual:
                    value += residual[b, o, oy, ox]
                if relu:
                    value = max(value, 0.0)
                target[ox] = value


def _conv_make_kernel(node):
    return make_conv_kernel(node)


def _cost(node, input_shapes, output_shapes):
    weight = node.params["weight"]
    outputs = int(np.prod(output_shapes[0][1:]))
    macs = outputs * int(np.prod(weight.shape[1:]))
    # Float work around the integer accumulation: the quantizer (divide, round, add the zero point:
    # 3 per input element) and the rescale (multiply, add the bias: 2 per output).
    flops = 3 * int(np.prod(input_shapes[0][1:])) + 2 * outputs
    return Cost(flops=flops, int_macs=macs, float_flops=2 * macs + outputs,
                float32_params=weight.size + weight.shape[0])


# ---- IntLinear ----------------------------------------------------------------------------

def _linear_infer_shapes(node, input_shapes):
    _attrs.expect_arity(node, 1)
    _attrs.expect_rank(node, 0, input_shapes[0], 2)
    weight = _params(node)[0]
    if weight.shape[2:] != (1, 1) or weight.shape[1] != input_shapes[0][1]:
        raise GraphError(f"node {node.name!r} (IntLinear): expects weight [O, {input_shapes[0][1]}, 1, 1], "
                         f"found {list(weight.shape)}")
    if node.attrs.get("group", 1) != 1:
        raise GraphError(f"node {node.name!r} (IntLinear): group must be 1, found {node.attrs['group']!r}")
    return [(None, weight.shape[0])]


def _as_conv_input(x):
    return x.reshape(x.shape[0], x.shape[1], 1, 1)


def _linear_reference(node, inputs):
    (y,) = _conv_reference(node, [_as_conv_input(np.asarray(inputs[0]))])
    return [y[:, :, 0, 0]]


def _linear_make_kernel(node):
    conv_kernel = make_conv_kernel(node, "direct")

    def run(inputs):
        # The batch becomes one image row: [B, C] -> [1, C, 1, B] -> [1, O, 1, B] -> [B, O].
        x = np.asarray(inputs[0], dtype=np.float32)
        (y,) = conv_kernel([np.ascontiguousarray(x.T).reshape(1, x.shape[1], 1, x.shape[0])])
        return [np.ascontiguousarray(y[0, :, 0, :].T)]

    return run


def _scratch_bytes(node, input_shapes, output_shapes):
    return padded_input_and_columns_bytes(node, input_shapes, output_shapes, node.params["weight"].shape[2:4])


register(Op("IntConv", "exact 8-bit integer 2-D convolution (int8 weights, uint8 input, int32 accumulation)",
            _conv_infer_shapes, _conv_reference, _conv_make_kernel, _cost, output_buffer=True,
            scratch_bytes=_scratch_bytes,
            attributes=STORED_ATTRIBUTES + ("strides", "pads", "dilations"), parameters=STORED_PARAMETERS))
register(Op("IntLinear", "exact 8-bit integer fully connected layer", _linear_infer_shapes, _linear_reference,
            _linear_make_kernel, _cost, attributes=STORED_ATTRIBUTES, parameters=STORED_PARAMETERS))
