"""Gemm: full-precision fully connected layer, y = x @ W^T + b.

params: weight float32 [O, C], bias float32 [O]. Input [batch, C], output [batch, O].
"""
import numpy as np

from ..errors import GraphError
from . import _attrs
from .registry import Cost, Op, register


def _weights(node):
    weight = _attrs.param(node, "weight", np.float32, 2)
    bias = _attrs.param(node, "bias", np.float32, 1)
    _attrs.expect_shape(node, "bias", bias.shape, (weight.shape[0],))
    return weight, bias


def infer_shapes(node, input_shapes):
    _attrs.expect_arity(node, 1)
    _attrs.expect_rank(node, 0, input_shapes[0], 2)
    weight, _ = _weights(node)
    if weight.shape[1] != input_shapes[0][1]:
        raise GraphError(f"node {node.name!r} (Gemm): needs {weight.shape[1]} input features (its weight is "
                         f"{list(weight.shape)}), found {input_shapes[0][1]}")
    return [(None, weight.shape[0])]


def reference(node, inputs):
    weight, bias = _weights(node)
    return [inputs[0] @ weight.astype(np.float64).T + bias.astype(np.float64)]


def make_kernel(node):
    weight, bias = _weights(node)
    weight_t = np.ascontiguousarray(weight.T)

    def run(inputs):
        return [np.asarray(inputs[0], dtype=np.float32) @ weight_t + bias]

    return run


def cost(node, input_shapes, output_shapes):
    weight, _ = _weights(node)
    flops = 2 * weight.size + weight.shape[0]
    return Cost(flops=flops, float_flops=flops, float32_params=weight.size + weight.shape[0])


register(Op("Gemm", "float fully connected layer, x @ W^T + b", infer_shapes, reference, make_kernel, cost,
            uses_blas=True, parameters=("weight", "bias")))
