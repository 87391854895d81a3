"""DynamicConv: 2-D convolution with one weight set per sample (NCHW),
    y[b] = conv(W[b], x[b]) + bias,
the per-sample dynamic convolution of ODConv / CondConv / modulated convs, whose weights are
computed from the input at run time (converters/dynamic_weights.py makes it from their exported
batch-folded grouped Conv).

inputs: x float32 [B, C, H, W]; w float32 [B, O, C/group, kh, kw], the weights of each sample.
attrs: strides [2], pads [top, left, bottom, right], dilations [2], group (per sample, as Conv).
params: bias float32 [O] (optional; absent means no bias).
The weights are not constants, so the layer stays float (it is never binarized).
"""
import numpy as np

from ..errors import GraphError
from . import _attrs
from .conv import conv_geometry, grouped_window_products, window_view
from .registry import Cost, Op, register


def _bias(node, out_channels):
    if "bias" not in node.params:
        return None
    bias = _attrs.param(node, "bias", np.float32, 1)
    _attrs.expect_shape(node, "bias", bias.shape, (out_channels,))
    return bias


def _group(node, in_channels, weight_shape):
    """The per-sample group count, checked against C and the weight shape [None, O, C/group, kh, kw]."""
    group = node.attrs.get("group", 1)
    out_channels = weight_shape[1]
    if not _attrs.is_int(group) or group < 1 or in_channels % group or out_channels % group:
        raise GraphError(
            f"node {node.name!r} (DynamicConv): group must divide input channels {in_channels} and output "
            f"channels {out_channels}, found {group!r}"
        )
    expected = (None, out_channels, in_channels // group) + tuple(weight_shape[3:])
    _attrs.expect_shape(node, f"weight input (for {in_channels} input channels, group {group})", weight_shape, expected)
    return group


def infer_shapes(node, input_shapes):
    _attrs.expect_arity(node, 2)
    x_shape, weight_shape = input_shapes
    _attrs.expect_rank(node, 0, x_shape, 4)
    _attrs.expect_rank(node, 1, weight_shape, 5)
    _group(node, x_shape[1], weight_shape)
    _bias(node, weight_shape[1])
    _, _, _, (out_h, out_w) = conv_geometry(node, x_shape, weight_shape[3:])
    return [(None, weight_shape[1], out_h, out_w)]


def _check_batches(node, x, weight):
    if x.shape[0] != weight.shape[0]:
        raise GraphError(f"node {node.name!r} (DynamicConv): the input has batch {x.shape[0]} and the weight input "
                         f"batch {weight.shape[0]}; expected one weight set per sample")


def reference(node, inputs):
    """Direct convolution in float64, one kernel tap at a time, each sample with its own weights."""
    x, weight = inputs
    _check_batches(node, x, weight)
    group = node.attrs.get("group", 1)
    strides, pads, dilations, _ = conv_geometry(node, x.shape, weight.shape[3:])
    windows = window_view(x, weight.shape[3:], strides, pads, dilations)
    y = grouped_window_products(windows, weight, group, "bcijhw,bocij->bohw")
    bias = _bias(node, weight.shape[1])
    return [y if bias is None else y + bias.astype(np.float64)[None, :, None, None]]


def make_kernel(node):
    group = node.attrs.get("group", 1)

    def run(inputs, out=None):
        x, weight = inputs
        _check_batches(node, x, weight)
        batch, out_channels, per_group_in, kh, kw = weight.shape
        per_group_out = out_channels // group
        bias = _bias(node, out_channels)
        strides, pads, dilations, (out_h, out_w) = conv_geometry(node, x.shape, (kh, kw))
        if out is None:
            out = np.empty((batch, out_channels, out_h, out_w), dtype=np.float32)
        y = out.reshape(batch, out_channels, out_h * out_w)
        # One sample at a time: im2col + GEMM as in Conv (engine/ops/conv.py), with that sample's
        # weights; the scratch space stays that of one sample whatever the batch.
        for b in range(batch):
            windows = window_view(x[b : b + 1], (kh, kw), strides, pads, dilations)
            for g in range(group):
                columns = windows[0, g * per_group_in : (g + 1) * per_group_in].reshape(
                    per_group_in * kh * kw, out_h * out_w
                )
                matrix = weight[b, g * per_group_out : (g + 1) * per_group_out].reshape(
                    per_group_out, per_group_in * kh * kw
                )
                np.matmul(matrix, columns, out=y[b, g * per_group_out : (g + 1) * per_group_out])
        if bias is not None:
            y += bias[None, :, None]
        return [out]

    return run


def cost(node, input_shapes, output_shapes):
    """2 * MACs (+ one add per output for the bias); the weights are inputs, so no parameters
    but the bias."""
    macs = int(np.prod(output_shapes[0][1:])) * int(np.prod(input_shapes[1][2:]))
    bias = node.params.get("bias")
    flops = 2 * macs + (int(np.prod(output_shapes[0][1:])) if bias is not None else 0)
    return Cost(flops=flops, float_flops=flops, float32_params=0 if bias is None else int(bias.size))


register(Op("DynamicConv", "float 2-D convolution with per-sample run-time weights [B, O, C/group, kh, kw]",
            infer_shapes, reference, make_kernel, cost, output_buffer=True, uses_blas=True,
            attributes=("strides", "pads", "dilations", "group"), parameters=("bias",)))
