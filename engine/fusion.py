"""fuse_epilogues, the first pass of a Session's lowering (engine/plan.py): fold Conv/PAConv/IntConv
-> Add (residual) -> Relu chains into the conv's epilogue. The fused node computes
activation(conv(x) + b + residual) in one pass over its output (engine/ops/_epilogue.py), so the
conv output is never written out and read back in float32. .pab files keep the plain nodes.
"""
from .graph import Graph, Node

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


def _readers(nodes):
    """{tensor name: [nodes that read it]} (a node reading a tensor twice is listed twice)."""
    readers = {}
    for node in nodes:
        for name in node.inputs:
            readers.setdefault(name, []).append(node)
    return readers
