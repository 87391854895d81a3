"""PAConv and PALinear: piecewise-approximated multi-base binary convolution / linear layer.

    y = conv(Qw(W), Qa(x)) + b

Qw, per output channel o (M sign bit-planes B_k in {-1, +1}):
    Qw(W)[o] = weight_offset[o] + sum_k weight_scales[k, o] * B_k[o]
Qa, per input tensor (N threshold bit-planes A_j in {0, 1}, a thermometer code):
    Qa(x)[c] = act_lowest + sum_j act_steps[j] * (x[c] >= act_thresholds[j, c])
Padding rule "zero_before_quantizer": the real-valued input is zero-padded before Qa, so a padded
position holds Qa(0).

With L0 = weight_offset - sum_k weight_scales[k] (the lowest weight level) and B_k = 2 b_k - 1,
summing over the K = C*kh*kw taps of a window:
    y[o] = b[o] + L0[o]*act_lowest*K + act_lowest * sum_k 2 d_k[o] popcount(b_k[o])
           + L0[o] * sum_j e_j popcount(a_j) + sum_k sum_j 2 d_k[o] e_j popcount(b_k[o] & a_j)
Every popcount is an exact integer; only this final combine rounds (in float64, then to float32).

attrs: in_channels, strides, pads [top, left, bottom, right], dilations, padding_rule.
params: weight_planes uint64 [M, O, kh, kw, words], weight_scales float32 [M, O],
        weight_offset float32 [O], act_thresholds float32 [N, C], act_steps float32 [N],
        act_lowest float32 [1], bias float32 [O].
PALinear is the same with kh = kw = 1 on [batch, C] inputs (no geometry attributes).
"""
import numpy as np
from numba import prange

from ..bits import pack_activations, unpack_weight_planes, words_for
from ..errors import GraphError
from ..jit import parallel_jit, popcount64
from . import _attrs
from .conv import conv_geometry, window_view
from .registry import Cost, Op, register

PADDING_RULES = ("zero_before_quantizer",)


def _params(node):
    """All PA parameters, validated against each other; returns a dict of arrays."""
    p = {
        "weight_planes": _attrs.param(node, "weight_planes", np.uint64, 5),
        "weight_scales": _attrs.param(node, "weight_scales", np.float32, 2),
        "weight_offset": _attrs.param(node, "weight_offset", np.float32, 1),
        "act_thresholds": _attrs.param(node, "act_thresholds", np.float32, 2),
        "act_steps": _attrs.param(node, "act_steps", np.float32, 1),
        "act_lowest": _attrs.param(node, "act_lowest", np.float32, 1),
        "bias": _attrs.param(node, "bias", np.float32, 1),
    }
    in_channels = node.attrs.get("in_channels")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise GraphError(f"node {node.name!r} ({node.op}): attribute 'in_channels' must be a positive int")
    rule = node.attrs.get("padding_rule", "zero_before_quantizer")
    if rule not in PADDING_RULES:
        raise GraphError(
            f"node {node.name!r} ({node.op}): padding_rule {rule!r} is not supported; supported: {PADDING_RULES}"
        )
    m, out_channels, kh, kw, n_words = p["weight_planes"].shape
    n = p["act_steps"].shape[0]
    if m < 1 or n < 1 or out_channels < 1 or kh < 1 or kw < 1:
        raise GraphError(f"node {node.name!r} ({node.op}): empty weight_planes or act_steps")
    _attrs.expect_shape(node, "weight_planes", p["weight_planes"].shape, (m, out_channels, kh, kw, words_for(in_channels)))
    _attrs.expect_shape(node, "weight_scales", p["weight_scales"].shape, (m, out_channels))
    _attrs.expect_shape(node, "weight_offset", p["weight_offset"].shape, (out_channels,))
    _attrs.expect_shape(node, "act_thresholds", p["act_thresholds"].shape, (n, in_channels))
    _attrs.expect_shape(node, "act_lowest", p["act_lowest"].shape, (1,))
    _attrs.expect_shape(node, "bias", p["bias"].shape, (out_channels,))
    for key in ("weight_scales", "weight_offset", "act_thresholds", "act_steps", "act_lowest", "bias"):
        if not np.all(np.isfinite(p[key])):
            raise GraphError(f"node {node.name!r} ({node.op}): parameter {key!r} holds NaN or Inf")
    return p


