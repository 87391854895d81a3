"""Per-sample dynamic convolution weights (ODConv, CondConv, modulated convs).

PyTorch writes a convolution whose weights are computed from each input by folding the batch into
the channels and convolving with one group per sample:

    b, c, h, w = x.shape
    weight = self.weight.unsqueeze(0) * attention            # [B, O, C/g, kh, kw]
    y = F.conv2d(x.reshape(1, b * c, h, w), weight.reshape(-1, c // g, kh, kw), groups=b * g)
    y = y.reshape(b, -1, y.shape[-2], y.shape[-1])

Exported to ONNX this is Reshape(x) -> Conv(group=B*g, run-time weight Reshape(w)) -> Reshape,
with the export batch B baked into `group`. Three steps make it a batch-free graph:

- `exportable_run_time_conv_weights`: the TorchScript exporter refuses a Conv whose kernel size is
  unknown, which it always is for such weights under a dynamic batch; inside this context it
  writes the Conv without `kernel_shape` (the weight's shape defines it in ONNX).
- `recognize_dynamic_weight_convs` (ONNX -> ONNX, before import): each such Conv with its two
  batch-folding Reshapes becomes one `DynamicConv` node of the importer's private domain
  DYNAMIC_WEIGHTS_DOMAIN, reading x [B, C, H, W] and the per-sample weights directly; the
  output Reshape stays and must keep the batch first. A Conv with a run-time weight that does not
  match raises ConversionError. `convert_dynamic_conv` turns the node into IR
  (engine/ops/dynamic_conv.py).
- `factor_dynamic_weights` (Graph -> Graph, before binarization): when the per-sample weight is a
  constant W times an attention that varies per output channel only ([B, O, 1, 1, 1]), the layer
  is Conv(x, W) times the attention; per input channel only ([B, 1, C/g, 1, 1]), it is
  Conv(x * attention, W). The Conv then has constant weights and can be binarized like any other.
"""
import contextlib

import numpy as np
import onnx
from onnx import numpy_helper

from pabnn.engine.errors import ConversionError
from pabnn.engine.graph import Graph, Node

from .onnx_registry import BATCH, EXPORT_OPSET, as_float32, spatial_attrs

# Nodes of this domain are made by `recognize_dynamic_weight_convs` only; a model that already
# holds one is refused.
DYNAMIC_WEIGHTS_DOMAIN = "pabnn.dynamic_weights"
_PATTERN = ("a per-sample dynamic convolution Reshape(x, [1, B*C, H, W]) -> Conv(group=B*g, weight "
            "Reshape(w, [B*O, C/g, kh, kw])) -> Reshape([B, ...])")
# Shape entries a reshape target may compute from the batch size (B*C, B*O): replaced by -1.
_INPUT_BATCH_ENTRY = 1
_WEIGHT_BATCH_ENTRY = 0


# ---- export ---------------------------------------------------------------------------------

@contextlib.contextmanager
def exportable_run_time_conv_weights():
    """Within this context, torch's TorchScript ONNX exporter (opset EXPORT_OPSET) exports a
    convolution whose kernel size it cannot infer as an ONNX Conv without `kernel_shape`;
    every other convolution is exported by torch's own rule, unchanged."""
    import torch
    from torch.onnx import symbolic_helper, symbolic_opset9

    def convolution(g, input, weight, bias, stride, padding, dilation, transposed, output_padding, groups, *rest):
        sizes = symbolic_helper._get_tensor_sizes(weight)
        kernel_known = sizes is not None and len(sizes) > 2 and all(size is not None for size in sizes[2:])
        if kernel_known or symbolic_helper._maybe_get_const(transposed, "i"):
            return symbolic_opset9._convolution(g, input, weight, bias, stride, padding, dilation, transposed,
                                                output_padding, groups, *rest)
        inputs = [input, weight] if symbolic_helper._is_none(bias) else [input, weight, bias]
        pads = list(symbolic_helper._maybe_get_const(padding, "is"))
        return g.op("Conv", *inputs, strides_i=symbolic_helper._maybe_get_const(stride, "is"), pads_i=pads + pads,
                    dilations_i=symbolic_helper._maybe_get_const(dilation, "is"),
                    group_i=symbolic_helper._maybe_get_const(groups, "i"))

    torch.onnx.register_custom_op_symbolic("aten::_convolution", convolution, EXPORT_OPSET)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::_convolution", EXPORT_OPSET)


