"""One converter per ONNX op type (see `onnx_registry.onnx_converter`).

Each converter reads one ONNX node and emits IR nodes through `context.emit`. Shapes of the
tensors emitted so far are in `context.shapes` (batch first, None).
"""
import math

import numpy as np
from onnx import helper, numpy_helper

from .onnx_registry import BATCH, as_float32, emit_softmax, onnx_converter, per_channel_vector, spatial_attrs


@onnx_converter("Conv")
def convert_conv(node, context):
    weight = context.constant(node.input[1])
    if weight is None:
        context.fail(node, "the weight must be a constant (initializer or Constant node)")
    weight = as_float32(node, context, weight, "weight")
    if weight.ndim != 4:
        context.fail(node, f"only 2-D convolutions are supported, found weight shape {list(weight.shape)}")
    has_bias = len(node.input) > 2 and node.input[2]
    bias = context.constant(node.input[2]) if has_bias else np.zeros(weight.shape[0], np.float32)
    if bias is None:
        context.fail(node, "the bias must be a constant")
    source = context.tensor(node, node.input[0])
    strides, pads, dilations = spatial_attrs(node, context, weight.shape[2:], context.shapes[source])
    attrs = {"strides": strides, "pads": pads, "dilations": dilations, "group": int(context.attr(node, "group", 1))}
    context.emit("Conv", node, [source], attrs,
                 {"weight": weight, "bias": as_float32(node, context, bias, "bias").reshape(-1)})


@onnx_converter("Gemm")
def convert_gemm(node, context):
    if context.attr(node, "transA", 0):
        context.fail(node, "transA=1 is not supported")
    matrix = context.constant(node.input[1])
    if matrix is None or matrix.ndim != 2:
        context.fail(node, "B must be a constant 2-D matrix")
    matrix = as_float32(node, context, matrix, "B")
    alpha = float(context.attr(node, "alpha", 1.0))
    beta = float(context.attr(node, "beta", 1.0))
    weight = alpha * (matrix if context.attr(node, "transB", 0) else matrix.T)  # [O, C]
    bias = np.zeros(weight.shape[0], np.float32)
    if len(node.input) > 2 and node.input[2]:
        constant = context.constant(node.input[2])
        if constant is None or constant.size not in (1, weight.shape[0]):
            context.fail(node, f"C must be a constant scalar or vector of {weight.shape[0]}")
        bias = bias + beta * as_float32(node, context, constant, "C").reshape(-1)
    context.emit("Gemm", node, [context.tensor(node, node.input[0])], {},
                 {"weight": np.ascontiguousarray(weight, np.float32), "bias": bias.astype(np.float32)})


@onnx_converter("MatMul")
def convert_matmul(node, context):
    """[batch, C] @ constant [C, O] is a linear layer (Gemm, binarizable); anything else with numpy
    broadcasting that keeps the batch on axis 0 is a MatMul."""
    constants = [context.constant(name) for name in node.input[:2]]
    if constants[0] is None and constants[1] is None:
        context.emit("MatMul", node, [context.tensor(node, name) for name in node.input[:2]])
        return
    constant_first = constants[0] is not None
    matrix = as_float32(node, context, constants[0] if constant_first else constants[1], "the constant operand")
    source = context.tensor(node, node.input[1] if constant_first else node.input[0])
    if not constant_first and matrix.ndim == 2 and len(context.shapes[source]) == 2:
        weight = matrix.T
        context.emit("Gemm", node, [source], {},
                     {"weight": np.ascontiguousarray(weight), "bias": np.zeros(weight.shape[0], np.float32)})
        return
    context.emit("MatMul", node, [source], {"constant_first": int(constant_first)}, {"constant": matrix})


@onnx_converter("BatchNormalization")
def convert_batchnorm(node, context):
    if context.attr(node, "training_mode", 0):
        context.fail(node, "training_mode=1 is not supported (export the model in eval mode)")
    if len([name for name in node.output if name]) > 1:
        context.fail(node, "running statistics outputs are not supported (export in eval mode)")
    arrays = [context.constant(name) for name in node.input[1:5]]
    if len(arrays) != 4 or any(a is None for a in arrays):
        context.fail(node, "scale, bias, mean and variance must be constants")
    gamma, beta, mean, variance = (as_float32(node, context, a, "parameter").astype(np.float64) for a in arrays)
    scale = gamma / np.sqrt(variance + float(context.attr(node, "epsilon", 1e-5)))
    context.emit("ChannelAffine", node, [context.tensor(node, node.input[0])], {},
                 {"scale": scale.astype(np.float32), "shift": (beta - mean * scale).astype(np.float32)},
                 outputs=node.output[:1])


