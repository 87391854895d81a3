"""Converters of quantizer ops whose result takes few levels: QuantizeLinear [-> Clip] ->
DequantizeLinear (the QDQ and QCDQ export formats) and QONNX BipolarQuant. Each becomes an exact
Staircase (engine/ops/staircase.py), which `binary_import.import_binary_layers` folds into the
binary layer that reads it. On constants (quantized weights) the same ops are folded into float
constants at import (onnx_shape_folding.fold_constant_node; BipolarQuant here), so that +-alpha
weights are found by `binary_import.plus_minus_alpha`.

QDQ on a run-time float32 tensor x (ONNX definitions; scale > 0):
    q = clamp(rint(fl32(x / scale)) + zero_point, qmin, qmax)      QuantizeLinear (rint: half to even)
    q = clamp(q, min, max)                                         Clip of the integer (optional)
    y = fl32(fl32(q - zero_point') * scale')                       DequantizeLinear (per tensor)
q is nondecreasing in x, so y is a staircase whose levels are those of q = low..high and whose
threshold for q >= k is the smallest float32 x that reaches k; `integer_thresholds` finds it by
bisection over the float32 values in order, with numpy's float32 division (correctly rounded, as
onnxruntime computes it). Only quantizers of at most MAX_LEVELS levels are imported.

NaN: ONNX leaves QuantizeLinear(NaN) to the implementation; onnxruntime (CPU) maps it to qmin, so
the chain gives the lowest level, which is what the Staircase gives NaN. +-inf saturate to the
highest and lowest level in both.
"""
import dataclasses

import numpy as np
import onnx

from .onnx_registry import CUSTOM_DOMAINS, as_float32, integer_input_converter, numeric_constant, onnx_converter

# A Staircase of L levels is L - 1 activation planes, each one binary convolution per weight plane.
MAX_LEVELS = 16

# The integer types of QuantizeLinear's output that are imported, and their ranges.
INTEGER_RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767), "uint16": (0, 65535),
                  "int4": (-8, 7), "uint4": (0, 15)}

_NEGATIVE_INFINITY_KEY = -0x7F800000 - 1  # _ordered_keys(-inf)
_POSITIVE_INFINITY_KEY = 0x7F800000  # _ordered_keys(+inf)


@dataclasses.dataclass(frozen=True)
class PendingQuantization:
    """The integer q = clamp(rint(fl32(x / scale[c])) + zero_point[c], low, high) of run-time tensor
    `source` (channel c on axis 1), made by QuantizeLinear `quantize_node` and narrowed by Clip.

    scale: float32 [C] (> 0); zero_point: int64 [C]; dtype: the integer type's name."""

    source: str
    scale: np.ndarray
    zero_point: np.ndarray
    low: int
    high: int
    dtype: str
    quantize_node: str


def quantize_to_integer(x, scale, zero_point, low, high):
    """clamp(rint(fl32(x / scale)) + zero_point, low, high) as float64 (ONNX QuantizeLinear, rounding
    half to even and saturating, then Clip). x, scale: float32 arrays that broadcast."""
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        ratio = np.rint(np.asarray(x, np.float32) / np.asarray(scale, np.float32))
    return np.clip(ratio.astype(np.float64) + zero_point, low, high)


def integer_thresholds(scale, zero_point, low, high):
    """float32 [high - low, C]: row j holds, per channel c, the smallest float32 x (+inf if none is
    finite) with quantize_to_integer(x, scale[c], zero_point[c], low, high) >= low + 1 + j.

    Bisection over the float32 values in increasing order (their ordered integer keys, -inf to
    +inf): quantize_to_integer is nondecreasing in x, is `low` at -inf and `high` at +inf."""
    targets = np.arange(low + 1, high + 1, dtype=np.float64)[:, None]
    below = np.full((targets.shape[0], len(scale)), _NEGATIVE_INFINITY_KEY, np.int64)  # never reaches
    above = np.full_like(below, _POSITIVE_INFINITY_KEY)  # always reaches
    while np.any(above - below > 1):
        middle = below + (above - below) // 2
        reached = quantize_to_integer(_floats_of_keys(middle), scale, zero_point, low, high) >= targets
        above = np.where(reached, middle, above)
        below = np.where(reached, below, middle)
    return _floats_of_keys(above) + np.float32(0.0)  # -0.0 -> +0.0: the same threshold for ">="


def _ordered_keys(values):
    """int64 keys in the order of the float32 values (-0.0 just below +0.0)."""
    bits = np.asarray(values, np.float32).view(np.int32).astype(np.int64)
    return np.where(bits >= 0, bits, -(bits & 0x7FFFFFFF) - 1)


