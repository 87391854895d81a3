"""Layout ops that move or cut data without arithmetic: Transpose, Concat, Split and Slice.

None of them may touch the batch axis (axis 0):
    Transpose  attrs: perm, a permutation of all axes with perm[0] == 0
    Concat     attrs: axis >= 1; 1 or more inputs of equal shape except on axis
    Split      attrs: axis >= 1, split (sizes per output, summing to the axis' size)
    Slice      attrs: axes (>= 1), starts, ends, steps: y = x[..., starts:ends:steps, ...] with Python
               slice semantics per axis (ends may be null: to the end of the axis in the step's
               direction); ONNX's clamping is Python's for a positive step, and the converter has
               clamped a negative step's starts/ends to these.
"""
import numpy as np

from ..errors import GraphError
from . import _attrs
from .registry import Cost, Op, register


def _free_cost(node, input_shapes, output_shapes):
    return Cost()


def _axis(node, rank, key="axis"):
    axis = node.attrs.get(key)
    if isinstance(axis, bool) or not isinstance(axis, int) or not 1 <= axis < rank:
        raise GraphError(f"node {node.name!r} ({node.op}): attribute {key!r} must be a non-batch axis in 1..{rank - 1}, "
                         f"found {axis!r}")
    return axis


# ---- Transpose ------------------------------------------------------------------------------

def _perm(node, rank):
    perm = node.attrs.get("perm")
    if not isinstance(perm, list) or not all(_attrs.is_int(axis) for axis in perm) \
            or sorted(perm) != list(range(rank)) or perm[0] != 0:
        raise GraphError(f"node {node.name!r} (Transpose): perm must be a permutation of 0..{rank - 1} that keeps "
                         f"the batch axis first, found {perm!r}")
    return perm


def _transpose_infer_shapes(node, input_shapes):
    _attrs.expect_arity(node, 1)
    shape = input_shapes[0]
    return [tuple(shape[axis] for axis in _perm(node, len(shape)))]


def _transpose(node, inputs):
    return [np.transpose(inputs[0], _perm(node, inputs[0].ndim))]


def _transpose_make_kernel(node):
    # A contiguous copy: the next kernel reads it in order.
    return lambda inputs: [np.ascontiguousarray(_transpose(node, inputs)[0], dtype=np.float32)]


register(Op("Transpose", "permute the non-batch axes", _transpose_infer_shapes, _transpose, _transpose_make_kernel,
            _free_cost, attributes=("perm",)))


# ---- Concat ---------------------------------------------------------------------------------

def _concat_infer_shapes(node, input_shapes):
    if len(node.inputs) < 1 or len(node.outputs) != 1:
        raise GraphError(f"node {node.name!r} (Concat): expects 1 or more inputs and 1 output")
    rank = len(input_shapes[0])
    axis = _axis(node, rank)
    for index, shape in enumerate(input_shapes):
        if len(shape) != rank or any(a != b for i, (a, b) in enumerate(zip(shape, input_shapes[0])) if i != axis):
            raise GraphError(f"node {node.name!r} (Concat): input {index} of shape {list(shape)} does not match "
                             f"input 0 of shape {list(input_shapes[0])} outside axis {axis}")
    total = sum(shape[axis] for shape in input_shapes)
    return [tuple(total if i == axis else d for i, d in enumerate(input_shapes[0]))]


def _concat(node, inputs):
    return [np.concatenate(inputs, axis=node.attrs["axis"])]


register(Op("Concat", "join tensors along a non-batch axis", _concat_infer_shapes, _concat,
            lambda node: lambda inputs: [np.concatenate(inputs, axis=node.attrs["axis"]).astype(np.float32, copy=False)],
            _free_cost, attributes=("axis",)))


# ---- Split ----------------------------------------------------------------------------------

def _split_infer_shapes(node, input_shapes):
    if len(node.inputs) != 1 or len(node.outputs) < 1:
        raise GraphError(f"node {node.name!r} (Split): expects 1 input and 1 or more outputs")
    shape = input_shapes[0]
    axis = _axis(node, len(shape))
    sizes = _attrs.int_list(node, "split", len(node.outputs), 1)
    if sum(sizes) != shape[axis]:
        raise GraphError(f"node {node.name!r} (Split): split sizes {sizes} do not sum to axis {axis}'s size {shape[axis]}")
    return [tuple(size if i == axis else d for i, d in enumerate(shape)) for size in sizes]


def _split(node, inputs):
    boundaries = np.cumsum(node.attrs["split"])[:-1]
    return [np.ascontiguousarray(part) for part in np.split(inputs[0], boundaries, axis=node.attrs["axis"])]


register(Op("Split", "cut a tensor into parts along a non-batch axis", _split_infer_shapes, _split,
            lambda node: lambda inputs: [part.astype(np.float32, copy=False) for part in _split(node, inputs)],
            _free_cost, attributes=("axis", "split")))


# ---- Slice ----------------------------------------------------------------------------------

def _slices(node, rank):
    """One Python slice per axis of the input (the batch axis is taken whole)."""
    axes = node.attrs.get("axes")
    if not isinstance(axes, list) or len(set(axes)) != len(axes):
        raise GraphError(f"node {node.name!r} (Slice): attribute 'axes' must be a list of distinct axes, found {axes!r}")
    starts = _attrs.int_list(node, "starts", len(axes), -(2 ** 62))
    steps = node.attrs.get("steps")
    ends = node.attrs.get("ends")
    if (not isinstance(steps, list) or len(steps) != len(axes)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s != 0 for s in steps)):
        raise GraphError(f"node {node.name!r} (Slice): attribute 'steps' must be {len(axes)} non-zero ints, found {steps!r}")
    if not isinstance(ends, list) or len(ends) != len(axes) or not all(
            e is None or (isinstance(e, int) and not isinstance(e, bool)) for e in ends):
        raise GraphError(f"node {node.name!r} (Slice): attribute 'ends' must be {len(axes)} ints or nulls, found {ends!r}")
    slices = [slice(None)] * rank
    for index, axis in enumerate(axes):
        if isinstance(axis, bool) or not isinstance(axis, int) or not 1 <= axis < rank:
            raise GraphError(f"node {node.name!r} (Slice): axes must be non-batch axes in 1..{rank - 1}, found {axes}")
        slices[axis] = slice(starts[index], ends[index], steps[index])
    return tuple(slices)


def _slice_infer_shapes(node, input_shapes):
    _attrs.expect_arity(node, 1)
    shape = input_shapes[0]
    slices = _slices(node, len(shape))
    result = (None,) + tuple(len(range(*s.indices(d))) for s, d in zip(slices[1:], shape[1:]))
    if 0 in result:
        raise GraphError(f"node {node.name!r} (Slice): the slice of {list(shape)} is empty ({list(result)})")
    return [result]


def _slice(node, inputs):
    return [inputs[0][_slices(node, inputs[0].ndim)]]


register(Op("Slice", "x[start:end:step] on non-batch axes", _slice_infer_shapes, _slice,
            lambda node: lambda inputs: [np.ascontiguousarray(_slice(node, inputs)[0], dtype=np.float32)],
            _free_cost, attributes=("axes", "starts", "ends", "steps")))
