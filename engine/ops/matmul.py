"""MatMul: matrix product with numpy broadcasting of the leading (stack) axes, y = a @ b.

    inputs [a, b]          -> a @ b        (same rank >= 3; the batch is the first stack axis)
    inputs [a], constant c -> a @ c, or c @ a when attr constant_first is 1
params (constant form): constant float32 of rank >= 1, broadcast against the input's stack axes
without reaching its batch axis. A rank-2 input [batch, K] times a [K, O] constant is a linear
layer without bias; the converter writes it as Gemm, which the binarization passes know.
"""
import numpy as np

from ..errors import GraphError
from .binary_elementwise import node_operands, operand_pair, per_sample_broadcast
from .registry import Cost, Op, register


def matmul_shape(a, b):
    """numpy.matmul's output shape for operand shapes a and b (raises ValueError if they do not fit)."""
    if not a or not b:
        raise ValueError("matmul operands must have rank >= 1")
    a_vector, b_vector = len(a) == 1, len(b) == 1
    a = (1,) + tuple(a) if a_vector else tuple(a)
    b = tuple(b) + (1,) if b_vector else tuple(b)
    if a[-1] != b[-2]:
        raise ValueError("inner dimensions differ")
    shape = np.broadcast_shapes(a[:-2], b[:-2]) + (a[-2], b[-1])
    if b_vector:
        shape = shape[:-1]
    if a_vector:
        shape = shape[:-2] + shape[-1:]
    return shape


def _infer_shapes(node, input_shapes):
    operands = node_operands(node)
    if isinstance(operands, str):
        if len(input_shapes[0]) != len(input_shapes[1]) or len(input_shapes[0]) < 3:
            raise GraphError(f"node {node.name!r} (MatMul): two input tensors must have the same rank >= 3 (batch, "
                             f"stack axes, matrix), found {list(input_shapes[0])} and {list(input_shapes[1])}")
        shapes = input_shapes
    elif node.attrs.get("constant_first", 0):
        shapes = [operands.shape, input_shapes[0]]
    else:
        shapes = [input_shapes[0], operands.shape]
    return [per_sample_broadcast(node, matmul_shape, shapes, "matrix operands")]


def _reference(node, inputs):
    a, b = operand_pair(node, inputs, np.float64)
    return [np.matmul(a, b)]


def _make_kernel(node):
    def run(inputs):
        a, b = operand_pair(node, [np.asarray(x, dtype=np.float32) for x in inputs], np.float32)
        return [np.matmul(a, b, dtype=np.float32)]
    return run


def _cost(node, input_shapes, output_shapes):
    operands = node_operands(node)
    if isinstance(operands, str):
        inner = input_shapes[0][-1]
    elif node.attrs.get("constant_first", 0):
        inner = operands.shape[-1]
    else:
        inner = operands.shape[0] if operands.ndim == 1 else operands.shape[-2]
    macs = int(np.prod(output_shapes[0][1:])) * int(inner)
    params = 0 if isinstance(operands, str) else int(operands.size)
    return Cost(flops=2 * macs, float_flops=2 * macs, float32_params=params)


register(Op("MatMul", "a @ b with broadcast stack axes (b a tensor or a constant)", _infer_shapes, _reference,
            _make_kernel, _cost, uses_blas=True, attributes=("constant_first",), parameters=("constant",)))
