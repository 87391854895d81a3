"""Graph -> Graph passes of the converter, each a pure function named after what it does."""
import copy
import fnmatch

import numpy as np

from pabnn.engine.bits import pack_weight_planes
from pabnn.engine.errors import ConversionError
from pabnn.engine.graph import Graph, Node
from pabnn.engine.ops.pa_conv import binary_plane_steps

from .fitting import StaircaseFit, UniformStaircaseFit, staircase_to_bases

BINARIZABLE_OPS = ("Conv", "Gemm")
# Ops whose output is nonnegative whenever all their inputs are.
_SIGN_PRESERVING_OPS = ("MaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Reshape", "Add", "LRN")


def _copy(graph, nodes=None):
    return Graph(copy.deepcopy(graph.inputs), list(graph.outputs),
                 nodes if nodes is not None else list(graph.nodes), copy.deepcopy(graph.metadata))


def fold_batchnorm(graph):
    """Fold each ChannelAffine (inference BatchNorm, per-channel constant add) into the Conv or
    Gemm that feeds it, when nothing else reads that Conv's output:
        W'[o] = W[o] * scale[o],  b'[o] = b[o] * scale[o] + shift[o].
    """
    consumers = graph.consumers()
    producers = graph.producers()
    folded = {}  # name of the folded ChannelAffine -> replacement of its producer
    for node in graph.nodes:
        if node.op != "ChannelAffine":
            continue
        source = producers.get(node.inputs[0])
        if (source is None or source.op not in BINARIZABLE_OPS or len(consumers[node.inputs[0]]) != 1
                or node.inputs[0] in graph.outputs):
            continue
        scale = node.params["scale"].astype(np.float64)
        weight = source.params["weight"].astype(np.float64)
        params = dict(source.params,
                      weight=(weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))).astype(np.float32),
                      bias=(source.params["bias"] * scale + node.params["shift"]).astype(np.float32))
        merged = Node(source.op, source.name, list(source.inputs), list(node.outputs), dict(source.attrs), params)
        folded[source.name] = merged
        folded[node.name] = None
    if not folded:
        return graph
    nodes = [folded.get(node.name, node) for node in graph.nodes]
    # A chain (Conv -> BatchNorm -> per-channel Add) folds one link per sweep.
    return fold_batchnorm(_copy(graph, [node for node in nodes if node is not None]))


def is_nonnegative(graph, tensor):
    """True when `tensor` is >= 0 by construction (it follows a ReLU through sign-preserving ops)."""
    producer = graph.producers().get(tensor)
    if producer is None:
        return False
    if producer.op == "Relu":
        return True
    return producer.op in _SIGN_PRESERVING_OPS and all(is_nonnegative(graph, name) for name in producer.inputs)


def is_depthwise(node):
    """True for a grouped Conv whose output channels each read one input channel (C/group = 1)."""
    return node.op == "Conv" and node.attrs.get("group", 1) > 1 and node.params["weight"].shape[1] == 1


def fan_in(node):
    """Inputs summed into one output value of a Conv or Gemm: (C/group) * kh * kw, or K."""
    return int(np.prod(node.params["weight"].shape[1:]))  # Conv [O, C/group, kh, kw], Gemm [O, K]


def choose_layers_to_binarize(graph, binarize=None, keep_float=None, binarize_depthwise=False, min_fan_in=64):
    """Names of the Conv/Gemm nodes to binarize, in graph order.

    Default: every Conv (grouped ones included) and Gemm except the first and the last of them
    in graph order, except depthwise convs (`is_depthwise`) unless `binarize_depthwise`, and
    except layers whose `fan_in` is below `min_fan_in`: a binarized output sums the staircase
    errors of its fan-in products, and with few of them they do not average out (docs/accuracy.md:
    the MobileNet's 1x1 convs with 12-40 inputs; a 64-bit word holds 64 inputs).
    binarize: node names or glob patterns (`fnmatch`, e.g. "/layer3/*") choosing the layers
    instead of the default (any Conv/Gemm, depthwise included). keep_float: names or patterns
    removed from the selection. An entry that matches no Conv/Gemm layer is an error.
    """
    all_layers = [n.name for n in graph.nodes if n.op in BINARIZABLE_OPS]
    if binarize is None:
        candidates = [n.name for n in graph.nodes
                      if n.op in BINARIZABLE_OPS and (binarize_depthwise or not is_depthwise(n))
                      and fan_in(n) >= min_fan_in]
        chosen = {name for name in candidates if name not in (all_layers[0], all_layers[-1])}
    else:
        chosen = _matching_layers(binarize, all_layers, "cannot binarize {entry!r}: no Conv/Gemm layer matches; "
                                                        "binarizable layers are {layers}")
    kept = _matching_layers(keep_float or [], all_layers, "keep_float names {entry!r}, which matches no Conv/Gemm "
                                                          "layer; layers: {layers}")
    return [name for name in all_layers if name in chosen and name not in kept]


