"""The fusions of a Session's lowering (engine/plan.py); .pab files keep the plain nodes.

fuse_epilogues: fold Conv/PAConv/IntConv -> Add (residual) -> Relu chains into the conv's
epilogue. The fused node computes activation(conv(x) + b + residual) in one pass over its output
(engine/ops/_epilogue.py), so the conv output is never written out and read back in float32.

fuse_elementwise_chains: a chain of per-element ops on one 4-D tensor (MobileNetV3's hard-swish
x -> x + 3 -> Clip(0, 6) -> x * that -> / 6, a HardSigmoid, BatchNorm -> Relu) becomes one
ElementwiseChain node (engine/ops/elementwise_chain.py): the same float32 operations, one pass.

fuse_conv_max_pool: a float Conv on the direct kernel followed by its only reader, a MaxPool (ResNet's
stem), becomes one ConvMaxPool node (engine/ops/conv_max_pool.py): the same bits, and the conv output
is never written out.
"""
import numpy as np

from .graph import Graph, Node, PlanNode
from .ops import conv
from .ops.activations import _clip_bounds, _number
from .ops.binary_elementwise import node_operands
from .ops.conv_max_pool import ConvMaxPoolConfig
from .ops.elementwise_chain import (ADD_X, AFFINE, CLAMP, CLIP, DIV, DIV_FIRST, DIV_X, MUL, MUL_FIRST, MUL_X, SUB,
                                    SUB_FIRST, SUB_X, X_DIV, X_SUB, ElementwiseSteps)

FUSABLE_OPS = ("Conv", "PAConv", "IntConv")


def fuse_epilogues(graph, keep=(), shapes=None):
    """Graph -> Graph. A conv whose only reader is an Add (whose other input has the conv output's
    shape) takes that input as its residual; a conv whose only reader is a Relu takes
    activation="relu". The fused node replaces the reader, at the reader's place in the order
    (where the residual is already computed). Tensors named in `keep` or graph outputs are never
    fused away. shapes: `graph.infer_shapes()` when already computed.
    """
    protected = set(keep) | set(graph.outputs)
    shapes = graph.infer_shapes() if shapes is None else shapes
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


def fuse_conv_max_pool(graph, keep=()):
    """Graph -> Graph. A Conv of one group with a kernel larger than 1x1 that runs the direct kernel
    (conv.uses_direct), has no residual and at most a ReLU as its epilogue, and whose output's only
    reader is a MaxPool of dilation 1, becomes one ConvMaxPool PlanNode at the MaxPool's place.
    Tensors named in `keep` and graph outputs are never fused away."""
    protected = set(keep) | set(graph.outputs)
    consumers = _readers(graph.nodes)
    fused = {}  # name of a fused node -> its replacement (None: dropped)
    for node in graph.nodes:
        if node.op != "Conv" or len(node.inputs) != 1:  # one input: no residual
            continue
        readers = consumers.get(node.outputs[0], [])
        if node.outputs[0] in protected or len(readers) != 1 or readers[0].op != "MaxPool":
            continue
        reader = readers[0]
        direct = node.attrs.get("group", 1) == 1 and conv.uses_direct(node, node.params["weight"])  # not 1x1
        if not direct or node.attrs.get("activation") not in (None, "relu") or len(reader.outputs) != 1 \
                or list(reader.attrs.get("dilations", [1, 1])) != [1, 1]:
            continue
        fused[node.name] = None
        fused[reader.name] = PlanNode("ConvMaxPool", node.name, list(node.inputs), list(reader.outputs),
                                      config=ConvMaxPoolConfig(node, reader), source=node.name)
    if not fused:
        return graph
    nodes = [fused.get(node.name, node) for node in graph.nodes]
    return Graph(graph.inputs, graph.outputs, [node for node in nodes if node is not None], graph.metadata)