# ---- ONNX pre-pass --------------------------------------------------------------------------

def recognize_dynamic_weight_convs(graph):
    """Rewrite, in place, every ONNX Conv of `graph` (an onnx.GraphProto) whose weight is computed
    at run time into a DYNAMIC_WEIGHTS_DOMAIN DynamicConv node.

    The Conv must read Reshape(x, S_x) and Reshape(w, S_w), and every reader of its output must be
    a Reshape (of that output as data). The new node reads (x, w, bias, S_x', S_w') and its output
    [B, O, H', W'] replaces the Conv output in those Reshapes; S_x' and S_w' are S_x and S_w with
    their batch-dependent entry (B*C, B*O) replaced by -1 when they are 4-entry Concats. Nodes that
    only computed what was removed are removed too. Raises ConversionError for a run-time weight
    in any other form.
    """
    for node in graph.node:
        if node.domain == DYNAMIC_WEIGHTS_DOMAIN:
            raise ConversionError(f"ONNX node {node.name!r}: domain {DYNAMIC_WEIGHTS_DOMAIN!r} is reserved for "
                                  "the importer's own nodes")
    run_time = _run_time_tensors(graph)
    # One list of the node messages, held for the whole pass: ids of its entries stay unique.
    original = list(graph.node)
    # A Conv without its required names is left to the importer's structure check.
    convs = [node for node in original if node.op_type == "Conv" and node.domain in ("", "ai.onnx")
             and len(node.input) >= 2 and node.input[0] and node.input[1] in run_time
             and len(node.output) >= 1 and node.output[0]]
    if not convs:
        return
    consumed_before = _consumed(original, graph)
    taken = _defined_names(graph)
    replacements = {}  # id of a removed node -> nodes to put in its place
    for conv in convs:
        replacements.update(_dynamic_conv_nodes(graph, original, conv, taken))
    nodes = []
    for node in original:
        nodes.extend(replacements.get(id(node), [node]))
    # Copies: a message removed from a repeated field is cleared with it.
    nodes = [_copy_node(node) for node in _without_dead_nodes(nodes, graph, consumed_before)]
    del graph.node[:]
    graph.node.extend(nodes)


def _copy_node(node):
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def _dynamic_conv_nodes(graph, nodes, conv, taken):
    """{id of node: replacement nodes} turning `conv` (one of `nodes`) and its batch-folding
    Reshapes into DynamicConv."""
    producers = {name: node for node in nodes for name in node.output if name}
    readers = _readers(nodes)
    where = f"ONNX node {conv.name!r} (Conv)"
    expected = f"the weight must be a constant, or computed at run time as {_PATTERN}"
    input_reshape, weight_reshape = producers.get(conv.input[0]), producers.get(conv.input[1])
    for what, name, reshape in (("weight", conv.input[1], weight_reshape), ("input", conv.input[0], input_reshape)):
        if reshape is None or reshape.op_type != "Reshape" or len(reshape.input) != 2:
            found = f"graph input {name!r}" if reshape is None else f"{reshape.op_type} node {reshape.name!r}"
            raise ConversionError(f"{where}: {expected}; its {what} comes from {found}")
    output = conv.output[0]
    output_readers = readers.get(output, [])
    if output in {value.name for value in graph.output} or not output_readers \
            or any(reader.op_type != "Reshape" or list(reader.input).count(output) != 1 or reader.input[0] != output
                   for reader in output_readers):
        found = ", ".join(f"{reader.op_type} {reader.name!r}" for reader in output_readers) or "a graph output"
        raise ConversionError(f"{where}: {expected}; its output is read by {found} instead of Reshapes alone")
    minus_one = onnx.helper.make_node("Constant", [], [_fresh(f"{conv.name or output}/batch_entry", taken)],
                                      value=numpy_helper.from_array(np.array([-1], np.int64)))
    new_nodes = [minus_one]
    input_target = _batch_free_target(input_reshape.input[1], producers, _INPUT_BATCH_ENTRY, minus_one.output[0],
                                      new_nodes, taken)
    weight_target = _batch_free_target(weight_reshape.input[1], producers, _WEIGHT_BATCH_ENTRY, minus_one.output[0],
                                       new_nodes, taken)
    if len(new_nodes) == 1:  # neither target is a Concat: -1 is not needed
        new_nodes = []
    per_sample = _fresh(f"{output}/per_sample", taken)
    bias = conv.input[2] if len(conv.input) > 2 else ""
    dynamic = onnx.helper.make_node("DynamicConv", [input_reshape.input[0], weight_reshape.input[0], bias,
                                                    input_target, weight_target], [per_sample],
                                    name=conv.name, domain=DYNAMIC_WEIGHTS_DOMAIN)
    dynamic.attribute.extend(conv.attribute)
    for reader in output_readers:
        reader.input[0] = per_sample
    replacements = {id(conv): new_nodes + [dynamic]}
    for reshape in (input_reshape, weight_reshape):
        if len(readers.get(reshape.output[0], [])) == 1:
            replacements[id(reshape)] = []
    return replacements


