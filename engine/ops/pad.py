"""Pad: pad the non-batch axes of a tensor.

    y = pad(x, pads, mode, value)
attrs: pads [begin_1, ..., begin_{r-1}, end_1, ..., end_{r-1}] (ints >= 0, one pair per non-batch
axis), mode "constant" (fill with value), "reflect" (mirror without repeating the edge), "edge"
(repeat the edge) or "wrap" (periodic), value (a number, constant mode).
"""
import numpy as np

from ..errors import GraphError
from . import _attrs
from .registry import Cost, Op, register

MODES = ("constant", "reflect", "edge", "wrap")


def _geometry(node, input_shape):
    """(numpy pad widths, mode, value), validated against the input shape."""
    rank = len(input_shape)
    pads = _attrs.int_list(node, "pads", 2 * (rank - 1), 0)
    mode = node.attrs.get("mode", "constant")
    if mode not in MODES:
        raise GraphError(f"node {node.name!r} (Pad): mode {mode!r} is not supported; supported: {MODES}")
    value = node.attrs.get("value", 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GraphError(f"node {node.name!r} (Pad): value must be a number, found {value!r}")
    widths = [(0, 0)] + list(zip(pads[: rank - 1], pads[rank - 1:]))
    if mode == "reflect" and any(max(w) >= d for w, d in zip(widths[1:], input_shape[1:])):
        raise GraphError(f"node {node.name!r} (Pad): reflect pads {pads} must be smaller than the axes "
                         f"{list(input_shape[1:])}")
    if mode == "wrap" and any(max(w) > d for w, d in zip(widths[1:], input_shape[1:])):
        raise GraphError(f"node {node.name!r} (Pad): wrap pads {pads} must not exceed the axes {list(input_shape[1:])}")
    return widths, mode, float(value)


def infer_shapes(node, input_shapes):
    _attrs.expect_arity(node, 1)
    widths, _, _ = _geometry(node, input_shapes[0])
    return [(None,) + tuple(d + before + after for d, (before, after) in zip(input_shapes[0][1:], widths[1:]))]


def _pad(node, x):
    widths, mode, value = _geometry(node, x.shape)
    if mode == "constant":
        return np.pad(x, widths, mode="constant", constant_values=value)
    return np.pad(x, widths, mode=mode)


def make_kernel(node):
    return lambda inputs: [_pad(node, np.asarray(inputs[0], dtype=np.float32)).astype(np.float32, copy=False)]


def cost(node, input_shapes, output_shapes):
    return Cost()


register(Op("Pad", "pad non-batch axes (constant, reflect, edge, wrap)", infer_shapes,
            lambda node, inputs: [_pad(node, inputs[0])], make_kernel, cost,
            attributes=("pads", "mode", "value")))
