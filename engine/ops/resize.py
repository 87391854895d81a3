"""Resize (nearest): each output position copies the input position nearest to where it maps.

Per non-batch axis with input length L, output length S (attr sizes) and scale s (attr scales):
    x_original = transform(i)      coordinate_transformation_mode:
        half_pixel            (i + 0.5) / s - 0.5
        half_pixel_symmetric  L/2 * (1 - S/(s*L)) + (i + 0.5) / s - 0.5
        pytorch_half_pixel    (i + 0.5) / s - 0.5 if S > 1 else 0
        align_corners         i * (L - 1) / (S - 1) if S > 1 else 0
        asymmetric            i / s
        tf_half_pixel_for_nearest  (i + 0.5) / s
    index = nearest_mode(x_original), clamped to 0..L-1; nearest_mode: round_prefer_floor
        (ceil(x - 0.5)), round_prefer_ceil (floor(x + 0.5)), floor, ceil.
attrs: sizes [per-sample output shape], scales [per non-batch axis], coordinate_transformation_mode,
nearest_mode. One of sizes and scales may be absent, so that the node works at any input size
(engine/graph.py, symbolic sizes): without sizes, S = floor(L * s) (ONNX's rule for scales); without
scales, s = S / L (ONNX's rule for sizes).
"""
import math

import numpy as np

from ..errors import GraphError
from . import _attrs
from .registry import Cost, Op, register

TRANSFORMS = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric",
              "tf_half_pixel_for_nearest")
NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def _settings(node, input_shape):
    rank = len(input_shape)
    if "sizes" not in node.attrs and "scales" not in node.attrs:
        raise GraphError(f"node {node.name!r} (Resize): needs attribute 'sizes' or 'scales' (or both)")
    scales = node.attrs.get("scales")
    if scales is not None and (
            not isinstance(scales, list) or len(scales) != rank - 1
            or not all(_attrs.is_finite_number(s) and 0 < s <= _attrs.MAX_DIMENSION for s in scales)):
        raise GraphError(f"node {node.name!r} (Resize): attribute 'scales' must be {rank - 1} positive numbers, "
                         f"found {scales!r}")
    if "sizes" in node.attrs:
        sizes = _attrs.int_list(node, "sizes", rank - 1, 1)
    else:
        sizes = [math.floor(length * scale) for length, scale in zip(input_shape[1:], scales)]
        if min(sizes) < 1 or max(sizes) > _attrs.MAX_DIMENSION:
            raise GraphError(f"node {node.name!r} (Resize): scales {scales} take input {list(input_shape[1:])} "
                             f"per sample to {sizes}; every size must be in 1..{_attrs.MAX_DIMENSION}")
    if scales is None:
        scales = [size / length for size, length in zip(sizes, input_shape[1:])]
    transform = node.attrs.get("coordinate_transformation_mode", "half_pixel")
    nearest = node.attrs.get("nearest_mode", "round_prefer_floor")
    if transform not in TRANSFORMS or nearest not in NEAREST_MODES:
        raise GraphError(f"node {node.name!r} (Resize): coordinate_transformation_mode {transform!r} / nearest_mode "
                         f"{nearest!r} not supported; supported: {TRANSFORMS} / {NEAREST_MODES}")
    return sizes, [float(s) for s in scales], transform, nearest


def _source_index(i, length, size, scale, transform, nearest):
    """The input index output position i copies (plain Python, the reference's definition)."""
    if transform == "half_pixel":
        x = (i + 0.5) / scale - 0.5
    elif transform == "half_pixel_symmetric":
        x = length / 2 * (1 - size / (scale * length)) + (i + 0.5) / scale - 0.5
    elif transform == "pytorch_half_pixel":
        x = (i + 0.5) / scale - 0.5 if size > 1 else 0.0
    elif transform == "align_corners":
        x = i * (length - 1) / (size - 1) if size > 1 else 0.0
    elif transform == "asymmetric":
        x = i / scale
    else:
        x = (i + 0.5) / scale
    if nearest == "round_prefer_floor":
        index = math.ceil(x - 0.5)
    elif nearest == "round_prefer_ceil":
        index = math.floor(x + 0.5)
    elif nearest == "floor":
        index = math.floor(x)
    else:
        index = math.ceil(x)
    return min(max(index, 0), length - 1)


def source_indices(node, input_shape):
    """[one int64 array of source indices per non-batch axis]."""
    sizes, scales, transform, nearest = _settings(node, input_shape)
    return [np.array([_source_index(i, length, size, scale, transform, nearest) for i in range(size)], np.int64)
            for length, size, scale in zip(input_shape[1:], sizes, scales)]


def infer_shapes(node, input_shapes):
    _attrs.expect_arity(node, 1)
    sizes, _, _, _ = _settings(node, input_shapes[0])
    return [(None,) + tuple(sizes)]


def reference(node, inputs):
    x = inputs[0]
    for axis, indices in enumerate(source_indices(node, x.shape), start=1):
        x = np.take(x, indices, axis=axis)
    return [x]


def make_kernel(node):
    cache = {}

    def run(inputs):
        x = np.asarray(inputs[0], dtype=np.float32)
        if x.shape[1:] not in cache:
            cache[x.shape[1:]] = np.ix_(*source_indices(node, x.shape))
        return [x[(slice(None),) + cache[x.shape[1:]]]]

    return run


def cost(node, input_shapes, output_shapes):
    return Cost()


register(Op("Resize", "nearest-neighbour resize of the non-batch axes", infer_shapes, reference, make_kernel, cost,
            attributes=("sizes", "scales", "coordinate_transformation_mode", "nearest_mode")))