def _batch_free_target(name, producers, batch_entry, minus_one, new_nodes, taken):
    """The reshape target `name`, or when a 4-input Concat makes it, a copy of that Concat with
    input `batch_entry` (the entry that multiplies the batch size) replaced by `minus_one`."""
    producer = producers.get(name)
    if producer is None or producer.op_type != "Concat" or len(producer.input) != 4:
        return name
    inputs = list(producer.input)
    inputs[batch_entry] = minus_one
    concat = onnx.helper.make_node("Concat", inputs, [_fresh(f"{name}/batch_free", taken)], axis=0)
    new_nodes.append(concat)
    return concat.output[0]


def _run_time_tensors(graph):
    """Names of the tensors computed at run time: graph inputs that are not initializers and the
    outputs of nodes reading one, except Shape (whose output the importer folds)."""
    initializers = {tensor.name for tensor in graph.initializer}
    run_time = {value.name for value in graph.input if value.name not in initializers}
    for node in graph.node:
        if node.op_type != "Shape" and any(name in run_time for name in node.input):
            run_time.update(name for name in node.output if name)
    return run_time


def _readers(nodes):
    readers = {}
    for node in nodes:
        for name in dict.fromkeys(node.input):
            readers.setdefault(name, []).append(node)
    return readers


def _consumed(nodes, graph):
    return {name for node in nodes for name in node.input} | {value.name for value in graph.output}


def _without_dead_nodes(nodes, graph, consumed_before):
    """`nodes` less those whose outputs were read before the rewrite and are read no more."""
    while True:
        consumed = _consumed(nodes, graph)
        alive = [node for node in nodes
                 if not any(name in consumed_before for name in node.output)
                 or any(name in consumed for name in node.output)]
        if len(alive) == len(nodes):
            return nodes
        nodes = alive


def _defined_names(graph):
    names = {tensor.name for tensor in graph.initializer} | {value.name for value in graph.input}
    return names | {name for node in graph.node for name in node.output}


def _fresh(name, taken):
    candidate, index = name, 1
    while candidate in taken:
        index += 1
        candidate = f"{name}_{index}"
    taken.add(candidate)
    return candidate


# ---- import of the DynamicConv node -----------------------------------------------------------

