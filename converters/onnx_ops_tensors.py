"""Converters of ONNX layout, reduction and resampling ops (see `onnx_registry.onnx_converter`).

Every one keeps the batch axis free: an op that would cut, move or mix axis 0 is refused with an
error naming the node and op.
"""
import math

import numpy as np

from pabnn.engine.ops._attrs import MAX_DIMENSION

from .onnx_registry import BATCH, as_float32, numeric_constant, onnx_converter

# ONNX's "to the end of the axis" sentinels (INT_MAX / INT64_MAX) and anything beyond them.
_TO_THE_END = 2 ** 31 - 1
_BOUND = 2 ** 62  # Slice bounds beyond this are "to the end" (the IR's Slice takes starts >= -2**62)


def _ints_input(node, context, index, what):
    """An optional constant int input as a list, or None when it is absent."""
    if len(node.input) <= index or not node.input[index]:
        return None
    return [int(v) for v in numeric_constant(node, context, node.input[index], what).reshape(-1)]


def _axes(node, context, first_opset_as_input, input_index=1):
    """The axes attribute (before first_opset_as_input) or input (from it on), or None."""
    if context.opset >= first_opset_as_input:
        return _ints_input(node, context, input_index, "axes")
    axes = context.attr(node, "axes")
    return None if axes is None else [int(a) for a in axes]


def _non_batch_axes(node, context, axes, rank, what="axes"):
    normalized = [a % rank if -rank <= a < rank else None for a in axes]
    if None in normalized:
        context.fail(node, f"{what} {axes} are out of range for rank {rank}")
    if 0 in normalized:
        context.fail(node, f"{what} {axes} include the batch axis 0; only non-batch axes are supported")
    return normalized


def _runtime_inputs(node, context):
    return [context.tensor(node, name) for name in node.input if name]


# ---- Concat, Split, Slice, Transpose --------------------------------------------------------

@onnx_converter("Concat")
def convert_concat(node, context):
    sources = _runtime_inputs(node, context)
    rank = len(context.shapes[sources[0]])
    (axis,) = _non_batch_axes(node, context, [int(context.attr(node, "axis"))], rank, "axis")
    context.emit("Concat", node, sources, {"axis": axis})


@onnx_converter("Split")
def convert_split(node, context):
    source = context.tensor(node, node.input[0])
    shape = context.shapes[source]
    (axis,) = _non_batch_axes(node, context, [int(context.attr(node, "axis", 0))], len(shape), "axis")
    outputs = list(node.output)
    sizes = context.attr(node, "split") if context.opset < 13 else _ints_input(node, context, 1, "split")
    if sizes is None:
        parts = int(context.attr(node, "num_outputs", len(outputs)))
        if context.opset < 18 and shape[axis] % parts:
            context.fail(node, f"axis {axis} of size {shape[axis]} does not split into {parts} equal parts")
        # From opset 18 an uneven split makes the last part smaller.
        chunk = math.ceil(shape[axis] / parts)
        sizes = [min(chunk, shape[axis] - i * chunk) for i in range(parts)]
    if any(not name for name in outputs):
        context.fail(node, "unnamed (skipped) outputs are not supported")
    context.emit("Split", node, [source], {"axis": axis, "split": [int(s) for s in sizes]}, outputs=outputs)


@onnx_converter("Slice")
def convert_slice(node, context):
    source = context.tensor(node, node.input[0])
    shape = context.shapes[source]
    starts = _ints_input(node, context, 1, "starts")
    ends = _ints_input(node, context, 2, "ends")
    axes = _ints_input(node, context, 3, "axes") or list(range(len(starts)))
    steps = _ints_input(node, context, 4, "steps") or [1] * len(starts)
    attrs = {"axes": [], "starts": [], "ends": [], "steps": []}
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = axis % len(shape)
        if axis == 0:
            if start == 0 and end >= _TO_THE_END and step == 1:
                continue  # the whole batch: nothing to do
            context.fail(node, f"slicing the batch axis 0 ({start}:{end}:{step}) is not supported")
        if step == 0:
            context.fail(node, "steps must not be 0")
        size = shape[axis]
        if step > 0:
            # ONNX's rule (add the size to a negative bound, then clamp into 0..size) is Python's for
            # a positive step, so the bounds stay as given and hold at any size of the axis.
            for key, value in (("axes", axis), ("starts", min(max(start, -_BOUND), MAX_DIMENSION)),
                               ("ends", None if end >= _BOUND else max(end, -_BOUND)), ("steps", step)):
                attrs[key].append(value)
            continue
        # ONNX clamps starts/ends into the axis; Python slices then do the rest, except that an
        # end before index 0 (negative step) must be None, not -1.
        start = start + size if start < 0 else start
        end = end + size if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), size), min(max(end, 0), size)
        else:
            start, end = min(max(start, 0), size - 1), min(max(end, -1), size - 1)
        for key, value in (("axes", axis), ("starts", start), ("ends", None if end < 0 else end), ("steps", step)):
            attrs[key].append(value)
    context.emit("Slice", node, [source], attrs)


