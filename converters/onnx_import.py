"""ONNX -> Graph: one converter function per ONNX op type, found through an explicit registry.

`import_onnx(model)` upgrades a model at opsets 7-10 to opset 11 (converters/onnx_opset_upgrade.py),
then walks the ONNX graph in order, folds constants (initializers and Constant
nodes) into node parameters, and calls the converter registered for each node's op type and
opset. The registry is converters/onnx_registry.py; the converters live in
`converters/onnx_ops*.py`, `converters/onnx_shape_folding.py` and `converters/dynamic_weights.py`,
which register themselves when this module imports them.
"""
import numpy as np
import onnx

from pabnn.engine.errors import ConversionError, GraphError
from pabnn.engine.graph import Graph, Node, TensorInfo
from pabnn.engine.ops._attrs import MAX_DIMENSION

# The converter modules register their converters on import.
from . import onnx_ops, onnx_ops_activations, onnx_ops_binary, onnx_ops_quantize, onnx_ops_tensors  # noqa: F401
from . import dynamic_weights  # per-sample dynamic conv weights, before the node loop
from .onnx_opset_upgrade import FIRST_UPGRADED_OPSET, upgrade_to_opset_11
from .onnx_registry import (CUSTOM_DOMAINS, SUPPORTED_OPSETS, ImportContext, converter_for,
                            integer_input_converter_for, supported_onnx_ops, tensor_to_array)
from .onnx_shape_folding import fold_constant_node


def import_onnx(model, input_shapes=None, example_shapes=None):
    """Convert an onnx.ModelProto into a float Graph (ops from the pabnn.engine registry).

    A non-batch input dimension the model leaves open (a dim_param such as "width", or none) becomes
    a symbolic size (engine/graph.py): the graph then runs at any size its shape rules accept.
    Dimensions sharing a dim_param share one symbol; unnamed ones are named "height" and "width"
    (axes 2 and 3 of a 4-D input) or "dim<axis>", prefixed with the input's name when the model has
    several inputs.

    input_shapes: {input name: shape} fixing sizes: each int entry (the batch, entry 0, excepted)
        replaces the model's dimension, None keeps it.
    example_shapes: {input name: shape} giving the sizes the symbolic dimensions are traced and
        checked at (the example sizes the graph keeps; `convert` passes the calibration data's);
        DEFAULT_EXAMPLE_SIZE where none is given.

    The model is traced at the example sizes and once more at other sizes; a node that comes out
    differently (a Reshape target or Slice bound computed from a symbolic size) is refused with
    a ConversionError naming it, unless it is a Resize whose scales (or sizes) stay the same: its
    other attribute is then derived at run time. Fix such sizes with input_shapes.
    """
    if not isinstance(model, onnx.ModelProto):
        raise ConversionError(f"expected an onnx.ModelProto, found {type(model).__name__}")
    source_opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if source_opset is None or not FIRST_UPGRADED_OPSET <= source_opset <= SUPPORTED_OPSETS[1]:
        raise ConversionError(f"ONNX opset {source_opset} is not supported; supported: "
                              f"{FIRST_UPGRADED_OPSET}..{SUPPORTED_OPSETS[1]} (opsets {FIRST_UPGRADED_OPSET}.."
                              f"{SUPPORTED_OPSETS[0] - 1} are upgraded to {SUPPORTED_OPSETS[0]} first)")
    model = _named_and_upgraded(model, source_opset)
    opset = max(source_opset, SUPPORTED_OPSETS[0])
    initializers = {initializer.name for initializer in model.graph.initializer}
    values = [value for value in model.graph.input if value.name not in initializers]
    for argument, shapes in (("input_shapes", input_shapes), ("example_shapes", example_shapes)):
        if shapes is not None and (not isinstance(shapes, dict) or set(shapes) - {v.name for v in values}):
            raise ConversionError(f"{argument} must be a dict {{input name: shape}} over the model's inputs "
                                  f"{[v.name for v in values]}, found {shapes!r}")
    inputs = _input_infos(values, input_shapes or {}, example_shapes or {})
    examples = Graph(inputs, [], []).symbols()
    try:
        graph = _import_at(model, opset, inputs, source_opset)
    except ConversionError as error:
        if not examples:
            raise
        sizes = ", ".join(f"{name} {size}" for name, size in examples.items())
        raise ConversionError(f"{error} (with the symbolic input sizes at their example sizes {sizes}; give others "
                              f"with example_shapes=, or fix them with input_shapes=)") from None
    if not examples:
        return graph
    for other in _other_sizes(examples):
        try:
            second = _import_at(model, opset, Graph(inputs, [], []).at_sizes(other).inputs, source_opset)
        except (ConversionError, GraphError):
            continue  # sizes the graph cannot take (say a Flatten before a Gemm): try others
        return _generalized(graph, second, examples, other)
    return graph  # no other sizes are accepted: nothing can depend on them