@onnx_converter("Add")
def convert_add(node, context):
    constants = [context.constant(name) for name in node.input]
    if all(c is None for c in constants):
        context.emit("Add", node, [context.tensor(node, name) for name in node.input])
        return
    if all(c is not None for c in constants):
        context.constants[node.output[0]] = constants[0] + constants[1]
        return
    tensor = node.input[0] if constants[0] is None else node.input[1]
    shift = as_float32(node, context, constants[1] if constants[0] is None else constants[0], "constant")
    source = context.tensor(node, tensor)
    shape = context.shapes[source]
    if per_channel_vector(shift, shape) is None:
        # x + c == x - (-c) exactly in IEEE arithmetic: the general constant form is a Sub.
        context.emit("Sub", node, [source], {"constant_first": 0}, {"constant": -shift})
        return
    channels = shape[1]
    # A constant that is per channel (channel axis 1) or a scalar becomes a ChannelAffine.
    per_channel = (channels,) + (1,) * (len(shape) - 2)
    squeezed = shift.reshape(shift.shape[1:]) if shift.ndim == len(shape) and shift.shape[0] == 1 else shift
    if shift.size == 1:
        shift = np.full(channels, shift.reshape(-1)[0], np.float32)
    elif len(shape) == 2 and shift.shape[-1:] == (channels,) and shift.size == channels:
        shift = shift.reshape(-1)
    elif squeezed.shape == per_channel:
        shift = squeezed.reshape(-1)
    else:
        context.fail(node, f"adding a constant of shape {list(shift.shape)} to {list(shape)} is not supported "
                           "(only scalars and per-channel constants are)")
    context.emit("ChannelAffine", node, [source], {},
                 {"scale": np.ones(channels, np.float32), "shift": np.ascontiguousarray(shift, np.float32)})


@onnx_converter("Sum")
def convert_sum(node, context):
    """Sum of one or more inputs (ResNet-50's residual join in Caffe2 exports): a chain of Add,
    ((x0 + x1) + x2) + ..., in the order onnxruntime adds them."""
    inputs = list(node.input)
    if len(inputs) == 1:
        convert_identity(node, context)
        return
    partial = inputs[0]
    for index, name in enumerate(inputs[1:], start=1):
        last = index == len(inputs) - 1
        output = node.output[0] if last else f"{node.name}/sum{index}"
        step = helper.make_node("Add", [partial, name], [output], name=node.name if last else output)
        convert_add(step, context)
        partial = output


@onnx_converter("LRN")
def convert_lrn(node, context):
    source = context.tensor(node, node.input[0])
    if len(context.shapes[source]) < 3:
        context.fail(node, f"expects an input [batch, channels, ...], found {list(context.shapes[source])}")
    attrs = {"size": int(context.attr(node, "size")), "alpha": float(context.attr(node, "alpha", 1e-4)),
             "beta": float(context.attr(node, "beta", 0.75)), "bias": float(context.attr(node, "bias", 1.0))}
    context.emit("LRN", node, [source], attrs)


@onnx_converter("Relu")
def convert_relu(node, context):
    context.emit("Relu", node, [context.tensor(node, node.input[0])])


def _pool(node, context, op):
    kernel = [int(k) for k in context.attr(node, "kernel_shape", [])]
    source = context.tensor(node, node.input[0])
    strides, pads, dilations = spatial_attrs(node, context, kernel, context.shapes[source])
    if len([name for name in node.output if name]) > 1:
        context.fail(node, "the Indices output is not supported")
    count_include_pad = int(context.attr(node, "count_include_pad", 0))
    if context.attr(node, "ceil_mode", 0):
        if op == "AveragePool" and count_include_pad:
            context.fail(node, "ceil_mode=1 with count_include_pad=1 is not supported")
        pads = _ceil_mode_pads(context.shapes[source], kernel, strides, pads, dilations)
    attrs = {"kernel_shape": kernel, "strides": strides, "pads": pads}
    attrs["dilations"] = dilations
    if op == "AveragePool":
        attrs["count_include_pad"] = count_include_pad
    context.emit(op, node, [source], attrs)


