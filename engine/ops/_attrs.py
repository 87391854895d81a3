"""Validation helpers shared by the op modules: they raise GraphError naming the node.

Size limits. A graph (from a .pab file or a converter) must stay within these, so that a crafted
file cannot make shape inference, `make_kernel` or `Session.run` allocate unbounded memory:

- MAX_RANK: rank of every tensor, batch axis included (and of every parameter array).
- MAX_DIMENSION: every tensor dimension, every geometry attribute (kernel sizes, strides, pads,
  dilations) and every zero-padded spatial size.
- MAX_SAMPLE_ELEMENTS: elements of one sample of any tensor, and of the zero-padded input a
  convolution works on (2**28 float32 values = 1 GiB).
"""
import math

import numpy as np

from ..errors import GraphError

MAX_RANK = 8
MAX_DIMENSION = 1 << 24
MAX_SAMPLE_ELEMENTS = 1 << 28


def is_int(value):
    """True for a JSON/Python integer (bool excluded: JSON true is not 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value):
    """True for a JSON number (not a bool) that is a finite float64."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float64's range
        return False


def int_attr(node, key, default, minimum, maximum=MAX_DIMENSION):
    """Attribute `key` as one int in minimum..maximum."""
    value = node.attrs.get(key, default)
    if not is_int(value) or not minimum <= value <= maximum:
        raise GraphError(
            f"node {node.name!r} ({node.op}): attribute {key!r} must be an int in {minimum}..{maximum}, "
            f"found {value!r}"
        )
    return value


def int_list(node, key, length, minimum, default=None, maximum=MAX_DIMENSION):
    """Attribute `key` as a list of `length` ints in minimum..maximum."""
    value = node.attrs.get(key, default)
    if value is None:
        raise GraphError(f"node {node.name!r} ({node.op}): missing attribute {key!r}")
    if (
        not isinstance(value, (list, tuple))
        or len(value) != length
        or not all(is_int(v) and minimum <= v <= maximum for v in value)
    ):
        raise GraphError(
            f"node {node.name!r} ({node.op}): attribute {key!r} must be {length} ints in {minimum}..{maximum}, "
            f"found {value!r}"
        )
    return list(value)


def sample_elements(shape):
    """Elements of one sample of a tensor of shape (None, ...), as an exact Python int."""
    return math.prod(shape[1:])


def param(node, key, dtype, ndim):
    """Parameter array `key`, checked for dtype, rank, emptiness and (floats) NaN/Inf."""
    if key not in node.params:
        raise GraphError(f"node {node.name!r} ({node.op}): missing parameter {key!r}")
    array = node.params[key]
    if not isinstance(array, np.ndarray) or array.dtype != np.dtype(dtype) or array.ndim != ndim:
        found = f"{array.dtype}{list(array.shape)}" if isinstance(array, np.ndarray) else type(array).__name__
        raise GraphError(
            f"node {node.name!r} ({node.op}): parameter {key!r} must be a {ndim}-d {np.dtype(dtype)} "
            f"array, found {found}"
        )
    if array.size == 0:
        raise GraphError(f"node {node.name!r} ({node.op}): parameter {key!r} is empty (shape {list(array.shape)})")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise GraphError(f"node {node.name!r} ({node.op}): parameter {key!r} holds NaN or Inf")
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
    """Output size of a convolution or pooling window along one axis (at least 1)."""
    if size + pad_before + pad_after > MAX_DIMENSION:
        raise GraphError(
            f"node {node.name!r} ({node.op}): input size {size} with pads {pad_before},{pad_after} exceeds "
            f"the limit of {MAX_DIMENSION}"
        )
    span = dilation * (kernel - 1) + 1
    out = (size + pad_before + pad_after - span) // stride + 1
    if out < 1:
        raise GraphError(
            f"node {node.name!r} ({node.op}): kernel span {span} does not fit input size {size} "
            f"with pads {pad_before},{pad_after}"
        )
    return out
