"""ReduceMean, ReduceSum and ReduceMax over non-batch axes.

    y = mean / sum / max of x over `axes`
attrs: axes (distinct non-batch axes, >= 1), keepdims (0 or 1: keep the reduced axes as size 1).
The kernels accumulate sums in float64 so the result does not depend on the reduced size's
rounding, then round once to float32.
"""
import numpy as np

from ..errors import GraphError
from . import _attrs
from .registry import Cost, Op, register

_FUNCTIONS = {"ReduceMean": np.mean, "ReduceSum": np.sum, "ReduceMax": np.max}


def _axes(node, rank):
    axes = node.attrs.get("axes")
    if (not isinstance(axes, list) or not axes
            or not all(isinstance(a, int) and not isinstance(a, bool) and 1 <= a < rank for a in axes)
            or len(set(axes)) != len(axes)):
        raise GraphError(f"node {node.name!r} ({node.op}): attribute 'axes' must be distinct non-batch axes in "
                         f"1..{rank - 1}, found {axes!r}")
    keepdims = node.attrs.get("keepdims", 1)
    if keepdims not in (0, 1):
        raise GraphError(f"node {node.name!r} ({node.op}): keepdims must be 0 or 1, found {keepdims!r}")
    return tuple(sorted(axes)), bool(keepdims)


def infer_shapes(node, input_shapes):
    _attrs.expect_arity(node, 1)
    shape = input_shapes[0]
    axes, keepdims = _axes(node, len(shape))
    if keepdims:
        return [tuple(1 if i in axes else d for i, d in enumerate(shape))]
    return [tuple(d for i, d in enumerate(shape) if i not in axes)]


def reference(node, inputs):
    axes, keepdims = _axes(node, inputs[0].ndim)
    return [_FUNCTIONS[node.op](inputs[0], axis=axes, keepdims=keepdims)]


def make_kernel(node):
    function = _FUNCTIONS[node.op]

    def run(inputs):
        x = np.asarray(inputs[0], dtype=np.float32)
        axes, keepdims = _axes(node, x.ndim)
        if node.op == "ReduceMax":
            return [function(x, axis=axes, keepdims=keepdims)]
        return [function(x, axis=axes, keepdims=keepdims, dtype=np.float64).astype(np.float32)]

    return run


def cost(node, input_shapes, output_shapes):
    flops = int(np.prod(input_shapes[0][1:]))
    return Cost(flops=flops, float_flops=flops)


register(Op("ReduceMean", "mean over non-batch axes", infer_shapes, reference, make_kernel, cost,
            attributes=("axes", "keepdims")))
register(Op("ReduceSum", "sum over non-batch axes", infer_shapes, reference, make_kernel, cost,
            attributes=("axes", "keepdims")))
register(Op("ReduceMax", "max over non-batch axes", infer_shapes, reference, make_kernel, cost,
            attributes=("axes", "keepdims")))