DEFAULT_EXAMPLE_SIZE = 224


def _input_infos(values, input_shapes, example_shapes):
    """[TensorInfo] of the graph inputs: fixed sizes, symbols, and the symbols' example sizes."""
    infos = []
    for value in values:
        dims = value.type.tensor_type.shape.dim
        if value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise ConversionError(f"ONNX graph input {value.name!r}: only float32 inputs are supported")
        if len(dims) < 1:
            raise ConversionError(f"ONNX graph input {value.name!r}: expected a batch dimension")
        fixed = input_shapes.get(value.name)
        example = example_shapes.get(value.name)
        for argument, shape in (("input_shapes", fixed), ("example_shapes", example)):
            if shape is not None and (len(shape) != len(dims) or not all(
                    d is None or (isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 1)
                    for d in list(shape)[1:])):
                raise ConversionError(f"{argument}[{value.name!r}]: expected {len(dims)} entries (the batch first), "
                                      f"positive ints or None, found {list(shape)}")
        shape, symbols = [None], [None]
        for index, dim in enumerate(dims[1:], start=1):
            if fixed is not None and fixed[index] is not None:
                shape.append(int(fixed[index]))
                symbols.append(None)
            elif dim.HasField("dim_value") and dim.dim_value >= 1:
                if example is not None and example[index] is not None and example[index] != dim.dim_value:
                    raise ConversionError(f"example_shapes[{value.name!r}]: dimension {index} is fixed at "
                                          f"{dim.dim_value} by the model, found {example[index]}")
                shape.append(dim.dim_value)
                symbols.append(None)
            else:
                shape.append(int(example[index]) if example is not None and example[index] is not None
                             else DEFAULT_EXAMPLE_SIZE)
                symbols.append(_symbol_name(value.name, dim, index, len(dims), len(values)))
        infos.append(TensorInfo(value.name, tuple(shape), tuple(symbols) if any(symbols) else None))
    try:
        Graph(infos, [], []).symbols()
    except GraphError as error:
        raise ConversionError(f"ONNX {error} (dimensions that share a dim_param need one example size)") from None
    return infos


def _symbol_name(input_name, dim, axis, rank, n_inputs):
    if dim.HasField("dim_param") and dim.dim_param.strip() not in ("", "?"):
        return dim.dim_param.strip()
    name = {2: "height", 3: "width"}.get(axis, f"dim{axis}") if rank == 4 else f"dim{axis}"
    return f"{input_name}.{name}" if n_inputs > 1 else name


def _other_sizes(examples):
    """Candidate sizes to trace a second time at: twice the example sizes (every floor(L*s) with
    s*L >= 1 changes), then small offsets (a graph that takes only a few sizes)."""
    candidates = [{name: 2 * size for name, size in examples.items()}]
    for offset in (1, 2, 3, 4, 5, 6, 7, -1, -2, -3):
        candidates.append({name: size + offset for name, size in examples.items()})
    return [sizes for sizes in candidates if all(1 <= size <= MAX_DIMENSION for size in sizes.values())]


