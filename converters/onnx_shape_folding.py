"""Constant folding at import: shape-computing subgraphs become constants.

Exporters compute reshape targets at run time (Shape -> Gather -> Unsqueeze -> Concat ->
Reshape). The importer knows every shape except the batch size, so these subgraphs are folded:
- a node whose inputs are all constants is evaluated once with ONNX's reference evaluator;
- Shape of a run-time tensor is a constant whose batch entry is the symbol BATCH (onnx_registry.py). A constant
  holding BATCH is a numpy object array; Gather, Concat, Unsqueeze, Squeeze, Slice, Cast,
  Identity and Reshape move the symbol around; arithmetic on it is refused, since the result
  would depend on the batch size. A Reshape whose target starts with BATCH keeps the batch.
"""
import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator

from pabnn.engine.errors import ConversionError

from .onnx_registry import BATCH, is_symbolic, onnx_converter


def _normalized(value):
    """A folded value: int64 when it holds no BATCH, else an object array."""
    value = np.asarray(value, dtype=object)
    if any(entry is BATCH for entry in value.reshape(-1)):
        return value
    return value.astype(np.int64)


def fold_constant_node(node, context):
    """Evaluate `node` if every input is a constant; record its outputs as constants.

    Returns True when the node was folded (and needs no converter).
    """
    names = [name for name in node.input if name]
    if not names or any(name not in context.constants for name in names):
        return False
    values = [context.constants[name] if name else None for name in node.input]
    if any(is_symbolic(value) for value in values):
        folder = _SYMBOLIC_FOLDERS.get(node.op_type)
        if folder is None:
            context.fail(node, "computes with the batch size (a Shape of a run-time tensor); only Gather, Concat, "
                               "Unsqueeze, Squeeze, Slice, Cast, Identity and Reshape of shapes can be folded")
        outputs = [_normalized(folder(node, context, values))]
    else:
        outputs = _evaluate(node, context, values)
    for name, value in zip(node.output, outputs):
        if name:
            context.constants[name] = value
    return True


def _evaluate(node, context, values):
    try:
        evaluator = ReferenceEvaluator(node, opsets={"": context.opset})
        feeds = {name: value for name, value in zip(node.input, values) if name}
        return [np.asarray(value) for value in evaluator.run(None, feeds)]
    except Exception as error:  # the reference evaluator raises many types on bad nodes
        raise ConversionError(f"ONNX node {node.name!r} ({node.op_type}): folding its constant inputs failed: "
                              f"{error}") from None


def _ints(node, context, value, what):
    if value is None:
        return None
    if is_symbolic(value):
        context.fail(node, f"{what} depends on the batch size")
    return [int(v) for v in np.asarray(value).reshape(-1)]


def _axes_input_or_attr(node, context, values, index, first_opset_as_input):
    if context.opset >= first_opset_as_input:
        return _ints(node, context, values[index] if len(values) > index else None, "axes")
    axes = context.attr(node, "axes")
    return None if axes is None else [int(a) for a in axes]


# ---- symbolic folders: values are numpy arrays (object dtype when they hold BATCH) ----------

def _gather(node, context, values):
    data, indices = values[0], values[1]
    return np.take(data, _ints(node, context, indices, "indices") if np.ndim(indices) else int(indices),
                   axis=int(context.attr(node, "axis", 0)))


def _concat(node, context, values):
    return np.concatenate([np.asarray(v, dtype=object) for v in values], axis=int(context.attr(node, "axis", 0)))


def _unsqueeze(node, context, values):
    axes = _axes_input_or_attr(node, context, values, 1, 13)
    rank = values[0].ndim + len(axes)
    return np.expand_dims(values[0], tuple(sorted(a % rank for a in axes)))


def _squeeze(node, context, values):
    axes = _axes_input_or_attr(node, context, values, 1, 13)
    return np.squeeze(values[0], axis=None if axes is None else tuple(a % values[0].ndim for a in axes))


def _slice(node, context, values):
    data = values[0]
    starts, ends = _ints(node, context, values[1], "starts"), _ints(node, context, values[2], "ends")
    axes = _ints(node, context, values[3], "axes") if len(values) > 3 and values[3] is not None else \
        list(range(len(starts)))
    steps = _ints(node, context, values[4], "steps") if len(values) > 4 and values[4] is not None else \
        [1] * len(starts)
    slices = [slice(None)] * data.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        slices[axis % data.ndim] = slice(start, end, step)
    return data[tuple(slices)]


def _cast(node, context, values):
    target = onnx.helper.tensor_dtype_to_np_dtype(int(context.attr(node, "to")))
    if not np.issubdtype(target, np.integer):
        context.fail(node, f"casting a shape that holds the batch size to {target} is not supported")
    return values[0]


def _identity(node, context, values):
    return values[0]


def _reshape(node, context, values):
    target = _ints(node, context, values[1], "shape")
    target = [values[0].shape[i] if d == 0 else d for i, d in enumerate(target)]
    return np.reshape(values[0], target)


_SYMBOLIC_FOLDERS = {"Gather": _gather, "Concat": _concat, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze,
                     "Slice": _slice, "Cast": _cast, "Identity": _identity, "Reshape": _reshape}


# ---- converters of ops that only exist to compute shapes --------------------------------------

@onnx_converter("Shape")
def convert_shape(node, context):
    shape = context.shapes[context.tensor(node, node.input[0])]
    start = int(context.attr(node, "start", 0))
    end = context.attr(node, "end")
    shape = shape[start:] if end is None else shape[start:int(end)]
    context.constants[node.output[0]] = _normalized([BATCH if d is None else d for d in shape])


def _constant_inputs_only(node, context):
    context.fail(node, "only constant inputs (or shapes of run-time tensors) are supported; the node is folded "
                       "at conversion")


for _op_type in ("Gather", "ConstantOfShape", "Range"):
    onnx_converter(_op_type)(_constant_inputs_only)


@onnx_converter("Cast")
def convert_cast(node, context):
    """A cast of a run-time float32 tensor to float32 is a no-op; other casts only fold."""
    if int(context.attr(node, "to")) != onnx.TensorProto.FLOAT:
        _constant_inputs_only(node, context)
    context.aliases[node.output[0]] = context.tensor(node, node.input[0])
