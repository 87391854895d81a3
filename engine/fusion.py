"""Plan-time passes that keep intermediate tensors out of memory; `Session` applies them when it
plans a graph, and .pab files keep the plain nodes.

- fuse_epilogues: fold Conv/PAConv -> Add (residual) -> Relu chains into the conv's epilogue.
  The fused node computes activation(conv(x) + b + residual) in one pass over its output
  (engine/ops/_epilogue.py), so the conv output is never written out and read back in float32.
- hand_off_planes: a PAConv feeding another PAConv writes the reader's bit-planes directly.
"""
from .graph import Graph, Node
from .ops.pa_conv import act_coding, padding_rule

FUSABLE_OPS = ("Conv", "PAConv", "IntConv")


def fuse_epilogues(graph, keep=()):
    """Graph -> Graph. A conv whose only reader is an Add (whose other input has the conv output's
    shape) takes that input as its residual; a conv whose only reader is a Relu takes
    activation="relu". The fused node replaces the reader, at the reader's place in the order
    (where the residual is already computed). Tensors named in `keep` or graph outputs are never
    fused away.
    """
    protected = set(keep) | set(graph.outputs)
    shapes = graph.infer_shapes()
    nodes = list(graph.nodes)
    changed = True
    while changed:
        changed = False
        consumers = _readers(nodes)
        for index, node in enumerate(nodes):
            fused = _fuse_with_reader(node, consumers, shapes, protected)
            if fused is not None:
                reader = consumers[node.outputs[0]][0]
                nodes[nodes.index(reader)] = fused
                del nodes[index]
                changed = True
                break
    return Graph(graph.inputs, graph.outputs, nodes, graph.metadata)


def _fuse_with_reader(node, consumers, shapes, protected):
    if node.op not in FUSABLE_OPS or node.attrs.get("activation") is not None:
        return None
    output = node.outputs[0]
    readers = consumers.get(output, [])
    if output in protected or len(readers) != 1:
        return None
    reader = readers[0]
    if reader.op == "Relu":
        return Node(node.op, node.name, list(node.inputs), list(reader.outputs),
                    dict(node.attrs, activation="relu"), node.params)
    if reader.op == "Add" and len(node.inputs) == 1 and reader.inputs.count(output) == 1:
        residual = reader.inputs[1] if reader.inputs[0] == output else reader.inputs[0]
        if shapes[residual] == shapes[output]:
            return Node(node.op, node.name, list(node.inputs) + [residual], list(reader.outputs),
                        dict(node.attrs), node.params)
    return None


def hand_off_planes(graph, keep=()):
    """Graph -> Graph. A PAConv whose output is read by one PAConv only (as its input, once) writes
    that reader's activation bit-planes instead of float32 (engine/ops/pa_conv.py): the producer
    gets attrs["output_planes"] = {"pads", "pad_value", "group", "coding"} and
    params["output_thresholds"] of the reader (coding: the reader's act_coding, so a binary-coded
    reader gets the bits of its level index, a thermometer-coded one its threshold bits), the
    reader attrs["input_planes"] = True. The planes are exactly what the reader would pack from
    the float32 output, so results do not change. Tensors named in `keep` or
    graph outputs are never handed off. Apply after `fuse_epilogues` (the producer's epilogue
    then includes its residual and ReLU).
    """
    protected = set(keep) | set(graph.outputs)
    readers = _readers(graph.nodes)
    producers = {}
    for node in graph.nodes:
        output = node.outputs[0]
        found = readers.get(output, [])
        if (node.op == "PAConv" and output not in protected and len(found) == 1 and found[0].op == "PAConv"
                and found[0].inputs.count(output) == 1 and found[0].inputs[0] == output):
            producers[node.name] = found[0]
    readers_of_planes = {reader.name for reader in producers.values()}
    nodes = []
    for node in graph.nodes:
        attrs, params = dict(node.attrs), dict(node.params)
        if node.name in producers:
            reader = producers[node.name]
            _, pad_value = padding_rule(reader)
            attrs["output_planes"] = {"pads": list(reader.attrs.get("pads", [0, 0, 0, 0])),
                                      "pad_value": float(pad_value), "group": reader.attrs.get("group", 1),
                                      "coding": act_coding(reader)}
            params["output_thresholds"] = reader.params["act_thresholds"]
        if node.name in readers_of_planes:
            attrs["input_planes"] = True
        nodes.append(Node(node.op, node.name, list(node.inputs), list(node.outputs), attrs, params))
    return Graph(graph.inputs, graph.outputs, nodes, graph.metadata)


def _readers(nodes):
    """{tensor name: [nodes that read it]} (a node reading a tensor twice is listed twice)."""
    readers = {}
    for node in nodes:
        for name in node.inputs:
            readers.setdefault(name, []).append(node)
    return readers