def _generalized(graph, second, examples, other):
    """`graph` with the attributes that depend on the symbolic sizes removed where the op derives
    them (Resize: sizes from scales or scales from sizes); ConversionError for any other node that
    `second` (the same model traced at sizes `other`) holds differently."""
    where = ", ".join(f"{name} {size}" for name, size in examples.items())
    there = ", ".join(f"{name} {size}" for name, size in other.items())
    advice = "the graph computes it from the input sizes; fix them with import_onnx(..., input_shapes=...)"
    if [(n.name, n.op, n.inputs, n.outputs) for n in graph.nodes] != \
            [(n.name, n.op, n.inputs, n.outputs) for n in second.nodes]:
        first = next((a.name for a, b in zip(graph.nodes, second.nodes) if (a.name, a.op) != (b.name, b.op)),
                     graph.nodes[-1].name)
        raise ConversionError(f"ONNX node {first!r}: the model converts to different nodes at {where} and at "
                              f"{there}; {advice}")
    nodes = []
    for node, twin in zip(graph.nodes, second.nodes):
        for key, array in node.params.items():
            if key not in twin.params or not np.array_equal(array, twin.params[key]):
                raise ConversionError(f"ONNX node {node.name!r} ({node.op}): parameter {key!r} differs at {where} "
                                      f"and at {there}; {advice}")
        differing = sorted(key for key in set(node.attrs) | set(twin.attrs) if node.attrs.get(key) != twin.attrs.get(key))
        attrs = dict(node.attrs)
        if node.op == "Resize" and differing in (["sizes"], ["scales"]):
            del attrs[differing[0]]
        elif differing:
            key = differing[0]
            raise ConversionError(f"ONNX node {node.name!r} ({node.op}): attribute {key!r} is {node.attrs.get(key)!r} "
                                  f"at {where} but {twin.attrs.get(key)!r} at {there}; {advice}")
        nodes.append(Node(node.op, node.name, node.inputs, node.outputs, attrs, node.params))
    return Graph(graph.inputs, graph.outputs, nodes, graph.metadata)


def _import_at(model, opset, inputs, source_opset):
    """The Graph of `model` (at `opset`, upgraded from `source_opset`) with its inputs at these
    shapes (TensorInfo list)."""
    # Work on a copy: unnamed nodes get names, and the caller's model must stay as it was.
    clone = onnx.ModelProto()
    clone.CopyFrom(model)
    graph = clone.graph
    domain_versions = {o.domain: o.version for o in model.opset_import}
    context = ImportContext(opset=opset, graph_outputs=tuple(o.name for o in graph.output))
    for initializer in graph.initializer:
        if initializer.name in context.constants:
            raise ConversionError(f"ONNX initializer {initializer.name!r} is defined twice")
        context.constants[initializer.name] = tensor_to_array(initializer, f"ONNX initializer {initializer.name!r}")
    _check_names_defined_once(graph, context.constants)
    dynamic_weights.recognize_dynamic_weight_convs(graph)
    context.shapes.update((info.name, info.shape) for info in inputs)
    taken = {node.name for node in graph.node}
    for node in graph.node:
        if not node.name:  # a node the opset upgrade added
            node.name = _unique_name(node.op_type, taken)
        if node.domain == dynamic_weights.DYNAMIC_WEIGHTS_DOMAIN:
            dynamic_weights.convert_dynamic_conv(node, context)
            continue
        if node.domain in CUSTOM_DOMAINS:
            # No ONNX schema: the converter checks the node, and folds constant inputs itself.
            converter_for(node, domain_versions.get(node.domain, 1))(node, context)
            continue
        if node.domain not in ("", "ai.onnx"):
            raise ConversionError(f"ONNX node {node.name!r}: op {node.domain}::{node.op_type} is not supported "
                                  f"(only the default ONNX domain and {', '.join(CUSTOM_DOMAINS)} are)")
        converter = converter_for(node, opset)
        _check_node_structure(node, opset)
        if fold_constant_node(node, context):
            continue
        if node.input and node.input[0] in context.quantized:
            converter = integer_input_converter_for(node.op_type) or converter
        converter(node, context)
    for name in context.graph_outputs:
        if context.aliases.get(name, name) in context.quantized:
            raise ConversionError(f"ONNX graph output {name!r} is the integer output of QuantizeLinear "
                                  f"{context.quantized[context.aliases.get(name, name)].quantize_node!r}; only float "
                                  "outputs are supported (end the graph with DequantizeLinear)")
    outputs = [_output_name(name, context) for name in context.graph_outputs]
    result = Graph(list(inputs), outputs, context.nodes, {"onnx_opset": source_opset, "producer": model.producer_name})
    try:
        result.infer_shapes()
    except GraphError as error:
        raise ConversionError(f"the imported graph is inconsistent: {error}") from None
    return result


