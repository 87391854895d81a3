"""ChannelAffine: y = x * scale[c] + shift[c] over channel axis 1 (an inference BatchNorm).

params: scale float32 [C], shift float32 [C]. The converter's fold_batchnorm pass folds it into a
preceding Conv or Gemm where it can; the op runs the rest (for example a BatchNorm before a conv).
"""
import numpy as np

from . import _attrs
from .registry import Cost, Op, register


def _params(node, channels=None):
    scale = _attrs.param(node, "scale", np.float32, 1)
    shift = _attrs.param(node, "shift", np.float32, 1)
    _attrs.expect_shape(node, "shift", shift.shape, scale.shape)
    if channels is not None:
        _attrs.expect_shape(node, "scale", scale.shape, (channels,))
    return scale, shift


def _broadcast(array, ndim):
    return array.reshape((1, -1) + (1,) * (ndim - 2))


def infer_shapes(node, input_shapes):
    _attrs.expect_arity(node, 1)
    if len(input_shapes[0]) < 2:
        _attrs.expect_rank(node, 0, input_shapes[0], 2)
    _params(node, input_shapes[0][1])
    return [input_shapes[0]]


def reference(node, inputs):
    scale, shift = (a.astype(np.float64) for a in _params(node))
    x = inputs[0]
    return [x * _broadcast(scale, x.ndim) + _broadcast(shift, x.ndim)]


def make_kernel(node):
    scale, shift = _params(node)

    def run(inputs):
        x = inputs[0]
        return [(x * _broadcast(scale, x.ndim) + _broadcast(shift, x.ndim)).astype(np.float32, copy=False)]

    return run


def cost(node, input_shapes, output_shapes):
    flops = 2 * int(np.prod(input_shapes[0][1:]))
    return Cost(flops=flops, float_flops=flops, float32_params=2 * node.params["scale"].size)


register(Op("ChannelAffine", "per-channel x * scale + shift (inference BatchNorm)",
            infer_shapes, reference, make_kernel, cost, parameters=("scale", "shift")))
