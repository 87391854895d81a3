"""Converters of the ONNX ops that binarize activations: Sign, and Where over a comparison with a
constant (Greater, GreaterOrEqual, Less, LessOrEqual). Each becomes an exact Staircase
(engine/ops/staircase.py), which `binary_import.import_binary_layers` folds into the binary
layer that reads it.

Strict comparisons use the float32 identity  x > t  <=>  x >= nextafter(t, +inf)  (for float32
x and finite t), so that every staircase is written with ">=" thresholds like PA's Qa.
"""
import numpy as np

from .onnx_registry import as_float32, numeric_constant, onnx_converter, per_channel_vector

# Sign(x) = -1 + [x >= 0] + [x > 0]: levels -1, 0, +1 (ONNX Sign(0) = 0, and Sign(-0) = 0 too:
# -0.0 >= 0.0). Two planes keep Sign(0) = 0 exact; the smallest float32 above 0 is the threshold
# of x > 0.
SIGN_THRESHOLDS = (np.float32(0.0), np.nextafter(np.float32(0.0), np.float32(1.0)))


def _channels(node, context, source):
    shape = context.shapes[source]
    if len(shape) < 2:
        context.fail(node, f"expects an input [batch, channels, ...], found {list(shape)}")
    return shape[1]


@onnx_converter("Sign")
def convert_sign(node, context):
    source = context.tensor(node, node.input[0])
    channels = _channels(node, context, source)
    thresholds = np.repeat(np.array(SIGN_THRESHOLDS, np.float32)[:, None], channels, axis=1)
    context.emit("Staircase", node, [source], {}, {"thresholds": thresholds, "steps": np.ones(2, np.float32),
                                                   "lowest": np.array([-1.0], np.float32)})


def _comparison(node, context, op_type):
    """Record `x op t` (one run-time input, one constant per channel) as (source, thresholds [C],
    flipped): the condition is `x >= thresholds`, or its negation when `flipped`."""
    constants = [context.constant(name) for name in node.input[:2]]
    if (constants[0] is None) == (constants[1] is None):
        context.fail(node, "only comparisons of a run-time tensor with a constant are supported")
    constant_first = constants[0] is not None
    source = context.tensor(node, node.input[1] if constant_first else node.input[0])
    constant = as_float32(node, context, numeric_constant(node, context, node.input[0 if constant_first else 1],
                                                          "the constant operand"), "the constant operand")
    _channels(node, context, source)
    threshold = per_channel_vector(constant, context.shapes[source])
    if threshold is None:
        context.fail(node, f"the constant operand of shape {list(constant.shape)} must be a scalar or one value "
                           "per channel")
    if constant_first:  # t < x is x > t, t <= x is x >= t, ...
        op_type = {"Greater": "Less", "Less": "Greater", "GreaterOrEqual": "LessOrEqual",
                   "LessOrEqual": "GreaterOrEqual"}[op_type]
    above = np.nextafter(threshold, np.float32(np.inf))
    condition = {"GreaterOrEqual": (threshold, False), "Greater": (above, False),  # x > t: x >= next(t)
                 "Less": (threshold, True), "LessOrEqual": (above, True)}[op_type]  # x <= t: not x >= next(t)
    context.comparisons[node.output[0]] = (source,) + condition


@onnx_converter("Greater")
def convert_greater(node, context):
    _comparison(node, context, "Greater")


@onnx_converter("Less")
def convert_less(node, context):
    _comparison(node, context, "Less")


@onnx_converter("GreaterOrEqual", first_opset=12)
def convert_greater_or_equal(node, context):
    _comparison(node, context, "GreaterOrEqual")


@onnx_converter("LessOrEqual", first_opset=12)
def convert_less_or_equal(node, context):
    _comparison(node, context, "LessOrEqual")


@onnx_converter("Where")
def convert_where(node, context):
    """Where(x >= t, a, b) with constant scalars a, b: the staircase b + (a - b) [x >= t].
    NaN: ONNX compares it false in every comparison; the staircase gives it the lowest level,
    b (the same for Greater/GreaterOrEqual, the other value for Less/LessOrEqual)."""
    if node.input[0] not in context.comparisons:
        context.fail(node, "the condition must be a comparison (Greater, GreaterOrEqual, Less, LessOrEqual) of a "
                           "run-time tensor with a constant")
    source, thresholds, flipped = context.comparisons[node.input[0]]
    values = []
    for name in node.input[1:3]:
        value = context.constant(name)
        if value is None or np.asarray(value).size != 1:
            context.fail(node, f"input {name!r} must be a constant scalar (a two-level quantizer)")
        values.append(float(as_float32(node, context, value, f"input {name!r}").reshape(-1)[0]))
    if_true, if_false = values[::-1] if flipped else values
    context.emit("Staircase", node, [source], {}, {
        "thresholds": np.ascontiguousarray(thresholds[None, :], np.float32),
        "steps": np.array([if_true - if_false], np.float32), "lowest": np.array([if_false], np.float32)})