def _floats_of_keys(keys):
    """The float32 values of `_ordered_keys`."""
    bits = np.where(keys >= 0, keys, (-(keys + 1)) | 0x80000000)
    return bits.astype(np.uint32).view(np.float32)


# ---- QuantizeLinear, Clip of its integer, DequantizeLinear ------------------------------------------

def _integer_type(node, context, zero_point):
    """The name of QuantizeLinear's output type: its zero point's, else output_dtype (opset 21), else uint8."""
    output_dtype = int(context.attr(node, "output_dtype", 0))
    if zero_point is not None:
        name = np.asarray(zero_point).dtype.name
    elif output_dtype:
        name = onnx.helper.tensor_dtype_to_np_dtype(output_dtype).name
    else:
        name = "uint8"
    if name not in INTEGER_RANGES:
        context.fail(node, f"quantizing to {name} is not supported; supported integer types: {sorted(INTEGER_RANGES)}")
    return name


def _scalar_or_per_channel(node, context, name, what, shape):
    """Constant input `name` of one value, or one per channel of axis 1 of a tensor of `shape`
    (attribute axis), as a flat [1] or [C] array."""
    value = np.asarray(numeric_constant(node, context, name, what))
    axis = int(context.attr(node, "axis", 1))
    if value.size == 1:
        return value.reshape(1)
    if value.ndim == 1 and value.size == shape[1] and axis % len(shape) == 1:
        return value
    context.fail(node, f"{what} of shape {list(value.shape)} (axis {axis}) must be one value, or one per channel "
                       f"of axis 1 ({shape[1]})")


def _check_unblocked(node, context):
    if int(context.attr(node, "block_size", 0)):
        context.fail(node, "blocked quantization (block_size > 0) is not supported")


@onnx_converter("QuantizeLinear")
def convert_quantize_linear(node, context):
    """QuantizeLinear of a run-time tensor, per tensor or per channel (axis 1): recorded as a
    PendingQuantization for an optional Clip and a DequantizeLinear, which emits the Staircase."""
    _check_unblocked(node, context)
    source = context.tensor(node, node.input[0])
    shape = context.shapes[source]
    if len(shape) < 2:
        context.fail(node, f"expects an input [batch, channels, ...], found {list(shape)}")
    channels = shape[1]
    scale = _scalar_or_per_channel(node, context, node.input[1], "y_scale", shape)
    if scale.dtype != np.float32:
        context.fail(node, f"y_scale has dtype {scale.dtype}; expected float32 (the input's type)")
    if not np.all(np.isfinite(scale)) or not np.all(scale > 0):
        context.fail(node, f"y_scale must be positive and finite, found {scale.tolist()}")
    has_zero_point = len(node.input) > 2 and node.input[2]
    zero_point = _scalar_or_per_channel(node, context, node.input[2], "y_zero_point", shape) \
        if has_zero_point else None
    dtype = _integer_type(node, context, zero_point)
    zero_point = np.zeros(1, np.int64) if zero_point is None else zero_point.astype(np.int64)
    low, high = INTEGER_RANGES[dtype]
    context.quantized[node.output[0]] = PendingQuantization(
        source, np.broadcast_to(scale, (channels,)).astype(np.float32),
        np.broadcast_to(zero_point, (channels,)).astype(np.int64), low, high, dtype, node.name)


@integer_input_converter("Clip")
def convert_clip_of_integer(node, context):
    """Clip of QuantizeLinear's integer (QCDQ): narrows the range of the pending quantization."""
    pending = context.quantized[node.input[0]]
    bounds = {"min": pending.low, "max": pending.high}
    for index, key in ((1, "min"), (2, "max")):
        if len(node.input) > index and node.input[index]:
            value = np.asarray(numeric_constant(node, context, node.input[index], key))
            if value.size != 1 or value.dtype.name != pending.dtype:
                context.fail(node, f"{key} must be a {pending.dtype} scalar (the type of QuantizeLinear "
                                   f"{pending.quantize_node!r}), found {value.dtype}{list(value.shape)}")
            bounds[key] = int(value.reshape(-1)[0].astype(np.int64))
    low, high = max(pending.low, bounds["min"]), min(pending.high, bounds["max"])
    if low > high:
        context.fail(node, f"clips the integer to an empty range: min {bounds['min']} > max {bounds['max']}")
    context.quantized[node.output[0]] = dataclasses.replace(pending, low=low, high=high)


