"""Integer layers: a Conv/Gemm becomes an exact 8-bit IntConv/IntLinear (engine/ops/int_conv.py).

Weights: symmetric per output channel, weight_scale[o] = max|W[o]| / 127 (1 for an all-zero
channel), int8 weight = rint(W / weight_scale) in -127..127.
Input: one uint8 scale and zero point per tensor from the calibration data seen at the layer
(`input_quantization`):
- when every calibration value lies on a grid lowest + k * step with at most 256 levels, 0
  among them (image pixels 0..255, or an affine map of them with 0 on the grid, such as
  pixels / 255 or digit intensities / 16), the scale is that step and the zero point the level
  of 0, so quantization reproduces every calibration value (up to float32 rounding of the grid);
- otherwise the range [min(0, min x), max(0, max x)] is split in 255 steps, the zero point being
  the level nearest to 0.
"""
import numpy as np

from pabnn.engine.errors import ConversionError
from pabnn.engine.graph import Node

from .passes import _matching_layers, layer_weight, name_matches

# A value lies on the grid when it is within this fraction of a step of a grid point.
GRID_TOLERANCE = 1e-3
INTEGER_OPS = ("Conv", "Gemm")


def choose_integer_layers(graph, integer, keep_float=None):
    """Names of the Conv/Gemm nodes that the names or glob patterns `integer` match, in graph
    order, less those `keep_float` matches; ConversionError for an entry that matches no layer."""
    layers = [node.name for node in graph.nodes if node.op in INTEGER_OPS]
    chosen = _matching_layers(integer or [], layers,
                              "integer names {entry!r}, which matches no Conv/Gemm layer; layers: {layers}")
    kept = {name for name in layers for entry in keep_float or [] if name_matches(name, entry)}
    return [name for name in layers if name in chosen and name not in kept]


def input_quantization(values):
    """(input_scale float32, zero_point int in 0..255, on_grid bool) for calibration `values`."""
    values = np.asarray(values, dtype=np.float32).ravel()
    levels = np.unique(values)
    grid = _grid(levels)
    if grid is not None:
        return grid[0], grid[1], True
    low, high = min(0.0, float(levels[0])), max(0.0, float(levels[-1]))
    if high == low:
        return np.float32(1.0), 0, False
    scale = np.float32((high - low) / 255)
    zero_point = int(np.clip(np.rint(-low / float(scale)), 0, 255))
    return scale, zero_point, False


def _grid(levels):
    """(step float32, zero point) when the sorted distinct `levels` lie on a grid of at most 256
    points that contains 0 (see the module docstring); None otherwise."""
    if len(levels) > 256 or len(levels) < 2:
        return None
    levels = levels.astype(np.float64)
    low, high = min(levels[0], 0.0), max(levels[-1], 0.0)
    step = float(np.min(np.diff(levels)))
    count = int(np.rint((high - low) / step))
    if count < 1 or count > 255:
        return None
    step = (high - low) / count  # the gap between the extremes refines the smallest difference
    positions = (levels - low) / step
    if np.max(np.abs(positions - np.rint(positions))) > GRID_TOLERANCE:
        return None
    zero_point = int(np.rint(-low / step))
    scale = np.float32(step)
    quantized = np.clip(np.rint(levels / np.float64(scale)) + zero_point, 0, 255)
    if not np.array_equal(quantized, np.rint(positions)):  # every level must land on its own grid point
        return None
    return scale, zero_point


def integer_node(node, inputs):
    """(IntConv/IntLinear node replacing Conv/Gemm `node`, report) with the input quantization of
    its calibration `inputs` [batch, ...]."""
    weight = layer_weight(node).astype(np.float64)
    peak = np.max(np.abs(weight.reshape(weight.shape[0], -1)), axis=1)
    weight_scale = np.where(peak > 0, peak / 127, 1.0).astype(np.float32)
    quantized = np.clip(np.rint(weight / weight_scale.astype(np.float64)[:, None, None, None]), -127, 127)
    input_scale, zero_point, on_grid = input_quantization(inputs)
    attrs = {"input_zero_point": zero_point}
    if node.op == "Conv":
        attrs.update({key: node.attrs[key] for key in ("strides", "pads", "dilations") if key in node.attrs})
        if node.attrs.get("group", 1) != 1:
            attrs["group"] = node.attrs["group"]
    params = {"weight": np.ascontiguousarray(quantized.astype(np.int8)), "weight_scale": weight_scale,
              "input_scale": np.array([input_scale], np.float32),
              "bias": np.asarray(node.params["bias"], dtype=np.float32)}
    op = "IntConv" if node.op == "Conv" else "IntLinear"
    report = {"layer": node.name, "kind": "int8", "input_scale": float(input_scale), "input_zero_point": zero_point,
              "input_on_grid": on_grid}
    return Node(op, node.name, list(node.inputs), list(node.outputs), attrs, params), report


def require_calibration(calibration, integer):
    """ConversionError when integer layers are asked for without calibration data."""
    if integer and calibration is None:
        raise ConversionError(f"integer layers {list(integer)} need calibration data: their input scale and "
                              "zero point come from the values the layer sees on it (pass calibration=<real "
                              "inputs [batch, ...]>)")