@onnx_converter("Transpose")
def convert_transpose(node, context):
    source = context.tensor(node, node.input[0])
    rank = len(context.shapes[source])
    perm = [int(p) for p in context.attr(node, "perm", list(range(rank))[::-1])]
    if not perm or perm[0] != 0:
        context.fail(node, f"perm {perm} moves the batch axis 0; only permutations of the non-batch axes are supported")
    context.emit("Transpose", node, [source], {"perm": perm})


# ---- Squeeze and Unsqueeze: per-sample reshapes ---------------------------------------------------

@onnx_converter("Squeeze")
def convert_squeeze(node, context):
    source = context.tensor(node, node.input[0])
    shape = context.shapes[source]
    axes = _axes(node, context, 13)
    if axes is None:
        axes = [i for i, d in enumerate(shape) if i > 0 and d == 1]
    axes = _non_batch_axes(node, context, axes, len(shape))
    if any(shape[a] != 1 for a in axes):
        context.fail(node, f"axes {axes} of shape {list(shape)} are not all of size 1")
    context.emit("Reshape", node, [source], {"shape": [d for i, d in enumerate(shape) if i > 0 and i not in axes]})


@onnx_converter("Unsqueeze")
def convert_unsqueeze(node, context):
    source = context.tensor(node, node.input[0])
    shape = list(context.shapes[source])
    axes = _axes(node, context, 13)
    if axes is None:
        context.fail(node, "axes are missing")
    axes = _non_batch_axes(node, context, axes, len(shape) + len(axes))
    for axis in sorted(axes):
        shape.insert(axis, 1)
    context.emit("Reshape", node, [source], {"shape": shape[1:]})


# ---- Pad --------------------------------------------------------------------------------------