@onnx_converter("DequantizeLinear")
def convert_dequantize_linear(node, context):
    """DequantizeLinear of a pending QuantizeLinear [-> Clip] (constants are folded before): the exact
    Staircase with levels fl32(fl32(k - zero_point) * scale) for k = low..high and thresholds from
    `integer_thresholds`. The levels must be shared by every channel: scale and zero point per tensor."""
    _check_unblocked(node, context)
    pending = context.quantized.get(node.input[0])
    if pending is None:
        context.fail(node, f"input {node.input[0]!r} must be a constant or the integer output of a QuantizeLinear "
                           "(optionally through Clip)")
    count = pending.high - pending.low + 1
    if count > MAX_LEVELS:
        context.fail(node, f"the quantizer of QuantizeLinear {pending.quantize_node!r} takes {count} levels "
                           f"({pending.dtype} in [{pending.low}, {pending.high}]); only quantizers of at most "
                           f"{MAX_LEVELS} levels are imported (clip the integer range, e.g. with Clip)")
    if count < 2:
        context.fail(node, f"the quantizer of QuantizeLinear {pending.quantize_node!r} takes the single level "
                           f"{pending.low}: a constant, not a quantizer")
    scale = np.asarray(numeric_constant(node, context, node.input[1], "x_scale"))
    zero_point = np.asarray(numeric_constant(node, context, node.input[2], "x_zero_point")) \
        if len(node.input) > 2 and node.input[2] else np.zeros(1, np.int64)
    if scale.size != 1 or zero_point.size != 1:
        context.fail(node, f"x_scale {list(scale.shape)} and x_zero_point {list(zero_point.shape)} must be scalars: "
                           "a Staircase's levels are shared by every channel")
    if scale.dtype != np.float32:
        context.fail(node, f"x_scale has dtype {scale.dtype}; expected float32")
    if len(node.input) > 2 and node.input[2] and zero_point.dtype.name != pending.dtype:
        context.fail(node, f"x_zero_point has type {zero_point.dtype}, QuantizeLinear {pending.quantize_node!r} "
                           f"makes {pending.dtype}")
    scale = as_float32(node, context, scale, "x_scale").reshape(())
    integers = np.arange(pending.low, pending.high + 1) - int(zero_point.reshape(-1)[0].astype(np.int64))
    levels = integers.astype(np.float32) * scale  # float32, as ONNX computes it
    thresholds = integer_thresholds(pending.scale, pending.zero_point, pending.low, pending.high)
    if not np.all(np.isfinite(thresholds)):
        context.fail(node, f"a level of QuantizeLinear {pending.quantize_node!r} is reached only by +inf "
                           f"(y_scale {pending.scale.max()} is too large for its integer range)")
    # Consecutive levels are fl32(n s) and fl32((n - 1) s), |n| >= 1, within a factor of 2 of each
    # other (or one is 0): their difference is exact in float32, so lowest + steps rebuilds them exactly.
    steps = np.diff(levels.astype(np.float64)).astype(np.float32)
    context.emit("Staircase", node, [pending.source], {},
                 {"thresholds": np.ascontiguousarray(thresholds), "steps": steps, "lowest": levels[:1].copy()})


# ---- QONNX BipolarQuant -----------------------------------------------------------------------------

def convert_bipolar_quant(node, context):
    """QONNX BipolarQuant (inputs X, scale; no attributes): Y = scale * (X >= 0 ? +1 : -1), so NaN
    gives -scale. On a constant X: a folded constant. On a run-time X with a scalar scale: the exact
    Staircase -scale + 2 scale [x >= 0] (NaN gets its lowest level, -scale, as in the definition)."""
    if len(node.input) != 2 or not all(node.input) or len(node.output) != 1 or not node.output[0]:
        context.fail(node, f"expects inputs (X, scale) and one output, found inputs {list(node.input)} and outputs "
                           f"{list(node.output)}")
    if node.attribute:
        context.fail(node, f"has no attributes, found {[attribute.name for attribute in node.attribute]}")
    scale = as_float32(node, context, numeric_constant(node, context, node.input[1], "scale"), "scale")
    if node.input[0] in context.constants:
        value = as_float32(node, context, numeric_constant(node, context, node.input[0], "X"), "X")
        context.constants[node.output[0]] = np.where(value >= 0, np.float32(1), np.float32(-1)) * scale
        return
    source = context.tensor(node, node.input[0])
    shape = context.shapes[source]
    if len(shape) < 2:
        context.fail(node, f"expects an input [batch, channels, ...], found {list(shape)}")
    if scale.size != 1:
        context.fail(node, f"on a run-time tensor only a scalar scale is supported (a Staircase's levels are shared "
                           f"by every channel), found scale of shape {list(scale.shape)}")
    level = scale.reshape(1)
    context.emit("Staircase", node, [source], {}, {"thresholds": np.zeros((1, shape[1]), np.float32),
                                                   "steps": 2 * level, "lowest": -level})


for _domain in CUSTOM_DOMAINS:
    onnx_converter("BipolarQuant", 1, 1, domain=_domain)(convert_bipolar_quant)
