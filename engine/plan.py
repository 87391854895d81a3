"""Lowering: the graph a Session runs, made once per plan from the stored graph.

    plan = lower(graph, keep, amx)

1. `fuse_epilogues` (engine/fusion.py): Conv/PAConv/IntConv -> Add (residual) -> Relu chains become
   one node with its epilogue, still in the stored ops' vocabulary; then `fuse_elementwise_chains`:
   chains of per-element ops on one tensor (hard-swish, HardSigmoid) become one ElementwiseChain;
   `fuse_conv_max_pool`: a direct-kernel Conv and the MaxPool reading it (ResNet's stem) become one
   ConvMaxPool.
2. With `amx` (a Session on a CPU with AMX-INT8 tiles), `use_amx_convs`: every PAConv that AmxConv
   (engine/ops/amx_conv.py) takes becomes an AmxConv step; one AmxConv hands its output to the next
   as codes (the reader's packing, written by the producer's epilogue), and tensors between
   AmxConv steps are held channels-last.
3. `lower_binary_layers`: every other PAConv becomes plan-only steps (engine/graph.py: PlanNode, with
   typed configs): PackPlanes (engine/ops/pack_planes.py) packs a float32 tensor into the bit-planes
   its readers need, BinaryConv (engine/ops/binary_conv.py) convolves them. A PAConv whose output
   goes to other PAConvs hands them bit-planes: its BinaryConv writes their planes from its
   epilogue (and its float32 output too when other nodes read it), and they pack nothing. A
   ConvMaxPool whose output goes to PAConvs writes their planes the same way, beside its float32
   output.

Which readers share one set of planes: of a tensor's PAConv readers (reading it as their input),
those that pack alike (same thresholds, code and group) with the most common such layout; the
planes are padded as the one of them that pads most (all sides together), and each of them whose
pads fit inside those on every side, with the same pad value unless it pads nothing, reads them
(a ResNet's 1x1 downsample reads the planes of the 3x3 conv beside it from one row and column
in). The remaining readers form groups the same way. The first group of a PAConv's output gets
the planes from its producer; every other group gets a PackPlanes step, placed before its first
reader. The planes are exactly what each reader would pack from the float32 tensor, so results do
not change. Tensors named in `keep` and graph outputs are never handed off (they stay float32).

Plan-only ops and configs never come from a file (engine/ops/registry.py: check_stored_node).
"""
import dataclasses

from .fusion import fuse_conv_max_pool, fuse_elementwise_chains, fuse_epilogues
from .graph import Graph, PlanNode
from .ops.amx_conv import AmxConvConfig, qualifies
from .ops.binary_conv import BinaryConvConfig
from .ops.pa_conv import input_layout


def lower(graph, keep=(), amx=False):
    """Graph -> the plan Graph (the passes above). The fusions keep every tensor they leave its shape,
    so both read the shapes inferred once here."""
    shapes = graph.infer_shapes()
    fused = fuse_elementwise_chains(fuse_epilogues(graph, keep=keep, shapes=shapes), keep=keep, shapes=shapes)
    fused = fuse_conv_max_pool(fused, keep=keep)
    if amx:
        fused = use_amx_convs(fused, shapes, keep=keep)
    return lower_binary_layers(fused, keep=keep)


def use_amx_convs(graph, shapes, keep=()):
    """Graph -> Graph with each PAConv that AmxConv computes (amx_conv.qualifies) as an AmxConv step
    (the same inputs and outputs). An AmxConv output that another AmxConv reads as its input (the
    first such reader) is handed to it as codes: the producer writes them from its epilogue (beside
    its float32 output when anything else reads that), and the reader packs nothing. An AmxConv
    output that only AmxConv steps read (not kept, not a graph output) is held channels-last: its
    producer writes, and its readers read, whole pixels. shapes: the graph's tensor shapes."""
    protected = set(keep) | set(graph.outputs)
    amx_layers = {node.name for node in graph.nodes if qualifies(node)}
    producers = graph.producers()
    consumers = graph.consumers()
    tensor_names = {info.name for info in graph.inputs} | set(producers)
    channels_last, handoffs = set(), {}  # handoffs: tensor -> (codes tensor, reader)
    for tensor, producer in producers.items():
        if producer.name not in amx_layers or tensor in protected:
            continue
        readers = consumers.get(tensor, [])
        if all(reader.name in amx_layers for reader in readers):
            channels_last.add(tensor)
        coded = [reader for reader in readers if reader.name in amx_layers and reader.inputs[0] == tensor
                 and reader.inputs.count(tensor) == 1]
        if coded:
            codes = _unused_name(f"{tensor}.codes", tensor_names)
            tensor_names.add(codes)
            handoffs[tensor] = (codes, coded[0])
    nodes = []
    for node in graph.nodes:
        if node.name not in amx_layers:
            nodes.append(node)
            continue
        inputs, outputs = list(node.inputs), list(node.outputs)
        input_hw = codes_for = None
        writes_float = True
        if inputs[0] in handoffs and handoffs[inputs[0]][1] is node:
            input_hw = tuple(shapes[inputs[0]][2:4])
            inputs[0] = handoffs[inputs[0]][0]
        if outputs[0] in handoffs:
            codes, codes_for = handoffs[outputs[0]]
            writes_float = len(consumers.get(outputs[0], [])) > 1
            outputs = outputs + [codes] if writes_float else [codes]
        config = AmxConvConfig(node, input_last=node.inputs[0] in channels_last,
                               residual_last=len(node.inputs) == 2 and node.inputs[1] in channels_last,
                               output_last=node.outputs[0] in channels_last, input_hw=input_hw, codes_for=codes_for,
                               writes_float=writes_float)
        nodes.append(PlanNode("AmxConv", node.name, inputs, outputs, config=config, source=node.name))
    return Graph(graph.inputs, graph.outputs, nodes, graph.metadata)


