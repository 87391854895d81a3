"""The intermediate representation: named tensors and nodes in topological order.

A Graph is what the converters produce, what a .pab file stores and what the executors run.
Tensor shapes carry the batch as their first entry, always None (batch size is free).

Symbolic sizes: a graph input may name some of its non-batch dimensions (`TensorInfo.symbols`,
say height and width of an OCR crop). Its `shape` then holds the example size of each symbol (the
size the model was converted and calibrated at), so every pass and shape rule sees plain ints;
`Graph.at_sizes({symbol: size})` is the same graph with the inputs at other sizes, and shape
inference at those sizes is that graph's `infer_shapes()`. Nodes never hold a size that depends
on a symbol (the ONNX importer checks this, converters/onnx_import.py), so the graph runs at any
sizes its shape rules accept; a Session plans each set of sizes it meets once (engine/session.py).
"""
from dataclasses import dataclass, field

import numpy as np

from .errors import GraphError
from .ops import get_op
from .ops._attrs import MAX_DIMENSION, MAX_RANK, MAX_SAMPLE_ELEMENTS, sample_elements


@dataclass
class Node:
    """One op application. attrs are JSON values; params are the node's constant arrays."""

    op: str
    name: str
    inputs: list
    outputs: list
    attrs: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)


@dataclass
class PlanNode(Node):
    """A node of a Session's plan (engine/plan.py) that runs a plan-only op: attrs and params stay
    empty; `config` holds what the lowering decided (a typed object of the op's module), and
    `source` names the stored node whose work it does (a per-layer profile adds it there)."""

    config: object = None
    source: str = None


@dataclass
class TensorInfo:
    """A graph input. symbols: None, or one entry per axis: None for a fixed axis (the batch
    included), else the name of the symbolic size of that axis; `shape` holds its example size."""

    name: str
    shape: tuple  # (None, ...): batch first and free
    symbols: tuple = None

    def symbol_axes(self):
        """[(axis, symbol name)] of the symbolic axes."""
        return [(axis, name) for axis, name in enumerate(self.symbols or ()) if name is not None]


@dataclass
class Graph:
    inputs: list  # [TensorInfo]
    outputs: list  # [str]
    nodes: list  # [Node], topological order
    metadata: dict = field(default_factory=dict)

    def infer_shapes(self):
        """Check the graph and return {tensor name: shape} for every tensor.

        Raises GraphError on duplicate or dangling names, nodes out of topological order,
        unknown ops, bad attributes or parameters, and shape mismatches.
        """
        shapes = {}
        self.symbols()  # checks the symbols
        for info in self.inputs:
            shape = tuple(info.shape)
            if not shape or shape[0] is not None or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
                raise GraphError(
                    f"graph input {info.name!r}: shape must be [batch, positive ints...], found {list(shape)}"
                )
            _define(shapes, info.name, shape, "graph input")
        node_names = set()
        for node in self.nodes:
            if node.name in node_names:
                raise GraphError(f"node name {node.name!r} is used twice")
            node_names.add(node.name)
            op = get_op(node.op, node.name)
            for name in node.inputs:
                if name not in shapes:
                    raise GraphError(
                        f"node {node.name!r} ({node.op}): input {name!r} is not a graph input or an "
                        "output of an earlier node"
                    )
            output_shapes = op.infer_shapes(node, [shapes[name] for name in node.inputs])
            for name, shape in zip(node.outputs, output_shapes):
                _define(shapes, name, tuple(shape), f"node {node.name!r}")
        for name in self.outputs:
            if name not in shapes:
                raise GraphError(f"graph output {name!r} is produced by no node")
        return shapes

    def symbols(self):
        """{symbol name: example size} of the symbolic input sizes (empty for a fixed-size graph).

        Raises GraphError when a symbols entry is malformed or one symbol has two example sizes."""
        sizes = {}
        for info in self.inputs:
            if info.symbols is None:
                continue
            symbols = tuple(info.symbols)
            if len(symbols) != len(info.shape) or (symbols and symbols[0] is not None) or not all(
                    name is None or (isinstance(name, str) and name) for name in symbols):
                raise GraphError(f"graph input {info.name!r}: symbols must hold one entry per axis, null for the "
                                 f"batch and for fixed axes, else a non-empty name; found {list(symbols)} for shape "
                                 f"{list(info.shape)}")
            for axis, name in enumerate(symbols):
                if name is None:
                    continue
                if sizes.setdefault(name, info.shape[axis]) != info.shape[axis]:
                    raise GraphError(f"graph input {info.name!r}: symbol {name!r} has example size "
                                     f"{info.shape[axis]} on axis {axis} but {sizes[name]} elsewhere")
        return sizes

    def at_sizes(self, sizes):
        """This graph with its symbolic input sizes set to `sizes` ({symbol: int}, missing symbols
        keep their example size); the nodes are shared, not copied."""
        inputs = []
        for info in self.inputs:
            shape = list(info.shape)
            for axis, name in info.symbol_axes():
                shape[axis] = sizes.get(name, shape[axis])
            inputs.append(TensorInfo(info.name, tuple(shape), info.symbols))
        return Graph(inputs, self.outputs, self.nodes, self.metadata)

    def producers(self):
        """{tensor name: node that produces it}."""
        return {name: node for node in self.nodes for name in node.outputs}

    def consumers(self):
        """{tensor name: [nodes that read it]}."""
        result = {}
        for node in self.nodes:
            for name in node.inputs:
                result.setdefault(name, []).append(node)
        return result


