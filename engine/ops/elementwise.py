"""Relu, Add, Softmax, Flatten and Reshape.

Add broadcasts like numpy (the batch axis included). Softmax attrs: axis (>= 1; the batch axis
is never normalized over). Flatten keeps the batch and flattens the rest. Reshape attrs: shape,
the per-sample target shape (batch excluded, one entry may be -1).
"""
import numpy as np

from ..errors import GraphError
from . import _attrs
from .registry import Cost, Op, register


def _elements(shape):
    return int(np.prod(shape[1:]))


def _unary_infer_shapes(node, input_shapes):
    _attrs.expect_arity(node, 1)
    return [input_shapes[0]]


def _unary_cost(node, input_shapes, output_shapes):
    flops = _elements(output_shapes[0])
    return Cost(flops=flops, float_flops=flops)


def _free_cost(node, input_shapes, output_shapes):
    return Cost()


# ---- Relu -----------------------------------------------------------------------------------

def _relu_reference(node, inputs):
    return [np.maximum(inputs[0], 0.0)]


def _relu_make_kernel(node):
    return lambda inputs: [np.maximum(inputs[0], np.float32(0.0))]


# ---- Add ------------------------------------------------------------------------------------

def _add_infer_shapes(node, input_shapes):
    _attrs.expect_arity(node, 2)
    a, b = input_shapes
    try:
        shape = np.broadcast_shapes((1,) + tuple(a[1:]), (1,) + tuple(b[1:]))
    except ValueError:
        raise GraphError(f"node {node.name!r} (Add): shapes {list(a)} and {list(b)} do not broadcast") from None
    if len(a) != len(b):
        raise GraphError(f"node {node.name!r} (Add): inputs must have the same rank, found {list(a)} and {list(b)}")
    return [(None,) + tuple(shape[1:])]


def _add_reference(node, inputs):
    return [inputs[0] + inputs[1]]


def _add_make_kernel(node):
    return lambda inputs: [np.add(inputs[0], inputs[1], dtype=np.float32)]


# ---- Softmax --------------------------------------------------------------------------------

def _softmax_axis(node, rank):
    axis = node.attrs.get("axis", -1)
    if not _attrs.is_int(axis) or not -rank < axis < rank or axis % rank == 0:
        raise GraphError(f"node {node.name!r} ({node.op}): axis must be a non-batch axis of rank {rank}, found {axis!r}")
    return axis % rank


def _softmax_infer_shapes(node, input_shapes):
    _attrs.expect_arity(node, 1)
    _softmax_axis(node, len(input_shapes[0]))
    return [input_shapes[0]]


def _softmax(x, axis):
    shifted = np.exp(x - x.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def _softmax_reference(node, inputs):
    return [_softmax(inputs[0], _softmax_axis(node, inputs[0].ndim))]


def _softmax_make_kernel(node):
    return lambda inputs: [_softmax(inputs[0], _softmax_axis(node, inputs[0].ndim)).astype(np.float32)]


# ---- Flatten and Reshape ----------------------------------------------------------------------

def _flatten_infer_shapes(node, input_shapes):
    _attrs.expect_arity(node, 1)
    return [(None, _elements(input_shapes[0]))]


def _flatten(node, inputs):
    return [inputs[0].reshape(inputs[0].shape[0], -1)]


def _reshape_target(node, input_shape):
    target = node.attrs.get("shape")
    if not isinstance(target, list) or len(target) >= _attrs.MAX_RANK \
            or not all(_attrs.is_int(d) and (0 < d <= _attrs.MAX_DIMENSION or d == -1) for d in target) \
            or target.count(-1) > 1:
        raise GraphError(
            f"node {node.name!r} (Reshape): attribute 'shape' must be at most {_attrs.MAX_RANK - 1} ints in "
            f"1..{_attrs.MAX_DIMENSION} with at most one -1, found {target!r}"
        )
    elements = _attrs.sample_elements(input_shape)
    known = _attrs.sample_elements([None] + [d for d in target if d != -1])
    if (-1 in target and elements % known) or (-1 not in target and known != elements):
        raise GraphError(
            f"node {node.name!r} (Reshape): cannot reshape {list(input_shape[1:])} per sample to {target}"
        )
    return tuple(elements // known if d == -1 else d for d in target)


def _reshape_infer_shapes(node, input_shapes):
    _attrs.expect_arity(node, 1)
    return [(None,) + _reshape_target(node, input_shapes[0])]


def _reshape(node, inputs):
    x = inputs[0]
    return [x.reshape((x.shape[0],) + _reshape_target(node, (None,) + x.shape[1:]))]


register(Op("Relu", "max(x, 0)", _unary_infer_shapes, _relu_reference, _relu_make_kernel, _unary_cost))
register(Op("Add", "elementwise sum with broadcasting", _add_infer_shapes, _add_reference, _add_make_kernel, _unary_cost))
register(Op("Softmax", "softmax over one non-batch axis", _softmax_infer_shapes, _softmax_reference,
            _softmax_make_kernel, _unary_cost, attributes=("axis",)))
register(Op("Flatten", "[batch, ...] -> [batch, features]", _flatten_infer_shapes, _flatten,
            lambda node: lambda inputs: _flatten(node, inputs), _free_cost))
register(Op("Reshape", "per-sample reshape, batch kept", _reshape_infer_shapes, _reshape,
            lambda node: lambda inputs: _reshape(node, inputs), _free_cost, attributes=("shape",)))