def fuse_elementwise_chains(graph, keep=(), shapes=None):
    """Graph -> Graph. Each maximal chain of two or more per-element ops (`_chain_steps`) over a 4-D
    tensor x, where every tensor inside the chain has the next op as its only reader and is neither
    kept nor a graph output, becomes one ElementwiseChain PlanNode reading x, at the place of the
    chain's last op (the ops may also read x itself, as hard-swish's x * clip(x + 3) does).
    shapes: the shapes of the graph's tensors when already computed."""
    protected = set(keep) | set(graph.outputs)
    shapes = graph.infer_shapes() if shapes is None else shapes
    consumers = _readers(graph.nodes)
    fused = {}  # name of a chain's node -> its replacement (None: dropped)
    for node in graph.nodes:
        if node.name in fused or not node.inputs or len(shapes.get(node.inputs[0]) or ()) != 4:
            continue
        x = node.inputs[0]
        channels = shapes[x][1]
        steps = _chain_steps(node, x, x, channels)
        chain, current = [node], node.outputs[0] if steps is not None else None
        while steps is not None and current not in protected and len(consumers.get(current, [])) == 1:
            reader = consumers[current][0]
            more = _chain_steps(reader, current, x, channels)
            if more is None:
                break
            chain.append(reader)
            steps += more
            current = reader.outputs[0]
        if len(chain) < 2:
            continue
        codes = np.array([code for code, _, _ in steps], dtype=np.int64)
        constants = np.array([[np.broadcast_to(np.float32(a), (channels,)), np.broadcast_to(np.float32(b), (channels,))]
                              for _, a, b in steps], dtype=np.float32)
        config = ElementwiseSteps(codes, constants, tuple(member.name for member in chain))
        fused.update((member.name, None) for member in chain[:-1])
        fused[chain[-1].name] = PlanNode("ElementwiseChain", chain[0].name, [x], [current], config=config,
                                         source=chain[0].name)
    if not fused:
        return graph
    nodes = [fused.get(node.name, node) for node in graph.nodes]
    return Graph(graph.inputs, graph.outputs, [node for node in nodes if node is not None], graph.metadata)


def _chain_steps(node, current, x, channels):
    """[(step code, a, b)] of ElementwiseChain that compute `node` on the chain's value `current`
    (x at the chain's start) with the same float32 operations as its kernel, or None when `node`
    is not such an op: ChannelAffine, Relu, Clip, HardSigmoid, Mul/Div/Sub with a constant that is
    a scalar or one value per channel, and Mul/Div/Sub/Add of `current` and x."""
    op, inputs = node.op, node.inputs
    if isinstance(node, PlanNode) or len(node.outputs) != 1 or current not in inputs:
        return None
    if len(inputs) == 1 and op == "ChannelAffine":
        return [(AFFINE, node.params["scale"], node.params["shift"])]
    if len(inputs) == 1 and op == "Relu":
        return [(CLIP, 0.0, np.inf)]
    if len(inputs) == 1 and op == "Clip":
        low, high = _clip_bounds(node)
        return [(CLIP, low, high)]
    if len(inputs) == 1 and op == "HardSigmoid":
        return [(AFFINE, _number(node, "alpha", 0.2), _number(node, "beta", 0.5)), (CLAMP, 0.0, 1.0)]
    if op in ("Mul", "Div", "Sub") and len(inputs) == 1:
        constant = node_operands(node)
        if constant.size != 1 and constant.shape[-3:] != (channels, 1, 1):
            return None
        per_channel = constant.reshape(-1)
        first = node.attrs.get("constant_first", 0)
        code = {"Mul": (MUL, MUL_FIRST), "Div": (DIV, DIV_FIRST), "Sub": (SUB, SUB_FIRST)}[op][first]
        return [(code, per_channel if constant.size != 1 else per_channel[0], 0.0)]
    if op in ("Mul", "Div", "Sub", "Add") and len(inputs) == 2 and current != x \
            and sorted(inputs) == sorted([current, x]):
        code = {"Mul": (MUL_X, MUL_X), "Add": (ADD_X, ADD_X), "Div": (DIV_X, X_DIV), "Sub": (SUB_X, X_SUB)}[op]
        return [(code[inputs[0] != current], 0.0, 0.0)]
    return None