def convert_dynamic_conv(node, context):
    """IR for a DynamicConv node of `recognize_dynamic_weight_convs`: per-sample Reshapes of x to
    [C, H, W] and of w to [O, C/g, kh, kw] where needed, then DynamicConv with group g = C / (C/g)
    (the node's `group` is the export batch times g)."""
    if len(node.input) != 5 or len(node.output) != 1:
        context.fail(node, f"expected inputs (x, w, bias, input target, weight target) and 1 output, found "
                           f"{len(node.input)} and {len(node.output)}")
    x = context.tensor(node, node.input[0])
    weights = context.tensor(node, node.input[1])
    _, height, width = _target_entries(node, context, node.input[3], _INPUT_BATCH_ENTRY, "input reshape target")
    in_per_group, kernel_h, kernel_w = _target_entries(node, context, node.input[4], _WEIGHT_BATCH_ENTRY,
                                                       "weight reshape target")
    x_elements = int(np.prod(context.shapes[x][1:]))
    weight_elements = int(np.prod(context.shapes[weights][1:]))
    if x_elements % (height * width) or weight_elements % (in_per_group * kernel_h * kernel_w):
        context.fail(node, f"the input {list(context.shapes[x])} does not fold to [1, B*C, {height}, {width}] or the "
                           f"weights {list(context.shapes[weights])} to [B*O, {in_per_group}, {kernel_h}, {kernel_w}]")
    channels = x_elements // (height * width)
    out_channels = weight_elements // (in_per_group * kernel_h * kernel_w)
    export_group = int(context.attr(node, "group", 1))
    group = channels // in_per_group if channels % in_per_group == 0 else 0
    if group == 0 or export_group % group or out_channels % group:
        context.fail(node, f"group {export_group} is not the batch times a group count that divides {channels} "
                           f"input channels into groups of {in_per_group} and {out_channels} output channels")
    kernel_shape = context.attr(node, "kernel_shape")
    if kernel_shape is not None and list(kernel_shape) != [kernel_h, kernel_w]:
        context.fail(node, f"kernel_shape {list(kernel_shape)} differs from the weights' [{kernel_h}, {kernel_w}]")
    params = {}
    if node.input[2]:
        params["bias"] = _per_sample_bias(node, context, node.input[2], export_group // group, out_channels)
    x = _reshaped(node, context, x, (channels, height, width), "input")
    weights = _reshaped(node, context, weights, (out_channels, in_per_group, kernel_h, kernel_w), "weights")
    strides, pads, dilations = spatial_attrs(node, context, [kernel_h, kernel_w], context.shapes[x])
    context.emit("DynamicConv", node, [x, weights],
                 {"strides": strides, "pads": pads, "dilations": dilations, "group": group}, params)


def _target_entries(node, context, name, batch_entry, what):
    """The three entries of 4-entry reshape target `name` that do not depend on the batch, as
    positive ints; entry 0 of the input target must be 1."""
    target = context.constant(name)
    if target is None:
        context.fail(node, f"the {what} {name!r} must be computed from shapes at conversion")
    entries = [entry if entry is BATCH else int(entry) for entry in np.asarray(target).reshape(-1)]
    if len(entries) != 4:
        context.fail(node, f"the {what} must have 4 entries, found {entries}")
    kept = [entry for index, entry in enumerate(entries) if index != batch_entry]
    if any(entry is BATCH for entry in kept) or not all(entry > 0 for entry in kept) \
            or (batch_entry == _INPUT_BATCH_ENTRY and int(kept[0]) != 1):
        expected = "[1, B*C, H, W]" if batch_entry == _INPUT_BATCH_ENTRY else "[B*O, C/g, kh, kw]"
        context.fail(node, f"the {what} must be {expected} with positive sizes, found {entries}")
    return kept


def _per_sample_bias(node, context, name, export_batch, out_channels):
    """The bias of one sample: the Conv's bias repeats it once per sample of the export batch."""
    bias = context.constant(name)
    if bias is None:
        context.fail(node, "the bias must be a constant")
    bias = as_float32(node, context, bias, "bias").reshape(-1)
    if bias.size != export_batch * out_channels or not np.all(bias.reshape(export_batch, -1) == bias[:out_channels]):
        context.fail(node, f"the bias must repeat {out_channels} values once per sample of the export batch "
                           f"{export_batch}, found {bias.size} values")
    return np.ascontiguousarray(bias[:out_channels])


def _reshaped(node, context, tensor, per_sample, what):
    """`tensor` reshaped per sample to `per_sample` (an IR Reshape named after the node) if needed."""
    if tuple(context.shapes[tensor][1:]) == tuple(per_sample):
        return tensor
    part = onnx.NodeProto()
    part.CopyFrom(node)
    part.name = f"{node.name}/{what}"
    output = f"{node.output[0]}/{what}"
    context.emit("Reshape", part, [tensor], {"shape": list(per_sample)}, outputs=[output])
    return output


# ---- factorization ----------------------------------------------------------------------------

def factor_dynamic_weights(graph):
    """Graph -> Graph: each DynamicConv whose weight input is Mul(attention, constant W) with W of
    the weight's full shape [O, C/g, kh, kw] (or [1, O, C/g, kh, kw]) and an attention that
    factorizes is rewritten with a constant-weight Conv named like it:

        attention [B, O, 1, 1, 1] or [B, 1, 1, 1, 1]:  y = Conv(x, W) * attention[:, :, 0] (+ bias)
        attention [B, 1, C/g, 1, 1]:                   y = Conv(x * attention repeated per group, W)

    exact up to float rounding. Other DynamicConvs are kept (float). The Mul is removed when
    nothing else reads it.
    """
    shapes = graph.infer_shapes()
    producers = graph.producers()
    taken = {node.name for node in graph.nodes} | set(shapes)
    replacements = {}
    factored_weights = set()  # outputs of the Muls that made the weights of rewritten DynamicConvs
    for node in graph.nodes:
        if node.op != "DynamicConv":
            continue
        factors = _weight_factors(producers.get(node.inputs[1]), shapes[node.inputs[1]])
        if factors is None:
            continue
        attention, weight = factors
        attention_shape = shapes[attention][1:]
        out_channels, in_per_group = weight.shape[:2]
        if attention_shape in ((out_channels, 1, 1, 1), (1, 1, 1, 1)):
            replacements[node.name] = _output_factored(node, attention, attention_shape[0], weight, taken)
        elif attention_shape == (1, in_per_group, 1, 1):
            replacements[node.name] = _input_factored(node, attention, weight, shapes[node.inputs[0]], taken)
        else:
            continue
        factored_weights.add(node.inputs[1])
    if not replacements:
        return graph
    nodes = []
    for node in graph.nodes:
        nodes.extend(replacements.get(node.name, [node]))
    read = {name for node in nodes for name in node.inputs} | set(graph.outputs)
    nodes = [node for node in nodes if not (node.outputs[0] in factored_weights and node.outputs[0] not in read)]
    result = Graph(list(graph.inputs), list(graph.outputs), nodes, dict(graph.metadata))
    result.infer_shapes()
    return result


def _weight_factors(producer, weight_shape):
    """(attention tensor name, constant W [O, C/g, kh, kw]) when `producer` is Mul(attention, W)
    with W of the full weight shape; else None."""
    if producer is None or producer.op != "Mul" or len(producer.inputs) != 1:
        return None
    constant = producer.params.get("constant")
    if not isinstance(constant, np.ndarray):
        return None
    if constant.ndim == 5 and constant.shape[0] == 1:
        constant = constant[0]
    if constant.shape != tuple(weight_shape[1:]):
        return None
    return producer.inputs[0], constant


def _output_factored(node, attention, attention_channels, weight, taken):
    """Conv(x, W) -> Mul by the attention reshaped to [B, O or 1, 1, 1] (-> + bias)."""
    conv_output = _fresh(f"{node.outputs[0]}/unscaled", taken)
    scale = _fresh(f"{node.outputs[0]}/channel_attention", taken)
    nodes = [
        _factored_conv(node, node.inputs[0], conv_output, weight, None),
        Node("Reshape", _fresh(f"{node.name}/channel_attention", taken), [attention], [scale],
             {"shape": [attention_channels, 1, 1]}),
    ]
    if "bias" not in node.params:
        return nodes + [Node("Mul", _fresh(f"{node.name}/scale", taken), [conv_output, scale], list(node.outputs))]
    scaled = _fresh(f"{node.outputs[0]}/scaled", taken)
    bias = node.params["bias"]
    return nodes + [
        Node("Mul", _fresh(f"{node.name}/scale", taken), [conv_output, scale], [scaled]),
        Node("ChannelAffine", _fresh(f"{node.name}/bias", taken), [scaled], list(node.outputs), {},
             {"scale": np.ones_like(bias), "shift": bias}),
    ]


def _input_factored(node, attention, weight, input_shape, taken):
    """x [B, C, H, W] viewed as [B, g, C/g, H, W] times the attention [B, 1, C/g, 1, 1] -> Conv(., W)."""
    _, channels, height, width = input_shape
    group = node.attrs.get("group", 1)
    grouped = _fresh(f"{node.inputs[0]}/grouped", taken)
    scaled = _fresh(f"{node.inputs[0]}/input_attention", taken)
    scaled_input = _fresh(f"{node.inputs[0]}/scaled", taken)
    return [
        Node("Reshape", _fresh(f"{node.name}/grouped", taken), [node.inputs[0]], [grouped],
             {"shape": [group, channels // group, height, width]}),
        Node("Mul", _fresh(f"{node.name}/input_attention", taken), [grouped, attention], [scaled]),
        Node("Reshape", _fresh(f"{node.name}/scaled", taken), [scaled], [scaled_input],
             {"shape": [channels, height, width]}),
        _factored_conv(node, scaled_input, node.outputs[0], weight, node.params.get("bias")),
    ]


def _factored_conv(node, source, output, weight, bias):
    """Conv named like DynamicConv `node`, with its geometry, constant `weight` and `bias` (None: zeros)."""
    bias = np.zeros(weight.shape[0], np.float32) if bias is None else bias
    attrs = {key: node.attrs[key] for key in ("strides", "pads", "dilations", "group") if key in node.attrs}
    return Node("Conv", node.name, [source], [output], attrs,
                {"weight": np.ascontiguousarray(weight, np.float32), "bias": np.asarray(bias, np.float32)})
