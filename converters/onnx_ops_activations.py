"""Converters of elementwise ONNX ops: activations and Mul/Sub/Div (see `onnx_registry.onnx_converter`)."""
import numpy as np

from .onnx_registry import as_float32, emit_softmax, numeric_constant, onnx_converter, per_channel_vector


def _unary(node, context, op, attrs=None):
    context.emit(op, node, [context.tensor(node, node.input[0])], attrs or {})


@onnx_converter("Sigmoid")
def convert_sigmoid(node, context):
    _unary(node, context, "Sigmoid")


@onnx_converter("Tanh")
def convert_tanh(node, context):
    _unary(node, context, "Tanh")


@onnx_converter("HardSigmoid")
def convert_hard_sigmoid(node, context):
    _unary(node, context, "HardSigmoid", {"alpha": float(context.attr(node, "alpha", 0.2)),
                                          "beta": float(context.attr(node, "beta", 0.5))})


@onnx_converter("HardSwish", first_opset=14)
def convert_hard_swish(node, context):
    _unary(node, context, "HardSwish")


@onnx_converter("LeakyRelu")
def convert_leaky_relu(node, context):
    _unary(node, context, "LeakyRelu", {"alpha": float(context.attr(node, "alpha", 0.01))})


@onnx_converter("Clip")
def convert_clip(node, context):
    """Clip-11+: min and max are optional constant inputs (PyTorch's ReLU6 is Clip(0, 6))."""
    bounds = {}
    for index, key in ((1, "min"), (2, "max")):
        if len(node.input) > index and node.input[index]:
            value = as_float32(node, context, numeric_constant(node, context, node.input[index], key), key)
            if value.size != 1:
                context.fail(node, f"{key} must be a scalar, found shape {list(value.shape)}")
            bounds[key] = float(value.reshape(-1)[0])
    _unary(node, context, "Clip", bounds)


@onnx_converter("PRelu")
def convert_prelu(node, context):
    slope = as_float32(node, context, numeric_constant(node, context, node.input[1], "slope"), "slope")
    context.emit("PRelu", node, [context.tensor(node, node.input[0])], {}, {"slope": slope})


@onnx_converter("LogSoftmax")
def convert_log_softmax(node, context):
    emit_softmax(node, context, "LogSoftmax")


# ---- Mul, Sub, Div --------------------------------------------------------------------------


def _arithmetic(node, context, op):
    constants = [context.constant(name) for name in node.input[:2]]
    if constants[0] is None and constants[1] is None:
        context.emit(op, node, [context.tensor(node, name) for name in node.input[:2]])
        return
    constant_first = constants[0] is not None
    tensor_name = node.input[1] if constant_first else node.input[0]
    constant_name = node.input[0] if constant_first else node.input[1]
    constant = as_float32(node, context, numeric_constant(node, context, constant_name, "the constant operand"),
                          "the constant operand")
    source = context.tensor(node, tensor_name)
    shape = context.shapes[source]
    vector = per_channel_vector(constant, shape) if op in ("Mul", "Sub") else None
    if vector is not None:
        # Per-channel scales and shifts become a ChannelAffine, which fold_batchnorm folds into a Conv.
        channels = vector.shape[0]
        if op == "Mul":
            scale, shift = vector, np.zeros(channels, np.float32)
        elif constant_first:
            scale, shift = np.full(channels, -1.0, np.float32), vector
        else:
            scale, shift = np.ones(channels, np.float32), -vector
        context.emit("ChannelAffine", node, [source], {}, {"scale": scale, "shift": shift})
        return
    context.emit(op, node, [source], {"constant_first": int(constant_first)}, {"constant": constant})


@onnx_converter("Mul")
def convert_mul(node, context):
    _arithmetic(node, context, "Mul")


@onnx_converter("Sub")
def convert_sub(node, context):
    _arithmetic(node, context, "Sub")


@onnx_converter("Div")
def convert_div(node, context):
    _arithmetic(node, context, "Div")