def _ceil_mode_pads(shape, kernel, strides, pads, dilations):
    """Pads that make floor-mode pooling produce ONNX's ceil_mode=1 output size.

    The extra bottom/right padding never wins a max and is not counted in an average, which is
    what ceil mode means; a window that would start in the padding only is dropped (as in ONNX).
    """
    pads = list(pads)
    for axis in range(2):
        size = shape[2 + axis]
        span = dilations[axis] * (kernel[axis] - 1) + 1
        total = size + pads[axis] + pads[axis + 2]
        out = math.ceil((total - span) / strides[axis]) + 1
        if (out - 1) * strides[axis] >= size + pads[axis]:
            out -= 1
        pads[axis + 2] += max(0, (out - 1) * strides[axis] + span - total)
    return pads


@onnx_converter("MaxPool")
def convert_maxpool(node, context):
    _pool(node, context, "MaxPool")


@onnx_converter("AveragePool")
def convert_averagepool(node, context):
    _pool(node, context, "AveragePool")


@onnx_converter("GlobalAveragePool")
def convert_global_average_pool(node, context):
    context.emit("GlobalAveragePool", node, [context.tensor(node, node.input[0])])


@onnx_converter("Flatten")
def convert_flatten(node, context):
    source = context.tensor(node, node.input[0])
    rank = len(context.shapes[source])
    axis = int(context.attr(node, "axis", 1))
    if axis % rank != 1:
        # ONNX Flatten makes [d0*...*d(axis-1), rest]: any axis but 1 mixes the batch into rows.
        context.fail(node, f"axis={axis} folds the batch axis into the rows; only axis=1 is supported")
    context.emit("Flatten", node, [source])


@onnx_converter("Reshape")
def convert_reshape(node, context):
    target = context.constant(node.input[1])
    if target is None:
        context.fail(node, "the target shape must be a constant")
    source = context.tensor(node, node.input[0])
    shape = context.shapes[source]
    target = list(target.reshape(-1))
    if any(d is BATCH for d in target[1:]):
        context.fail(node, f"shape {target} moves the batch size off axis 0; only a first entry equal to the "
                           "batch size is supported")
    # A first entry computed from the input's Shape is the batch size: keep it (as 0 does).
    target = [0 if d is BATCH else int(d) for d in target]
    if context.attr(node, "allowzero", 0) and 0 in target:
        context.fail(node, "allowzero=1 with a zero in the shape is not supported")
    if target and target[0] == 1:
        # A batch-1 export (Caffe2's model zoo classics: AlexNet's [1, 9216], ShuffleNet's channel
        # shuffle [1, groups, C/groups, H, W]): the rest of the target is one sample's shape, and
        # each sample of a larger batch is reshaped alone.
        target[0] = 0
    if not target or target[0] not in (0, -1):
        context.fail(node, f"shape {target} fixes the batch size at {target[0] if target else None}; supported "
                           "first entries: 0 or -1 (a dynamic batch) and 1 (a batch-1 export, each sample reshaped "
                           "alone); export with a dynamic batch")
    per_sample = [shape[i] if d == 0 and i < len(shape) else d for i, d in enumerate(target)][1:]
    if target[0] == -1 and -1 in per_sample:
        context.fail(node, f"shape {target} has two -1 entries")
    context.emit("Reshape", node, [source], {"shape": per_sample})


@onnx_converter("Softmax")
def convert_softmax(node, context):
    emit_softmax(node, context, "Softmax")


@onnx_converter("Identity")
def convert_identity(node, context):
    if node.input[0] in context.constants:
        context.constants[node.output[0]] = context.constants[node.input[0]]
    else:
        context.aliases[node.output[0]] = context.tensor(node, node.input[0])


@onnx_converter("Dropout")
def convert_dropout(node, context):
    if len(node.output) > 1 and node.output[1]:
        context.fail(node, "the mask output is not supported")
    convert_identity(node, context)


@onnx_converter("Constant")
def convert_constant(node, context):
    attribute = node.attribute[0] if len(node.attribute) == 1 else None
    if attribute is None:
        context.fail(node, "expected exactly one value attribute")
    if attribute.name == "value":
        value = numpy_helper.to_array(attribute.t)
    elif attribute.name in ("value_float", "value_int", "value_floats", "value_ints"):
        value = np.asarray(context.attr(node, attribute.name))
    else:
        context.fail(node, f"attribute {attribute.name!r} is not supported")
    context.constants[node.output[0]] = value
