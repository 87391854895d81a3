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
    activation bit-planes as well as, or instead of, float32 (engine/ops/pa_conv.py).

    Which readers share the planes: of the PAConv readers, those with the most common
    (act_thresholds, act_coding, group); the planes are padded as the one of them that pads most
    (all sides together), and each of them whose pads fit inside those on every side, with the same
    pad value unless it pads nothing, reads them. The producer gets attrs["output_planes"] =
    {"pads", "pad_value", "group", "coding"} and params["output_thresholds"] of that widest reader
    (a binary-coded reader gets the bits of its level index, a thermometer-coded one its threshold
    bits); each sharing reader gets attrs["input_planes"] = True, and, when it pads less than the
    planes, attrs["input_planes_pads"] = their pads (a ResNet's 1x1 downsample reads the planes of
    the 3x3 conv beside it from one row and column in). When the sharing readers are all the
    tensor's readers, the producer's one output is the planes; otherwise (a residual Add fused into
    a later conv, a float op, a reader with other thresholds) it has two outputs, the float32
    tensor, still read by the others, and the planes in a new tensor "<name>.planes". The planes
    are exactly what each reader would pack from the float32 output, so results do not change.
    Tensors named in `keep` or graph outputs are never handed off. Apply after `fuse_epilogues`
    (the producer's epilogue then includes its residual and ReLU).
    """
    protected = set(keep) | set(graph.outputs)
    readers = _readers(graph.nodes)
    names = {info.name for info in graph.inputs} | {name for node in graph.nodes for name in node.outputs}
    handed = {}  # producer name -> (the reader whose planes it writes, planes tensor name, two outputs)
    planes_of = {}  # reader name -> (the planes tensor it reads, the reader they are padded for)
    for node in graph.nodes:
        output = node.outputs[0]
        if node.op != "PAConv" or len(node.outputs) != 1 or output in protected:
            continue
        found = readers.get(output, [])
        binary = [reader for reader in found if reader.op == "PAConv" and reader.inputs.count(output) == 1
                  and reader.inputs[0] == output]
        if not binary:
            continue
        # The readers with the most common thresholds, code and group; of them, the planes of the
        # one that pads most (on all sides together), so that more fit in them.
        specs = [_planes_spec(reader) for reader in binary]
        spec = max(specs, key=specs.count)
        widest = max((reader for reader in binary if _planes_spec(reader) == spec),
                     key=lambda reader: sum(_pads(reader)))
        sharing = [reader for reader in binary if _planes_spec(reader) == spec and _reads_within(reader, widest)]
        two_outputs = len(sharing) < len(found)
        planes = output
        if two_outputs:
            planes = _unused_name(f"{output}.planes", names)
            names.add(planes)
        handed[node.name] = (widest, planes, two_outputs)
        planes_of.update((reader.name, (planes, widest)) for reader in sharing)
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
            planes, widest = planes_of[node.name]
            attrs["input_planes"] = True
            inputs[0] = planes
            if _pads(widest) != _pads(node):
                attrs["input_planes_pads"] = list(_pads(widest))
        nodes.append(Node(node.op, node.name, inputs, outputs, attrs, params))
    return Graph(graph.inputs, graph.outputs, nodes, graph.metadata)


def _planes_spec(reader):
    """What decides the bits a PAConv packs from its input inside the padding: (group, code, thresholds)."""
    thresholds = np.asarray(reader.params["act_thresholds"], dtype=np.float32)
    return reader.attrs.get("group", 1), act_coding(reader), thresholds.shape, thresholds.tobytes()


def _pads(node):
    return tuple(node.attrs.get("pads", (0, 0, 0, 0)))


def _reads_within(reader, writer_reader):
    """Whether `reader` can read the planes packed for `writer_reader` (same `_planes_spec`): its
    padded input lies inside them (pads no larger on any side) and its padding holds the same bits
    (no padding, or the same pad value)."""
    pads, planes_pads = _pads(reader), _pads(writer_reader)
    if any(mine > theirs for mine, theirs in zip(pads, planes_pads)):
        return False
    return not any(pads) or padding_rule(reader)[1] == padding_rule(writer_reader)[1]


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