def _named_and_upgraded(model, opset):
    """A copy of `model` (the caller's stays as it was) with every node named, upgraded to opset
    SUPPORTED_OPSETS[0] when older (converters/onnx_opset_upgrade.py)."""
    clone = onnx.ModelProto()
    clone.CopyFrom(model)
    taken = {node.name for node in clone.graph.node}
    for node in clone.graph.node:
        if not node.name:
            node.name = _unique_name(node.op_type, taken)
    if opset < SUPPORTED_OPSETS[0]:
        clone = upgrade_to_opset_11(clone, opset, {op for op in supported_onnx_ops() if "::" not in op})
    return clone


def _check_names_defined_once(graph, constants):
    """Each tensor name is defined once: by an initializer, a graph input or one node output."""
    defined = set(constants)
    for value in graph.input:
        if value.name in defined and value.name not in constants:
            raise ConversionError(f"ONNX graph input {value.name!r} is listed twice")
        defined.add(value.name)
    for node in graph.node:
        for name in node.output:
            if name and name in defined:
                raise ConversionError(f"ONNX node {node.name!r} ({node.op_type}): output {name!r} is already "
                                      "defined by a graph input, an initializer or another node")
            defined.add(name)


def _check_node_structure(node, opset):
    """Inputs, outputs and attribute types of `node` as the ONNX operator schema declares them."""
    where = f"ONNX node {node.name!r} ({node.op_type})"
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError:
        raise ConversionError(f"{where}: not an ONNX operator at opset {opset}") from None
    for what, names, low, high, formals in (("inputs", node.input, schema.min_input, schema.max_input, schema.inputs),
                                            ("outputs", node.output, schema.min_output, schema.max_output,
                                             schema.outputs)):
        if not low <= len(names) <= high:
            raise ConversionError(f"{where}: expects {low}..{high} {what}, found {len(names)}")
        for position, formal in enumerate(formals[:len(names)]):
            if formal.option == onnx.defs.OpSchema.FormalParameterOption.Single and not names[position]:
                raise ConversionError(f"{where}: required {what[:-1]} {position} ({formal.name}) has no name")
    seen = set()
    for attribute in node.attribute:
        expected = schema.attributes.get(attribute.name)
        if expected is None:
            raise ConversionError(f"{where}: unknown attribute {attribute.name!r}; {node.op_type} has "
                                  f"{sorted(schema.attributes)}")
        if attribute.name in seen:
            raise ConversionError(f"{where}: attribute {attribute.name!r} is given twice")
        seen.add(attribute.name)
        if attribute.type != expected.type:
            found = onnx.AttributeProto.AttributeType.Name(attribute.type)
            raise ConversionError(f"{where}: attribute {attribute.name!r} must be of type {expected.type.name}, "
                                  f"found {found}")
        if attribute.type == onnx.AttributeProto.TENSOR:
            tensor_to_array(attribute.t, f"{where}: attribute {attribute.name!r}")
    for name, expected in schema.attributes.items():
        if expected.required and name not in seen:
            raise ConversionError(f"{where}: missing required attribute {name!r}")


def _unique_name(op_type, taken):
    index = 1
    while f"{op_type}_{index}" in taken:
        index += 1
    taken.add(f"{op_type}_{index}")
    return f"{op_type}_{index}"


def _output_name(name, context):
    """Graph outputs keep their ONNX names: an output reached through Identity renames its source."""
    source = context.aliases.get(name, name)
    if source == name:
        return name
    if any(source == info for info in context.graph_outputs):
        raise ConversionError(f"ONNX graph output {name!r} is an Identity of another output {source!r}")
    producers = [node for node in context.nodes if source in node.outputs]
    if not producers:
        raise ConversionError(f"ONNX graph output {name!r} is an Identity of graph input {source!r}; not supported")
    for node in context.nodes:
        node.inputs = [name if n == source else n for n in node.inputs]
        node.outputs = [name if n == source else n for n in node.outputs]
    return name