def weight_values(node):
    """Qw(W) as float64 [O, C, kh, kw]."""
    p = _params(node)
    signs = np.where(unpack_weight_planes(p["weight_planes"], node.attrs["in_channels"]), 1.0, -1.0)
    scales = p["weight_scales"].astype(np.float64)
    return p["weight_offset"].astype(np.float64)[:, None, None, None] + np.einsum("mo,mocij->ocij", scales, signs)


def act_quantize(x, thresholds, steps, lowest):
    """Qa(x) = lowest + sum_j steps[j] * (x[:, c] >= thresholds[j, c]), float64, shape of x."""
    x = np.asarray(x, dtype=np.float64)
    extra = (1,) * (x.ndim - 2)
    result = np.full(x.shape, float(lowest[0]))
    for j in range(thresholds.shape[0]):
        result += float(steps[j]) * (x >= thresholds[j].astype(np.float64).reshape((1, -1) + extra))
    return result


# ---- PAConv -------------------------------------------------------------------------------

def _conv_infer_shapes(node, input_shapes):
    _attrs.expect_arity(node, 1)
    _attrs.expect_rank(node, 0, input_shapes[0], 4)
    p = _params(node)
    if input_shapes[0][1] != node.attrs["in_channels"]:
        raise GraphError(
            f"node {node.name!r} (PAConv): input has {input_shapes[0][1]} channels, "
            f"in_channels is {node.attrs['in_channels']}"
        )
    _, out_channels, kh, kw, _ = p["weight_planes"].shape
    _, _, _, (out_h, out_w) = conv_geometry(node, input_shapes[0], (kh, kw))
    return [(None, out_channels, out_h, out_w)]


def _conv_reference(node, inputs):
    """Qa on the zero-padded input, then a float64 convolution with Qw(W)."""
    (x,) = inputs
    p = _params(node)
    weight = weight_values(node)
    strides, pads, dilations, _ = conv_geometry(node, x.shape, weight.shape[2:])
    padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    quantized = act_quantize(padded, p["act_thresholds"], p["act_steps"], p["act_lowest"])
    windows = window_view(quantized, weight.shape[2:], strides, [0, 0, 0, 0], dilations)
    y = np.einsum("bcijhw,ocij->bohw", windows, weight)
    return [y + p["bias"].astype(np.float64)[None, :, None, None]]


def combine_coefficients(p, in_channels):
    """Per-output constants of the combine (see module docstring), float64.

    -> (constant [O], lowest_weight [O], pair_scales [M, N, O] = 2 d_k e_j, act_steps [N])
    """
    scales = p["weight_scales"].astype(np.float64)
    lowest_weight = p["weight_offset"].astype(np.float64) - scales.sum(axis=0)
    steps = p["act_steps"].astype(np.float64)
    act_lowest = float(p["act_lowest"][0])
    _, _, kh, kw, _ = p["weight_planes"].shape
    taps = in_channels * kh * kw
    weight_ones = np.zeros(scales.shape)
    for k in range(scales.shape[0]):
        weight_ones[k] = [sum(int(w).bit_count() for w in row.ravel()) for row in p["weight_planes"][k]]
    constant = (
        p["bias"].astype(np.float64)
        + lowest_weight * act_lowest * taps
        + act_lowest * (2.0 * scales * weight_ones).sum(axis=0)
    )
    pair_scales = 2.0 * scales[:, None, :] * steps[None, :, None]
    return constant, lowest_weight, np.ascontiguousarray(pair_scales), steps


def _conv_make_kernel(node):
    p = _params(node)
    in_channels = node.attrs["in_channels"]
    weight_planes = p["weight_planes"]
    _, out_channels, kh, kw, _ = weight_planes.shape
    constant, lowest_weight, pair_scales, steps = combine_coefficients(p, in_channels)
    thresholds = p["act_thresholds"]

    def run(inputs):
        x = np.ascontiguousarray(inputs[0], dtype=np.float32)
        strides, pads, dilations, (out_h, out_w) = conv_geometry(node, x.shape, (kh, kw))
        planes = pack_activations(x, thresholds, pads)
        y = np.empty((x.shape[0], out_channels, out_h, out_w), dtype=np.float32)
        _pa_conv_kernel(
            planes, weight_planes, strides[0], strides[1], dilations[0], dilations[1],
            constant, lowest_weight, pair_scales, steps, y,
        )
        return [y]

    return run