@onnx_converter("Pad")
def convert_pad(node, context):
    source = context.tensor(node, node.input[0])
    rank = len(context.shapes[source])
    pads = _ints_input(node, context, 1, "pads")
    axes = _ints_input(node, context, 3, "axes") if context.opset >= 18 else None
    axes = list(range(rank)) if axes is None else [a % rank for a in axes]
    if pads is None or len(pads) != 2 * len(axes):
        context.fail(node, f"expected {2 * len(axes)} pads, found {pads}")
    full = [0] * (2 * rank)
    for index, axis in enumerate(axes):
        full[axis], full[rank + axis] = pads[index], pads[len(axes) + index]
    if full[0] or full[rank]:
        context.fail(node, f"pads {pads} pad the batch axis 0; only non-batch axes can be padded")
    if any(p < 0 for p in full):
        context.fail(node, f"negative pads {pads} (cropping) are not supported")
    value = 0.0
    if len(node.input) > 2 and node.input[2]:
        constant = as_float32(node, context, numeric_constant(node, context, node.input[2], "constant_value"),
                              "constant_value")
        value = float(constant.reshape(-1)[0]) if constant.size else 0.0
    mode = context.attr(node, "mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    context.emit("Pad", node, [source], {"pads": full[1:rank] + full[rank + 1:], "mode": mode, "value": value})


# ---- ReduceMean, ReduceSum, ReduceMax ---------------------------------------------------------

def _reduce(node, context, op, first_opset_axes_input):
    source = context.tensor(node, node.input[0])
    shape = context.shapes[source]
    axes = _axes(node, context, first_opset_axes_input)
    if not axes:
        if context.opset >= first_opset_axes_input and context.attr(node, "noop_with_empty_axes", 0):
            context.aliases[node.output[0]] = source
            return
        context.fail(node, "reducing over all axes includes the batch axis; give the non-batch axes")
    axes = _non_batch_axes(node, context, axes, len(shape))
    context.emit(op, node, [source], {"axes": sorted(axes), "keepdims": int(context.attr(node, "keepdims", 1))})


@onnx_converter("ReduceMean")
def convert_reduce_mean(node, context):
    _reduce(node, context, "ReduceMean", 18)


@onnx_converter("ReduceSum")
def convert_reduce_sum(node, context):
    _reduce(node, context, "ReduceSum", 13)


@onnx_converter("ReduceMax")
def convert_reduce_max(node, context):
    _reduce(node, context, "ReduceMax", 18)


# ---- ConvTranspose ----------------------------------------------------------------------------

@onnx_converter("ConvTranspose")
def convert_conv_transpose(node, context):
    weight = as_float32(node, context, numeric_constant(node, context, node.input[1], "the weight"), "weight")
    if weight.ndim != 4:
        context.fail(node, f"only 2-D transposed convolutions are supported, found weight shape {list(weight.shape)}")
    group = int(context.attr(node, "group", 1))
    bias = np.zeros(weight.shape[1] * group, np.float32)
    if len(node.input) > 2 and node.input[2]:
        bias = as_float32(node, context, numeric_constant(node, context, node.input[2], "the bias"), "bias").reshape(-1)
    source = context.tensor(node, node.input[0])
    shape = context.shapes[source]
    strides = [int(s) for s in context.attr(node, "strides", [1, 1])]
    dilations = [int(d) for d in context.attr(node, "dilations", [1, 1])]
    output_padding = [int(p) for p in context.attr(node, "output_padding", [0, 0])]
    pads = [int(p) for p in context.attr(node, "pads", [0, 0, 0, 0])]
    auto_pad = context.attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    output_shape = context.attr(node, "output_shape")
    if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if output_shape is None:
            output_shape = [shape[2] * strides[0], shape[3] * strides[1]]
        output_shape = [int(d) for d in output_shape][-2:]
        pads = [0, 0, 0, 0]
        for axis in range(2):
            total = (strides[axis] * (shape[2 + axis] - 1) + output_padding[axis]
                     + (weight.shape[2 + axis] - 1) * dilations[axis] + 1 - output_shape[axis])
            # As ONNX's reference and onnxruntime: the odd unit of padding goes to the end for
            # SAME_UPPER, to the beginning otherwise.
            head = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            tail = total - head
            if head < 0:
                context.fail(node, f"output_shape {output_shape} is larger than the transposed convolution produces")
            if tail < 0:  # a larger output_shape extends the output at the end, as output_padding does
                output_padding[axis] -= tail
                tail = 0
            pads[axis], pads[axis + 2] = head, tail
    elif auto_pad == "VALID":
        pads = [0, 0, 0, 0]
    elif auto_pad != "NOTSET":
        context.fail(node, f"auto_pad={auto_pad} is not supported")
    attrs = {"strides": strides, "pads": pads, "dilations": dilations, "output_padding": output_padding,
             "group": group}
    context.emit("ConvTranspose", node, [source], attrs, {"weight": weight, "bias": bias})


# ---- Resize -----------------------------------------------------------------------------------

def _resize_targets(node, context, shape):
    """(per-axis output sizes, per-axis scales) over all axes, the batch included."""
    rank = len(shape)
    axes = [int(a) % rank for a in context.attr(node, "axes", list(range(rank)))]
    scales = None
    if len(node.input) > 2 and node.input[2]:
        scales = numeric_constant(node, context, node.input[2], "scales").astype(np.float64).reshape(-1)
        scales = scales if scales.size else None
    sizes = None
    if len(node.input) > 3 and node.input[3]:
        sizes = context.constant(node.input[3])
        if sizes is None:
            context.fail(node, "sizes must be a constant (or computed from shapes at conversion)")
        sizes = list(sizes.reshape(-1))
    if (scales is None) == (sizes is None):
        context.fail(node, "exactly one of scales and sizes must be given")
    full_scales = [1.0] * rank
    full_sizes = [None] + list(shape[1:])
    if scales is not None:
        for axis, scale in zip(axes, scales):
            full_scales[axis] = float(scale)
            if axis:
                full_sizes[axis] = int(math.floor(shape[axis] * scale))
        if full_scales[0] != 1.0:
            context.fail(node, f"scales {list(scales)} resize the batch axis 0")
        return full_sizes, full_scales
    # sizes: a fixed first entry is the batch the exporter saw; only the other axes are resized.
    if any(d is BATCH for a, d in zip(axes, sizes) if a != 0):
        context.fail(node, f"sizes {sizes} depend on the batch size")
    ratios = {axis: int(size) / shape[axis] for axis, size in zip(axes, sizes) if axis != 0}
    policy = context.attr(node, "keep_aspect_ratio_policy", b"stretch")
    policy = policy.decode() if isinstance(policy, bytes) else policy
    if policy not in ("stretch", "not_larger", "not_smaller"):
        context.fail(node, f"keep_aspect_ratio_policy={policy} is not supported")
    for axis, ratio in ratios.items():
        if policy != "stretch":
            ratio = (min if policy == "not_larger" else max)(ratios.values())
            full_sizes[axis] = int(math.floor(ratio * shape[axis] + 0.5))
        else:
            full_sizes[axis] = int(dict(zip(axes, sizes))[axis])
        full_scales[axis] = ratio
    return full_sizes, full_scales


@onnx_converter("Resize")
def convert_resize(node, context):
    mode = context.attr(node, "mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "nearest":
        context.fail(node, f"mode={mode} is not supported (only nearest)")
    transform = context.attr(node, "coordinate_transformation_mode", b"half_pixel")
    transform = transform.decode() if isinstance(transform, bytes) else transform
    if transform == "tf_crop_and_resize":
        context.fail(node, "coordinate_transformation_mode=tf_crop_and_resize is not supported")
    nearest = context.attr(node, "nearest_mode", b"round_prefer_floor")
    nearest = nearest.decode() if isinstance(nearest, bytes) else nearest
    if context.attr(node, "antialias", 0):
        context.fail(node, "antialias=1 is not supported")
    source = context.tensor(node, node.input[0])
    sizes, scales = _resize_targets(node, context, context.shapes[source])
    context.emit("Resize", node, [source], {"sizes": sizes[1:], "scales": scales[1:],
                                            "coordinate_transformation_mode": transform, "nearest_mode": nearest})

