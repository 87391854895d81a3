"""import_binary_layers: Conv/Gemm layers that are already binary become exact PA(M=1) layers.

A Conv (any group, depthwise included) or Gemm is already binary when
- its input is a Staircase (ONNX Sign, Where(Greater(x, t), a, b); see
  converters/onnx_ops_binary.py; QuantizeLinear [-> Clip] -> DequantizeLinear of at most 16
  levels, QONNX BipolarQuant; see converters/onnx_ops_quantize.py), directly or through a
  constant Pad of the spatial axes, and
- every weight of an output channel o is +alpha[o] or -alpha[o] (a channel of zeros is alpha 0).
It then equals, exactly, a PAConv/PALinear with M = 1 (sign plane w > 0, scale alpha, offset 0)
whose activation quantizer is that Staircase (N = its planes: 1 for two levels; 2 for Sign,
whose levels are -1, 0, +1). A grouped Conv keeps its group (each output channel's sign plane
covers its group's C/group input channels, engine/bits.py). Nothing is fitted; the result matches
the source model up to the rounding of float sums.

Padding (DESIGN.md section 2):
- Staircase -> Conv with pads: ONNX pads the quantized tensor with zeros, so the layer gets
  padding_rule "zero_after_quantizer" (exact by an edge correction; none is needed when the
  staircase maps 0 to 0, as Sign does).
- Staircase -> Pad(constant, value v, spatial axes only) -> Conv without pads: padding_rule
  "value_before_quantizer" with a pad_value that the staircase maps to v in every channel (v must
  be one of its levels, e.g. -1 or +1 after a Sign).
Anything else (other consumers of the Pad, channel padding, a Pad and conv pads together) leaves
the layer to the float/PA policy of `convert`.
"""
import copy

import numpy as np

from pabnn.engine.bits import pack_weight_planes
from pabnn.engine.graph import Graph, Node
from pabnn.engine.ops.pa_conv import act_quantize

from .passes import BINARIZABLE_OPS, layer_weight, name_matches

IMPORTED_OPS = ("PAConv", "PALinear")


def import_binary_layers(graph, keep_float=None):
    """Graph -> Graph with every already binary Conv/Gemm replaced by its exact PA layer (see the
    module docstring), and the Staircase/Pad nodes that only fed them removed. keep_float: names
    or glob patterns of layers to leave as they are."""
    keep = list(keep_float or [])
    producers = graph.producers()
    replacements = {}
    for node in graph.nodes:
        kept_float = any(name_matches(node.name, entry) for entry in keep)
        if node.op in BINARIZABLE_OPS and not kept_float:
            replacement = _binary_layer(node, producers)
            if replacement is not None:
                replacements[node.name] = replacement
    if not replacements:
        return graph
    nodes = [replacements.get(node.name, node) for node in graph.nodes]
    # Drop the Staircase and Pad nodes nothing reads any more (last to first: a Pad frees its Staircase).
    needed = set(graph.outputs)
    kept = []
    for node in reversed(nodes):
        if node.op in ("Staircase", "Pad") and not needed.intersection(node.outputs):
            continue
        needed.update(node.inputs)
        kept.append(node)
    return Graph(copy.deepcopy(graph.inputs), list(graph.outputs), kept[::-1], copy.deepcopy(graph.metadata))


def plus_minus_alpha(weight):
    """alpha [O] (float32) when every weight of output channel o is +alpha[o] or -alpha[o], else None.

    weight: float32 [O, ...]."""
    magnitude = np.abs(weight.reshape(weight.shape[0], -1))
    alpha = magnitude.max(axis=1)
    return alpha if np.array_equal(magnitude, np.broadcast_to(alpha[:, None], magnitude.shape)) else None


def input_for_level(staircase, level):
    """A finite float32 x with Staircase(x) == level in every channel, or None if there is none.

    Candidates are the thresholds and the float32 just below each: every interval between
    consecutive thresholds of every channel starts at one of them."""
    thresholds = staircase.params["thresholds"]
    candidates = np.concatenate([[0.0], thresholds.ravel(), np.nextafter(thresholds.ravel(), np.float32(-np.inf))])
    channels = thresholds.shape[1]
    for x in np.unique(candidates.astype(np.float32)):
        if not np.isfinite(x):
            continue
        levels = act_quantize(np.full((1, channels), x), thresholds, staircase.params["steps"],
                              staircase.params["lowest"])
        if np.all(levels == level):
            return float(x)
    return None


def _spatial_pads(pad_node):
    """[top, left, bottom, right] of a constant Pad that pads only H and W of a 4-d tensor, or None."""
    pads = pad_node.attrs.get("pads", [])
    if pad_node.attrs.get("mode", "constant") != "constant" or len(pads) != 6 or pads[0] or pads[3]:
        return None
    return [int(pads[1]), int(pads[2]), int(pads[4]), int(pads[5])]


def _binary_layer(node, producers):
    """The exact PA replacement of Conv/Gemm `node`, or None when it is not already binary."""
    source = producers.get(node.inputs[0])
    attrs = {}
    if node.op == "Conv":
        attrs = {key: list(node.attrs[key]) for key in ("strides", "pads", "dilations")}
        attrs["padding_rule"] = "zero_after_quantizer" if any(attrs["pads"]) else "zero_before_quantizer"
    else:
        attrs["padding_rule"] = "zero_before_quantizer"
    if source is not None and source.op == "Pad" and node.op == "Conv":
        explicit = _spatial_pads(source)
        staircase = producers.get(source.inputs[0])
        if explicit is None or any(attrs["pads"]) or staircase is None or staircase.op != "Staircase":
            return None
        pad_value = input_for_level(staircase, float(np.float32(source.attrs.get("value", 0.0))))
        if pad_value is None:
            return None
        attrs.update(pads=explicit, padding_rule="value_before_quantizer", pad_value=pad_value)
    else:
        staircase = source
    if staircase is None or staircase.op != "Staircase":
        return None
    weight = layer_weight(node)
    alpha = plus_minus_alpha(weight)
    if alpha is None:
        return None
    group = node.attrs.get("group", 1) if node.op == "Conv" else 1
    in_channels = weight.shape[1] * group
    if group != 1:
        attrs["group"] = group
    if "activation" in node.attrs:
        attrs["activation"] = node.attrs["activation"]
    params = {
        "weight_planes": pack_weight_planes((weight > 0)[None]),
        "weight_scales": alpha[None, :].astype(np.float32),
        "weight_offset": np.zeros(weight.shape[0], np.float32),
        "act_thresholds": np.ascontiguousarray(staircase.params["thresholds"], np.float32),
        "act_steps": np.asarray(staircase.params["steps"], np.float32),
        "act_lowest": np.asarray(staircase.params["lowest"], np.float32),
        "bias": np.asarray(node.params["bias"], np.float32),
    }
    op = "PAConv" if node.op == "Conv" else "PALinear"
    return Node(op, node.name, [staircase.inputs[0]] + list(node.inputs[1:]), list(node.outputs),
                dict(attrs, in_channels=in_channels), params)