def name_matches(name, entry):
    """True when node `name` is `entry` or matches it as a glob pattern (fnmatch)."""
    return name == entry or fnmatch.fnmatchcase(name, entry)


def _matching_layers(entries, layers, message):
    """The layers that the names or glob patterns in `entries` match; ConversionError for an entry
    that matches none."""
    matched = set()
    for entry in entries:
        hits = [name for name in layers if name_matches(name, entry)]
        if not hits:
            raise ConversionError(message.format(entry=entry, layers=layers))
        matched.update(hits)
    return matched


def fit_activation_staircase(values, act_bases, nonnegative, act_coding="thermometer"):
    """Per-tensor activation staircase (levels shared by all channels).

    nonnegative: the tensor follows a ReLU, so the lowest level is fixed to 0. Otherwise the
    least-squares and symmetric fits are both tried and the better kept.
    act_coding "binary": levels on a uniform grid lowest + e * q (`UniformStaircaseFit`, started
    from those fits), as the binary activation code needs.
    """
    if act_coding == "binary":
        return UniformStaircaseFit(act_bases, lowest_level=0.0 if nonnegative else None).fit(values)
    if nonnegative:
        return StaircaseFit(act_bases, lowest_level=0.0).fit(values)
    fits = [StaircaseFit(act_bases).fit(values), StaircaseFit(act_bases, symmetric=True).fit(values)]
    return min(fits, key=lambda f: f.mse_)


def layer_weight(node):
    """The weight of Conv/Gemm `node` as float32 [O, C/group, kh, kw] (a Gemm is a 1x1 conv)."""
    weight = node.params["weight"]
    return weight[:, :, None, None] if node.op == "Gemm" else weight


def pa_node(node, weight_thresholds, weight_levels, act_thresholds, act_levels, in_channels, bias=None,
            act_coding="thermometer"):
    """PAConv/PALinear replacing Conv/Gemm `node` with explicit staircases:
    Qw per output channel (weight_thresholds [O, M], weight_levels [O, M+1]) and Qa shared by
    the tensor (act_levels [N+1]; act_thresholds [N], or [N, C] per channel). bias [O]: default
    the node's own. A grouped Conv keeps its group: each output channel's weight planes cover
    its group's C/group channels (the grouped layout of engine/bits.py).
    act_coding "binary": act_levels must be uniform (lowest + e * q); the node stores the binary
    code's plane weights e * 2^b (engine/ops/pa_conv.py) and attrs["act_coding"] = "binary".
    """
    signs, scales, offset = staircase_to_bases(layer_weight(node), weight_thresholds, weight_levels)
    act_thresholds = np.asarray(act_thresholds, dtype=np.float32)
    if act_thresholds.ndim == 1:
        act_thresholds = np.repeat(act_thresholds[:, None], in_channels, axis=1)
    act_levels = np.asarray(act_levels, dtype=np.float64)
    act_steps = np.diff(act_levels).astype(np.float32)
    if act_coding == "binary":
        step = (act_levels[-1] - act_levels[0]) / (act_levels.size - 1)
        if not np.allclose(np.diff(act_levels), step, rtol=1e-6, atol=0.0):
            raise ConversionError(f"node {node.name!r}: the binary activation code needs uniform levels "
                                  f"lowest + e * q, found levels {act_levels.tolist()}")
        act_steps = binary_plane_steps(step, act_levels.size - 1)
    params = {
        "weight_planes": pack_weight_planes(signs),
        "weight_scales": scales.astype(np.float32),
        "weight_offset": offset.astype(np.float32),
        "act_thresholds": np.ascontiguousarray(act_thresholds),
        "act_steps": act_steps,
        "act_lowest": np.array([act_levels[0]], np.float32),
        "bias": np.asarray(node.params["bias"] if bias is None else bias).astype(np.float32),
    }
    attrs = {"in_channels": in_channels, "padding_rule": "zero_before_quantizer"}
    if act_coding == "binary":
        attrs["act_coding"] = "binary"
    if node.op == "Conv":
        attrs.update({key: node.attrs[key] for key in ("strides", "pads", "dilations")})
        if node.attrs.get("group", 1) != 1:
            attrs["group"] = node.attrs["group"]
    op = "PAConv" if node.op == "Conv" else "PALinear"
    return Node(op, node.name, list(node.inputs), list(node.outputs), attrs, params)


def scale_layer_output(node, scale, shift):
    """The PA node computing scale[o] * y[o] + shift[o] instead of y[o]: exact, because y is
    linear in (weight_scales, weight_offset, bias). scale, shift: float [O], scale > 0."""
    scale = np.asarray(scale, dtype=np.float64)
    params = dict(node.params,
                  weight_scales=(node.params["weight_scales"] * scale[None, :]).astype(np.float32),
                  weight_offset=(node.params["weight_offset"] * scale).astype(np.float32),
                  bias=(node.params["bias"] * scale + shift).astype(np.float32))
    return Node(node.op, node.name, list(node.inputs), list(node.outputs), dict(node.attrs), params)
