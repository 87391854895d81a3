"""Validation helpers shared by the op modules: they raise GraphError naming the node."""
import numpy as np

from ..errors import GraphError


def int_list(node, key, length, minimum, default=None):
    """Attribute `key` as a list of `length` ints >= minimum."""
    value = node.attrs.get(key, default)
    if value is None:
        raise GraphError(f"node {node.name!r} ({node.op}): missing attribute {key!r}")
    if (
        not isinstance(value, (list, tuple))
        or len(value) != length
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value)
    ):
        raise GraphError(
            f"node {node.name!r} ({node.op}): attribute {key!r} must be {length} ints >= {minimum}, "
            f"found {value!r}"
        )
    return list(value)


def param(node, key, dtype, ndim):
    """Parameter array `key`, checked for dtype and rank."""
    if key not in node.params:
        raise GraphError(f"node {node.name!r} ({node.op}): missing parameter {key!r}")
    array = node.params[key]
    if not isinstance(array, np.ndarray) or array.dtype != np.dtype(dtype) or array.ndim != ndim:
        found = f"{array.dtype}{list(array.shape)}" if isinstance(array, np.ndarray) else type(array).__name__
        raise GraphError(
            f"node {node.name!r} ({node.op}): parameter {key!r} must be a {ndim}-d {np.dtype(dtype)} "
            f"array, found {found}"
        )
    return array


def expect_shape(node, what, found, expected):
    if tuple(found) != tuple(expected):
        raise GraphError(
            f"node {node.name!r} ({node.op}): {what} must have shape {list(expected)}, found {list(found)}"
        )


def expect_rank(node, index, shape, rank):
    if len(shape) != rank:
        raise GraphError(
            f"node {node.name!r} ({node.op}): input {index} must have rank {rank}, found shape {list(shape)}"
        )


def expect_arity(node, n_inputs, n_outputs=1):
    if len(node.inputs) != n_inputs or len(node.outputs) != n_outputs:
        raise GraphError(
            f"node {node.name!r} ({node.op}): expects {n_inputs} input(s) and {n_outputs} output(s), "
            f"found {len(node.inputs)} and {len(node.outputs)}"
        )


def conv_output_size(node, size, kernel, stride, pad_before, pad_after, dilation):
    span = dilation * (kernel - 1) + 1
    out = (size + pad_before + pad_after - span) // stride + 1
    if out < 1:
        raise GraphError(
            f"node {node.name!r} ({node.op}): kernel span {span} does not fit input size {size} "
            f"with pads {pad_before},{pad_after}"
        )
    return out
