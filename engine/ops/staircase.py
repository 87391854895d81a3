"""Staircase: a per-channel activation quantizer in float (the Qa of PAConv, on its own).

    y[:, c] = lowest + sum_j steps[j] * (x[:, c] >= thresholds[j, c])

params: thresholds float32 [N, C] (C = axis 1 of the input), steps float32 [N], lowest float32 [1].
The input has rank >= 2 and keeps its shape. NaN compares false: it becomes the lowest level.
Converters make it from already binary (or few-level) activations: ONNX Sign,
Where(Greater(x, t), a, b), QuantizeLinear [-> Clip] -> DequantizeLinear of at most 16 levels and
QONNX BipolarQuant (converters/onnx_ops_binary.py, onnx_ops_quantize.py); `converters/binary_import.py` folds it into the PAConv/PALinear
that reads it. Kernel and reference sum the levels in float64 and round once to float32.
"""
import numpy as np

from ..errors import GraphError
from . import _attrs
from .pa_conv import act_quantize
from .registry import Cost, Op, register


def _params(node):
    thresholds = _attrs.param(node, "thresholds", np.float32, 2)
    steps = _attrs.param(node, "steps", np.float32, 1)
    lowest = _attrs.param(node, "lowest", np.float32, 1)
    _attrs.expect_shape(node, "steps", steps.shape, (thresholds.shape[0],))
    _attrs.expect_shape(node, "lowest", lowest.shape, (1,))
    for key, value in (("thresholds", thresholds), ("steps", steps), ("lowest", lowest)):
        if not np.all(np.isfinite(value)):
            raise GraphError(f"node {node.name!r} (Staircase): parameter {key!r} holds NaN or Inf")
    return thresholds, steps, lowest


def infer_shapes(node, input_shapes):
    _attrs.expect_arity(node, 1)
    shape = input_shapes[0]
    thresholds, _, _ = _params(node)
    if len(shape) < 2 or shape[1] != thresholds.shape[1]:
        raise GraphError(f"node {node.name!r} (Staircase): expects an input [batch, {thresholds.shape[1]}, ...] "
                         f"(one threshold column per channel), found {list(shape)}")
    return [shape]


def reference(node, inputs):
    return [act_quantize(inputs[0], *_params(node))]


def make_kernel(node):
    thresholds, steps, lowest = _params(node)
    return lambda inputs: [act_quantize(np.asarray(inputs[0], dtype=np.float32), thresholds, steps,
                                        lowest).astype(np.float32)]


def cost(node, input_shapes, output_shapes):
    flops = 2 * node.params["steps"].shape[0] * int(np.prod(output_shapes[0][1:]))  # compare, add per plane
    return Cost(flops=flops, float_flops=flops)


register(Op("Staircase", "per-channel activation quantizer lowest + sum_j steps[j] * (x >= thresholds[j, c])",
            infer_shapes, reference, make_kernel, cost, parameters=("thresholds", "steps", "lowest")))
