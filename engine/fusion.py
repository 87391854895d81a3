"""Plan-time passes that keep intermediate tensors out of memory; `Session` applies them when it
plans a graph, and .pab files keep the plain nodes.

- fuse_epilogues: fold Conv/PAConv -> Add (residual) -> Relu chains into the conv's epilogue.
  The fused node computes activation(conv(x) + b + residual) in one pass over its output
  (engine/ops/_epilogue.py), so the conv output is never written out and read back in float32.
- hand_off_planes: a PAConv feeding PAConvs writes their bit-planes directly (and its float32
  output too when other nodes read it).
"""
import numpy as np

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
    """Graph -> Graph. A PAConv whose output is read by PAConvs (as their input) writes their
    activation bit-planes as well as, or instead of, float32 (engine/ops/pa_conv.py): the producer
    gets attrs["output_planes"] = {"pads", "pad_value", "group", "coding"} and
    params["output_thresholds"] of its first such reader (coding: the reader's act_coding, so a
    binary-coded reader gets the bits of its level index, a thermometer-coded one its threshold
    bits), and every PAConv reader with the same planes (the same thresholds, code, pads, pad
    value and group) gets attrs["input_planes"] = True and reads them. When these readers are all
    the tensor's readers, the producer's one output is the planes; otherwise (a residual Add fused
    into a later conv, a float op, a reader with other pads or thresholds) it has two outputs, the
    float32 tensor, still read by the others, and the planes in a new tensor "<name>.planes". The
    planes are exactly what each reader would pack from the float32 output, so results do not
    change. Tensors named in `keep` or graph outputs are never handed off. Apply after
    `fuse_epilogues` (the producer's epilogue then includes its residual and ReLU).
    """
    protected = set(keep) | set(graph.outputs)
    readers = _readers(graph.nodes)
    names = {info.name for info in graph.inputs} | {name for node in graph.nodes for name in node.outputs}
    handed = {}  # producer name -> (first planes reader, planes tensor name, two outputs)
    planes_of = {}  # reader name -> the planes tensor it reads
    for node in graph.nodes:
        output = node.outputs[0]
        if node.op != "PAConv" or len(node.outputs) != 1 or output in protected:
            continue
        found = readers.get(output, [])
        binary = [reader for reader in found if reader.op == "PAConv" and reader.inputs.count(output) == 1
                  and reader.inputs[0] == output]
        if not binary:
            continue
        spec = _planes_spec(binary[0])
        sharing = [reader for reader in binary if _planes_spec(reader) == spec]
        two_outputs = len(sharing) < len(found)
        planes = output
        if two_outputs:
            planes = _unused_name(f"{output}.planes", names)
            names.add(planes)
        handed[node.name] = (binary[0], planes, two_outputs)
        planes_of.update((reader.name, planes) for reader in sharing)
    nodes = []
    for node in graph.nodes:
        attrs, params, outputs, inputs = dict(node.attrs), dict(node.params), list(node.outputs), list(node.inputs)
        if node.name in handed:
            reader, planes, two_outputs = handed[node.name]
            _, pad_value = padding_rule(reader)
            attrs["output_planes"] = {"pads": list(reader.attrs.get("pads", [0, 0, 0, 0])),
                                      "pad_value": float(pad_value), "group": reader.attrs.get("group", 1),
                                      "coding": act_coding(reader)}
            params["output_thresholds"] = reader.params["act_thresholds"]
            if two_outputs:
                outputs.append(planes)
        if node.name in planes_of:
            attrs["input_planes"] = True
            inputs[0] = planes_of[node.name]
        nodes.append(Node(node.op, node.name, inputs, outputs, attrs, params))
    return Graph(graph.inputs, graph.outputs, nodes, graph.metadata)


def _planes_spec(reader):
    """What decides the planes a PAConv packs from its input: (pads, pad value, group, code, thresholds)."""
    _, pad_value = padding_rule(reader)
    thresholds = np.asarray(reader.params["act_thresholds"], dtype=np.float32)
    return (tuple(reader.attrs.get("pads", [0, 0, 0, 0])), float(pad_value), reader.attrs.get("group", 1),
            act_coding(reader), thresholds.shape, thresholds.tobytes())


def _unused_name(name, names):
    """`name`, or `name` with the first suffix "_2", "_3", ... that is not in `names`."""
    candidate, suffix = name, 2
    while candidate in names:
        candidate, suffix = f"{name}_{suffix}", suffix + 1
    return candidate


def _readers(nodes):
    """{tensor name: [nodes that read it]} (a node reading a tensor twice is listed twice)."""
    readers = {}
    for node in nodes:
        for name in node.inputs:
            readers.setdefault(name, []).append(node)
    return readers