@parallel_jit
def _pa_conv_kernel(planes, weight_planes, stride_h, stride_w, dilation_h, dilation_w,
                    constant, lowest_weight, pair_scales, steps, y):
    """One output row per parallel iteration. For each output pixel the activation words of its
    window are gathered once into `window` [N, kh*kw*words]; every output channel then sweeps
    that window and its own contiguous weight words, doing all M x N AND-popcounts per word."""
    n_planes, batch, _, _, n_words = planes.shape
    m_planes, out_channels, kh, kw, _ = weight_planes.shape
    window_words = kh * kw * n_words
    flat_weights = weight_planes.reshape(m_planes, out_channels, window_words)
    out_h, out_w = y.shape[2], y.shape[3]
    for row in prange(batch * out_h):
        b = row // out_h
        oy = row % out_h
        window = np.empty((n_planes, window_words), dtype=np.uint64)
        pair_counts = np.empty((m_planes, n_planes), dtype=np.int64)
        for ox in range(out_w):
            t = 0
            for ky in range(kh):
                iy = oy * stride_h + ky * dilation_h
                for kx in range(kw):
                    ix = ox * stride_w + kx * dilation_w
                    for w in range(n_words):
                        for j in range(n_planes):
                            window[j, t] = planes[j, b, iy, ix, w]
                        t += 1
            act_term = 0.0
            for j in range(n_planes):
                ones = 0
                for t in range(window_words):
                    ones += popcount64(window[j, t])
                act_term += steps[j] * ones
            for o in range(out_channels):
                for k in range(m_planes):
                    for j in range(n_planes):
                        total = 0
                        for t in range(window_words):
                            total += popcount64(flat_weights[k, o, t] & window[j, t])
                        pair_counts[k, j] = total
                acc = constant[o] + lowest_weight[o] * act_term
                for k in range(m_planes):
                    for j in range(n_planes):
                        acc += pair_scales[k, j, o] * pair_counts[k, j]
                y[b, o, oy, ox] = acc


def _conv_cost(node, input_shapes, output_shapes):
    p = node.params
    m, out_channels, kh, kw, _ = p["weight_planes"].shape
    n = p["act_steps"].shape[0]
    in_channels = node.attrs["in_channels"]
    outputs = int(np.prod(output_shapes[0][1:]))
    macs = outputs * in_channels * kh * kw
    quantizer = n * int(np.prod(input_shapes[0][1:]))  # one comparison per input element and plane
    combine = outputs * (2 * (m * n + 1) + 1)
    return Cost(
        flops=quantizer + combine,
        bops=m * n * macs,
        float_flops=2 * macs + outputs,
        float32_params=out_channels * in_channels * kh * kw + out_channels,
    )


# ---- PALinear -----------------------------------------------------------------------------

def _as_conv_input(x):
    return x.reshape(x.shape[0], x.shape[1], 1, 1)


def _linear_infer_shapes(node, input_shapes):
    _attrs.expect_arity(node, 1)
    _attrs.expect_rank(node, 0, input_shapes[0], 2)
    p = _params(node)
    _, out_channels, kh, kw, _ = p["weight_planes"].shape
    if (kh, kw) != (1, 1) or input_shapes[0][1] != node.attrs["in_channels"]:
        raise GraphError(
            f"node {node.name!r} (PALinear): expects 1x1 weight planes and {node.attrs['in_channels']} "
            f"input features, found {kh}x{kw} and {input_shapes[0][1]}"
        )
    return [(None, out_channels)]


def _linear_reference(node, inputs):
    (y,) = _conv_reference(node, [_as_conv_input(inputs[0])])
    return [y[:, :, 0, 0]]


def _linear_make_kernel(node):
    conv_kernel = _conv_make_kernel(node)

    def run(inputs):
        (y,) = conv_kernel([_as_conv_input(inputs[0])])
        return [y[:, :, 0, 0]]

    return run


register(Op("PAConv", "multi-base binary 2-D convolution (M weight x N activation bit-planes)",
            _conv_infer_shapes, _conv_reference, _conv_make_kernel, _conv_cost))
register(Op("PALinear", "multi-base binary fully connected layer",
            _linear_infer_shapes, _linear_reference, _linear_make_kernel, _conv_cost))