def _define(shapes, name, shape, where):
    if not isinstance(name, str) or not name:
        raise GraphError(f"{where}: tensor names must be non-empty strings, found {name!r}")
    if name in shapes:
        raise GraphError(f"{where}: tensor {name!r} is defined twice")
    if len(shape) > MAX_RANK or any(d > MAX_DIMENSION for d in shape[1:]) \
            or sample_elements(shape) > MAX_SAMPLE_ELEMENTS:
        raise GraphError(f"{where}: tensor {name!r} has shape {list(shape)}, beyond the limits (rank {MAX_RANK}, "
                         f"dimension {MAX_DIMENSION}, {MAX_SAMPLE_ELEMENTS} elements per sample)")
    shapes[name] = shape


def schedule(graph, keep=()):
    """[(input names, output names, names no later node reads)] of each node of `graph`, the order
    `run_schedule` follows; the graph outputs and the tensors `keep` are never dropped (keep="all":
    nothing is)."""
    wanted = None if keep == "all" else set(graph.outputs) | set(keep)
    last_use = {name: index for index, node in enumerate(graph.nodes) for name in node.inputs}
    # dict.fromkeys: a node may read one tensor twice (Concat [x, x])
    return [(tuple(node.inputs), tuple(node.outputs),
             () if wanted is None else tuple(name for name in dict.fromkeys(node.inputs)
                                             if last_use[name] == index and name not in wanted))
            for index, node in enumerate(graph.nodes)]


def run_schedule(steps, kernels, feeds):
    """Run `kernels` (one callable(inputs) -> outputs per step) in order on `feeds` ({name: array}) by
    the `schedule` `steps` -> {name: array} of the tensors not dropped (the feeds among them)."""
    values = dict(feeds)
    for kernel, (inputs, outputs, dropped) in zip(kernels, steps):
        values.update(zip(outputs, kernel([values[name] for name in inputs])))
        for name in dropped:
            del values[name]
    return values


def run_graph(graph, feeds, implementation, keep=None):
    """Run the graph node by node. implementation(node) -> callable(inputs) -> outputs.

    Returns {tensor name: array} for the graph outputs and every name in `keep`
    (keep="all" keeps every tensor).
    """
    keep = keep or ()
    values = run_schedule(schedule(graph, keep), [implementation(node) for node in graph.nodes], feeds)
    if keep == "all":
        return values
    return {name: values[name] for name in set(graph.outputs) | set(keep)}


def run_reference(graph, feeds, keep=None):
    """The reference executor: plain numpy in float64, exactly the PA semantics of DESIGN.md.

    feeds: {input name: array [batch, ...]}. Returns {tensor name: float64 array}.
    """
    feeds = {name: np.asarray(value, dtype=np.float64) for name, value in feeds.items()}
    return run_graph(
        graph, feeds, lambda node: lambda inputs: get_op(node.op, node.name).reference(node, inputs), keep
    )
