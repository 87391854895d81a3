"""Mul, Sub and Div: elementwise arithmetic with numpy broadcasting, per sample.

The second operand is either a second input tensor or a constant:
    inputs [a, b]          -> a (op) b         (same rank; the batch axes line up)
    inputs [a], constant c -> a (op) c, or c (op) a when attr constant_first is 1
params (constant form): constant float32, any shape that broadcasts against the input without
reaching its batch axis (rank below the input's, or size 1 on the batch axis).

`per_sample_broadcast` is the batch-axis rule shared with MatMul: a shape computation is run
twice with two sizes for the batch, and it must send the batch to axis 0 of the output both
times; any broadcast that mixes the batch with another axis fails this check.
"""
import numpy as np

from ..errors import GraphError
from .registry import Cost, Op, register

# Two batch sizes no real tensor dimension equals: a shape rule that is correct for both keeps the
# batch on its own axis.
_PROBE_BATCHES = (1000003, 1000033)


def per_sample_broadcast(node, shape_rule, input_shapes, what):
    """Output shape (None, ...) of shape_rule(*shapes) where each shape in input_shapes has None
    (the batch) first or is a constant's shape (all ints). Raises GraphError naming the node."""
    results = []
    for batch in _PROBE_BATCHES:
        shapes = [tuple(batch if d is None else d for d in shape) for shape in input_shapes]
        try:
            results.append(tuple(shape_rule(*shapes)))
        except ValueError:
            results.append(None)
    first, second = results
    if (first is None or second is None or not first or first[0] != _PROBE_BATCHES[0]
            or second[0] != _PROBE_BATCHES[1] or first[1:] != second[1:]):
        found = ", ".join(str(["batch" if d is None else d for d in shape]) for shape in input_shapes)
        raise GraphError(f"node {node.name!r} ({node.op}): {what} of shapes {found} do not combine per sample "
                         "(the batch axis must stay axis 0 and not broadcast against another axis)")
    return (None,) + first[1:]


def node_operands(node):
    """'tensors' (two inputs) or the constant array (one input)."""
    if len(node.outputs) != 1 or len(node.inputs) not in (1, 2):
        raise GraphError(f"node {node.name!r} ({node.op}): expects 1 input and a constant, or 2 inputs, and 1 "
                         f"output; found {len(node.inputs)} and {len(node.outputs)}")
    if len(node.inputs) == 2:
        if "constant" in node.params:
            raise GraphError(f"node {node.name!r} ({node.op}): two inputs and a constant; expected one or the other")
        return "tensors"
    constant = node.params.get("constant")
    if not isinstance(constant, np.ndarray) or constant.dtype != np.float32:
        raise GraphError(f"node {node.name!r} ({node.op}): with one input, parameter 'constant' must be a float32 array")
    if node.attrs.get("constant_first", 0) not in (0, 1):
        raise GraphError(f"node {node.name!r} ({node.op}): constant_first must be 0 or 1")
    return constant


def _infer_shapes(node, input_shapes):
    operands = node_operands(node)
    if isinstance(operands, str):
        if len(input_shapes[0]) != len(input_shapes[1]):
            raise GraphError(f"node {node.name!r} ({node.op}): inputs must have the same rank, found "
                             f"{list(input_shapes[0])} and {list(input_shapes[1])}")
        shapes = input_shapes
    else:
        shapes = [input_shapes[0], operands.shape]
    return [per_sample_broadcast(node, np.broadcast_shapes, shapes, "operands")]


_FUNCTIONS = {"Mul": np.multiply, "Sub": np.subtract, "Div": np.divide}


def operand_pair(node, inputs, float_type):
    operands = node_operands(node)
    if isinstance(operands, str):
        return inputs[0], inputs[1]
    constant = operands.astype(float_type)
    return (constant, inputs[0]) if node.attrs.get("constant_first", 0) else (inputs[0], constant)


def _reference(node, inputs):
    a, b = operand_pair(node, inputs, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return [_FUNCTIONS[node.op](a, b)]


def _make_kernel(node):
    function = _FUNCTIONS[node.op]

    def run(inputs):
        a, b = operand_pair(node, [np.asarray(x, dtype=np.float32) for x in inputs], np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            return [function(a, b, dtype=np.float32)]

    return run


def _cost(node, input_shapes, output_shapes):
    flops = int(np.prod(output_shapes[0][1:]))
    params = int(node.params["constant"].size) if "constant" in node.params else 0
    return Cost(flops=flops, float_flops=flops, float32_params=params)


register(Op("Mul", "a * b, broadcast per sample (b a tensor or a constant)", _infer_shapes, _reference, _make_kernel, _cost,
            attributes=("constant_first",), parameters=("constant",)))
register(Op("Sub", "a - b, broadcast per sample (b a tensor or a constant)", _infer_shapes, _reference, _make_kernel, _cost,
            attributes=("constant_first",), parameters=("constant",)))
register(Op("Div", "a / b, broadcast per sample (b a tensor or a constant)", _infer_shapes, _reference, _make_kernel, _cost,
            attributes=("constant_first",), parameters=("constant",)))