def lower_binary_layers(graph, keep=()):
    """Graph -> Graph with each PAConv as PackPlanes and BinaryConv steps (see the module docstring)."""
    protected = set(keep) | set(graph.outputs)
    producers = graph.producers()
    tensor_names = {info.name for info in graph.inputs} | set(producers)
    node_names = {node.name for node in graph.nodes}
    reads = {}  # PAConv name -> (planes tensor, PlanesLayout of those planes)
    writes = {}  # PAConv name -> (PlanesLayout it writes, planes tensor, whether it writes float32 too)
    packs = {}  # PAConv name -> [PackPlanes nodes to place before it]
    for tensor, readers in graph.consumers().items():
        binary = [reader for reader in readers if reader.op == "PAConv" and reader.inputs[0] == tensor
                  and reader.inputs.count(tensor) == 1]
        producer = producers.get(tensor)
        handed = producer is not None and producer.op in ("PAConv", "ConvMaxPool") and tensor not in protected
        for index, (layout, sharing) in enumerate(_sharing_groups(binary)):
            planes = _unused_name(f"{tensor}.planes", tensor_names)
            tensor_names.add(planes)
            if index == 0 and handed:
                writes[producer.name] = (layout, planes, len(sharing) < len(readers))
            else:
                name = _unused_name(f"{sharing[0].name}.pack", node_names)
                node_names.add(name)
                packs.setdefault(sharing[0].name, []).append(
                    PlanNode("PackPlanes", name, [tensor], [planes], config=layout, source=sharing[0].name))
            reads.update((reader.name, (planes, layout)) for reader in sharing)
    nodes = []
    for node in graph.nodes:
        if node.op == "ConvMaxPool" and node.name in writes:  # it writes the planes (and its float32 output)
            layout, planes_out, _ = writes[node.name]
            nodes.append(PlanNode("ConvMaxPool", node.name, list(node.inputs), list(node.outputs) + [planes_out],
                                  config=dataclasses.replace(node.config, planes=layout), source=node.source))
            continue
        if node.op != "PAConv":
            nodes.append(node)
            continue
        if node.name not in reads:  # reads its input twice (as input and residual): packs its own
            planes = _unused_name(f"{node.inputs[0]}.planes", tensor_names)
            tensor_names.add(planes)
            name = _unused_name(f"{node.name}.pack", node_names)
            node_names.add(name)
            layout = input_layout(node)
            packs.setdefault(node.name, []).append(
                PlanNode("PackPlanes", name, [node.inputs[0]], [planes], config=layout, source=node.name))
            reads[node.name] = (planes, layout)
        nodes.extend(packs.get(node.name, []))
        planes, layout = reads[node.name]
        output_layout, outputs, writes_float = None, list(node.outputs), True
        if node.name in writes:
            output_layout, planes_out, writes_float = writes[node.name]
            outputs = outputs + [planes_out] if writes_float else [planes_out]
        config = BinaryConvConfig(node, layout.pads, output_layout, writes_float)
        nodes.append(PlanNode("BinaryConv", node.name, [planes] + node.inputs[1:], outputs, config=config,
                              source=node.name))
    return Graph(graph.inputs, graph.outputs, nodes, graph.metadata)


def _sharing_groups(readers):
    """[(PlanesLayout, [readers that read planes of that layout])], covering `readers`, largest group
    first (see the module docstring)."""
    groups = []
    left = [(reader, input_layout(reader)) for reader in readers]
    while left:
        counts = [sum(layout.same_bits(other) for _, other in left) for _, layout in left]
        common = left[counts.index(max(counts))][1]
        alike = [(reader, layout) for reader, layout in left if layout.same_bits(common)]
        planes = max((layout for _, layout in alike), key=lambda layout: sum(layout.pads))
        sharing = [reader for reader, layout in alike if _reads_within(layout, planes)]
        groups.append((planes, sharing))
        shared = {reader.name for reader in sharing}
        left = [(reader, layout) for reader, layout in left if reader.name not in shared]
    return groups


def _reads_within(layout, planes):
    """Whether a reader packing `layout` can read `planes` (same bits inside the padding): its padded
    input lies inside them (pads no larger on any side) and its padding holds the same bits (no
    padding, or the same pad value)."""
    if any(mine > theirs for mine, theirs in zip(layout.pads, planes.pads)):
        return False
    return not any(layout.pads) or layout.pad_value == planes.pad_value


def _unused_name(name, names):
    """`name`, or `name` with the first suffix "_2", "_3", ... that is not in `names`."""
    candidate, suffix = name, 2
    while candidate in names:
        candidate, suffix = f"{name}_{suffix}", suffix + 1
    return candidate
