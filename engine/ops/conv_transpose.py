"""ConvTranspose: full-precision 2-D transposed convolution (NCHW), the adjoint of Conv plus a bias.

    y[b, g*Og + o, iy*sh + ky*dh - top, ix*sw + kx*dw - left] += x[b, g*Cg + c, iy, ix] * W[g*Cg + c, o, ky, kx]
    y += bias
Output size per axis: (in - 1) * stride + dilation * (kernel - 1) + 1 + output_padding - pad_begin - pad_end.
attrs: strides [2], pads [top, left, bottom, right], dilations [2], output_padding [2], group.
params: weight float32 [C, O/group, kh, kw], bias float32 [O].
"""
import numpy as np

from ..errors import GraphError
from . import _attrs
from .registry import Cost, Op, register


def _weights(node):
    weight = _attrs.param(node, "weight", np.float32, 4)
    bias = _attrs.param(node, "bias", np.float32, 1)
    group = node.attrs.get("group", 1)
    if isinstance(group, bool) or not isinstance(group, int) or group < 1 or weight.shape[0] % group:
        raise GraphError(f"node {node.name!r} (ConvTranspose): group must be a positive int dividing the weight's "
                         f"input channels {weight.shape[0]}, found {group!r}")
    _attrs.expect_shape(node, "bias", bias.shape, (weight.shape[1] * group,))
    return weight, bias, group


def _geometry(node, input_shape, kernel_hw):
    """(strides, pads, dilations, output_padding, (out_h, out_w)), validated."""
    strides = _attrs.int_list(node, "strides", 2, 1, default=[1, 1])
    pads = _attrs.int_list(node, "pads", 4, 0, default=[0, 0, 0, 0])
    dilations = _attrs.int_list(node, "dilations", 2, 1, default=[1, 1])
    output_padding = _attrs.int_list(node, "output_padding", 2, 0, default=[0, 0])
    sizes = []
    for axis in range(2):
        if output_padding[axis] >= max(strides[axis], dilations[axis]):
            raise GraphError(f"node {node.name!r} (ConvTranspose): output_padding {output_padding} must be smaller "
                             f"than the stride or the dilation")
        size = ((input_shape[2 + axis] - 1) * strides[axis] + dilations[axis] * (kernel_hw[axis] - 1) + 1
                + output_padding[axis] - pads[axis] - pads[axis + 2])
        if size < 1:
            raise GraphError(f"node {node.name!r} (ConvTranspose): pads {pads} leave no output for input "
                             f"{list(input_shape)}")
        sizes.append(size)
    return strides, pads, dilations, output_padding, tuple(sizes)


def infer_shapes(node, input_shapes):
    _attrs.expect_arity(node, 1)
    _attrs.expect_rank(node, 0, input_shapes[0], 4)
    weight, bias, _ = _weights(node)
    if input_shapes[0][1] != weight.shape[0]:
        raise GraphError(f"node {node.name!r} (ConvTranspose): input has {input_shapes[0][1]} channels, the weight "
                         f"expects {weight.shape[0]}")
    *_, (out_h, out_w) = _geometry(node, input_shapes[0], weight.shape[2:])
    return [(None, bias.shape[0], out_h, out_w)]


def _scatter_taps(node, x, weight, contributions):
    """Sum contributions(ky, kx) -> [B, O, H, W] into the strided output positions of each tap."""
    strides, pads, dilations, _, (out_h, out_w) = _geometry(node, x.shape, weight.shape[2:])
    height, width = x.shape[2:]
    kh, kw = weight.shape[2:]
    # A buffer covering every position a tap can reach, before cropping the pads.
    full_h = max(pads[0] + out_h, (height - 1) * strides[0] + dilations[0] * (kh - 1) + 1)
    full_w = max(pads[1] + out_w, (width - 1) * strides[1] + dilations[1] * (kw - 1) + 1)
    full = None
    for ky in range(kh):
        for kx in range(kw):
            part = contributions(ky, kx)
            if full is None:
                full = np.zeros(part.shape[:2] + (full_h, full_w), dtype=part.dtype)
            top, left = ky * dilations[0], kx * dilations[1]
            full[:, :, top:top + (height - 1) * strides[0] + 1:strides[0],
                 left:left + (width - 1) * strides[1] + 1:strides[1]] += part
    return full[:, :, pads[0]:pads[0] + out_h, pads[1]:pads[1] + out_w]


def reference(node, inputs):
    """One kernel tap at a time in float64: each input pixel times the tap's weights."""
    x = inputs[0]
    weight, bias, group = _weights(node)
    weight = weight.astype(np.float64)
    per_group_in = weight.shape[0] // group

    def contributions(ky, kx):
        parts = [np.einsum("bchw,co->bohw", x[:, g * per_group_in:(g + 1) * per_group_in],
                           weight[g * per_group_in:(g + 1) * per_group_in, :, ky, kx]) for g in range(group)]
        return np.concatenate(parts, axis=1)

    return [_scatter_taps(node, x, weight, contributions) + bias.astype(np.float64)[None, :, None, None]]


def make_kernel(node):
    weight, bias, group = _weights(node)
    in_channels, per_group_out, kh, kw = weight.shape
    per_group_in = in_channels // group
    # [group, kh, kw, per_group_out, per_group_in]: one GEMM per group gives every tap's contribution.
    matrices = np.ascontiguousarray(
        weight.reshape(group, per_group_in, per_group_out, kh, kw).transpose(0, 3, 4, 2, 1)
    ).reshape(group, kh * kw * per_group_out, per_group_in)

    def run(inputs):
        x = np.asarray(inputs[0], dtype=np.float32)
        batch, _, height, width = x.shape
        columns = [np.matmul(matrices[g], x[:, g * per_group_in:(g + 1) * per_group_in].reshape(
            batch, per_group_in, height * width)).reshape(batch, kh, kw, per_group_out, height, width)
            for g in range(group)]

        def contributions(ky, kx):
            return np.concatenate([c[:, ky, kx] for c in columns], axis=1)

        y = _scatter_taps(node, x, weight, contributions) + bias[None, :, None, None]
        return [np.ascontiguousarray(y, dtype=np.float32)]

    return run


def cost(node, input_shapes, output_shapes):
    weight = node.params["weight"]
    macs = int(np.prod(input_shapes[0][1:])) * int(np.prod(weight.shape[1:]))
    flops = 2 * macs + int(np.prod(output_shapes[0][1:]))
    return Cost(flops=flops, float_flops=flops, float32_params=weight.size + node.params["bias"].size)


register(Op("ConvTranspose", "float 2-D transposed convolution (groups, stride, dilation, pads, output_padding)",
            infer_shapes, reference, make_kernel, cost, uses_blas=True,
            attributes=("strides", "pads", "dilations", "output_padding", "group"), parameters=("weight", "bias")))
