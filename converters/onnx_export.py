"""Export a pabnn graph (a .pab file) as a standard-op float ONNX model that computes the same thing.

    export_onnx("model.pab", "model.onnx")          # or a Graph; returns the onnx.ModelProto

What it is for: inspecting a converted model in Netron or any ONNX tool, cross-checking pabnn
against another runtime, and deploying to runtimes that take float ONNX. It does not run faster
than the float model: every PA layer becomes float Conv/Gemm on dequantized weights, plus the
comparisons of its activation staircase (converters/onnx_export_pa.py says how each PA rule is
emulated).

Every engine op has one exporter here, found through EXPORTERS (op name -> function(builder,
node, shapes)); most are the reverse of their ONNX import (converters/onnx_ops*.py); DynamicConv
(one weight set per sample) becomes a Scan over the batch. An op without an exporter is refused
with an error naming the node and the op. The model is ONNX opset OPSET (19: AveragePool with
dilations, Pad "wrap", Resize "half_pixel_symmetric"), IR version IR_VERSION; the batch axis of
every input is the symbolic size "batch" (unless a graph input names a size so), and a graph
input's symbolic sizes keep their names. The file is written atomically (temporary file in the
same folder, fsync, rename).
"""
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tqdm.auto import tqdm

from pabnn.engine.errors import ConversionError, GraphError
from pabnn.engine.graph import Graph
from pabnn.engine.ops import get_op
from pabnn.engine.ops.registry import check_stored_node
from pabnn.engine.pab_format import load_graph, write_atomically

from .onnx_export_pa import _epilogue, _has_epilogue, export_pa_conv, export_pa_linear, export_staircase

OPSET = 19
IR_VERSION = 9
INT64_MAX = np.iinfo(np.int64).max


class OnnxBuilder:
    """Collects ONNX nodes and initializers with names that do not clash with the graph's tensors."""

    def __init__(self, taken_names):
        self.nodes = []
        self.initializers = []
        self._taken = set(taken_names)

    def fresh(self, hint):
        name, count = hint, 1
        while name in self._taken:
            count += 1
            name = f"{hint}_{count}"
        self._taken.add(name)
        return name

    def constant(self, array, hint):
        """An initializer holding `array` (float32 or int64); returns its name."""
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def add(self, op_type, inputs, hint, output=None, **attributes):
        """One ONNX node named after `hint`; returns its output's name (`output` when given)."""
        output = output if output is not None else self.fresh(hint)
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], name=self.fresh(hint + "/" + op_type),
                                           **attributes))
        return output

    def add_multi(self, op_type, inputs, outputs, hint, **attributes):
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), name=self.fresh(hint + "/" + op_type),
                                           **attributes))


# ---- float ops ------------------------------------------------------------------------------

def _same(op_type, attribute_names=()):
    """Exporter of an op whose ONNX counterpart has the same name, inputs and these attributes."""
    def export(builder, node, shapes):
        attributes = {key: node.attrs[key] for key in attribute_names if node.attrs.get(key) is not None}
        builder.add(op_type, node.inputs, node.name, output=node.outputs[0], **attributes)
    return export


def _conv(builder, node, shapes):
    y = builder.add("Conv", [node.inputs[0], builder.constant(node.params["weight"], f"{node.name}/weight"),
                             builder.constant(node.params["bias"], f"{node.name}/bias")],
                    node.name, output=None if _has_epilogue(node) else node.outputs[0], **_geometry(node))
    _epilogue(builder, node, y, node.outputs[0])


def _int_conv(builder, node, shapes):
    """IntConv/IntLinear in float ops: Clip(Round(x / input_scale), -zp, 255 - zp) is q - zp (ONNX
    Round is half to even, as the quantizer; the division is in float32 where pabnn's is in
    float64, which can differ only on inputs within an ulp of a rounding tie), a Conv/Gemm with the
    int8 weights as float32 (exact sums below 2^24), the per-channel rescale and the bias."""
    zero_point = node.attrs["input_zero_point"]
    scale = builder.constant(node.params["input_scale"], f"{node.name}/input_scale")
    x = builder.add("Div", [node.inputs[0], scale], f"{node.name}/scaled")
    x = builder.add("Round", [x], f"{node.name}/rounded")
    bounds = [builder.constant(np.array(value, np.float32), f"{node.name}/{key}")
              for key, value in (("low", -zero_point), ("high", 255 - zero_point))]
    x = builder.add("Clip", [x] + bounds, f"{node.name}/centered")
    weight = node.params["weight"].astype(np.float32)
    factors = (np.float64(node.params["input_scale"][0]) * node.params["weight_scale"].astype(np.float64)).astype(
        np.float32)
    if node.op == "IntLinear":
        y = builder.add("Gemm", [x, builder.constant(weight[:, :, 0, 0], f"{node.name}/weight")], f"{node.name}/sums",
                        transB=1)
        factors, bias = factors[None, :], node.params["bias"][None, :]
    else:
        y = builder.add("Conv", [x, builder.constant(weight, f"{node.name}/weight")], f"{node.name}/sums",
                        **_geometry(node))
        factors, bias = factors[None, :, None, None], node.params["bias"][None, :, None, None]
    y = builder.add("Mul", [y, builder.constant(factors, f"{node.name}/factors")], f"{node.name}/rescaled")
    y = builder.add("Add", [y, builder.constant(bias, f"{node.name}/bias")], node.name,
                    output=None if _has_epilogue(node) else node.outputs[0])
    _epilogue(builder, node, y, node.outputs[0])


def _geometry(node, group=True):
    attributes = {"strides": list(node.attrs.get("strides", [1, 1])),
                  "pads": list(node.attrs.get("pads", [0, 0, 0, 0])),
                  "dilations": list(node.attrs.get("dilations", [1, 1]))}
    if group:
        attributes["group"] = int(node.attrs.get("group", 1))
    return attributes


def _conv_transpose(builder, node, shapes):
    builder.add("ConvTranspose", [node.inputs[0], builder.constant(node.params["weight"], f"{node.name}/weight"),
                                  builder.constant(node.params["bias"], f"{node.name}/bias")],
                node.name, output=node.outputs[0], output_padding=list(node.attrs.get("output_padding", [0, 0])),
                **_geometry(node))


def _gemm(builder, node, shapes):
    builder.add("Gemm", [node.inputs[0], builder.constant(node.params["weight"], f"{node.name}/weight"),
                         builder.constant(node.params["bias"], f"{node.name}/bias")],
                node.name, output=node.outputs[0], transB=1)


def _pool(builder, node, shapes):
    attributes = dict(_geometry(node, group=False), kernel_shape=list(node.attrs["kernel_shape"]))
    if node.op == "AveragePool":
        attributes["count_include_pad"] = int(node.attrs.get("count_include_pad", 0))
    builder.add(node.op, node.inputs, node.name, output=node.outputs[0], **attributes)


def _channel_affine(builder, node, shapes):
    extra = (1,) * (len(shapes[node.inputs[0]]) - 2)
    scaled = builder.add("Mul", [node.inputs[0], builder.constant(node.params["scale"].reshape((-1,) + extra),
                                                                  f"{node.name}/scale")], f"{node.name}/scale")
    builder.add("Add", [scaled, builder.constant(node.params["shift"].reshape((-1,) + extra), f"{node.name}/shift")],
                f"{node.name}/shift", output=node.outputs[0])


def _with_constant(builder, node, shapes):
    """Mul, Sub, Div and MatMul: two tensors, or the input and a constant (first when constant_first)."""
    inputs = list(node.inputs)
    if len(inputs) == 1:
        constant = builder.constant(node.params["constant"], f"{node.name}/constant")
        inputs = [constant, inputs[0]] if node.attrs.get("constant_first", 0) else [inputs[0], constant]
    builder.add(node.op, inputs, node.name, output=node.outputs[0])


def _clip(builder, node, shapes):
    bounds = ["" if node.attrs.get(key) is None else
              builder.constant(np.array(node.attrs[key], np.float32), f"{node.name}/{key}") for key in ("min", "max")]
    while bounds and bounds[-1] == "":
        bounds.pop()
    builder.add("Clip", [node.inputs[0]] + bounds, node.name, output=node.outputs[0])


def _prelu(builder, node, shapes):
    builder.add("PRelu", [node.inputs[0], builder.constant(node.params["slope"], f"{node.name}/slope")], node.name,
                output=node.outputs[0])


def _flatten(builder, node, shapes):
    builder.add("Flatten", node.inputs, node.name, output=node.outputs[0], axis=1)


def _reshape(builder, node, shapes):
    # 0 keeps the batch size (allowzero 0): the stored shape is per sample.
    target = builder.constant(np.array([0] + list(node.attrs["shape"]), np.int64), f"{node.name}/shape")
    builder.add("Reshape", [node.inputs[0], target], node.name, output=node.outputs[0])


def _split(builder, node, shapes):
    builder.add_multi("Split", [node.inputs[0], builder.constant(np.array(node.attrs["split"], np.int64),
                                                                 f"{node.name}/split")],
                      node.outputs, node.name, axis=node.attrs["axis"])


def _slice(builder, node, shapes):
    # Python's slice clamping equals ONNX's for the slices a stored graph holds (non-empty ones);
    # an open end is the far end in the step's direction.
    ends = [(INT64_MAX if step > 0 else -INT64_MAX - 1) if end is None else end
            for end, step in zip(node.attrs["ends"], node.attrs["steps"])]
    arrays = [("starts", node.attrs["starts"]), ("ends", ends), ("axes", node.attrs["axes"]),
              ("steps", node.attrs["steps"])]
    builder.add("Slice", [node.inputs[0]] + [builder.constant(np.array(values, np.int64), f"{node.name}/{key}")
                                              for key, values in arrays], node.name, output=node.outputs[0])


def _pad(builder, node, shapes):
    pads = list(node.attrs["pads"])
    half = len(pads) // 2
    onnx_pads = np.array([0] + pads[:half] + [0] + pads[half:], np.int64)
    inputs = [node.inputs[0], builder.constant(onnx_pads, f"{node.name}/pads")]
    mode = node.attrs.get("mode", "constant")
    if mode == "constant":
        inputs.append(builder.constant(np.array(node.attrs.get("value", 0.0), np.float32), f"{node.name}/value"))
    builder.add("Pad", inputs, node.name, output=node.outputs[0], mode=mode)


def _reduce(builder, node, shapes):
    axes = builder.constant(np.array(node.attrs["axes"], np.int64), f"{node.name}/axes")
    builder.add(node.op, [node.inputs[0], axes], node.name, output=node.outputs[0],
                keepdims=int(node.attrs.get("keepdims", 1)))


def _resize(builder, node, shapes):
    input_shape = shapes[node.inputs[0]]
    attributes = {"mode": "nearest",
                  "coordinate_transformation_mode": node.attrs.get("coordinate_transformation_mode", "half_pixel"),
                  "nearest_mode": node.attrs.get("nearest_mode", "round_prefer_floor")}
    scales, sizes = node.attrs.get("scales"), node.attrs.get("sizes")
    roi = ""
    if scales is not None:
        # ONNX takes sizes or scales; with scales its sizes are floor(L * s), as pabnn's when it has no sizes.
        from_scales = [int(np.floor(length * scale)) for length, scale in zip(input_shape[1:], scales)]
        if sizes is not None and list(sizes) != from_scales:
            raise ConversionError(f"node {node.name!r} (Resize): sizes {sizes} are not floor(input size x scales "
                                  f"{scales}); ONNX Resize takes one of them")
        inputs = [node.inputs[0], roi, builder.constant(np.array([1.0] + list(scales), np.float32),
                                                        f"{node.name}/scales")]
    else:
        batch = builder.add("Shape", [node.inputs[0]], f"{node.name}/batch", start=0, end=1)
        full_sizes = builder.add("Concat", [batch, builder.constant(np.array(sizes, np.int64), f"{node.name}/sizes")],
                                 f"{node.name}/sizes", axis=0)
        inputs = [node.inputs[0], roi, "", full_sizes]
    builder.add("Resize", inputs, node.name, output=node.outputs[0], **attributes)


def _dynamic_conv(builder, node, shapes):
    """A Scan over the batch: each sample's Conv with that sample's weights (ONNX Conv takes a
    weight tensor, but its group count is fixed, so the batch cannot be folded into the groups)."""
    prefix = node.name
    # Shapes left open: a graph with symbolic sizes runs at other sizes than `shapes` holds.
    body_inputs = [helper.make_tensor_value_info(f"{prefix}/sample", TensorProto.FLOAT, None),
                   helper.make_tensor_value_info(f"{prefix}/sample_weight", TensorProto.FLOAT, None)]
    axis = numpy_helper.from_array(np.array([0], np.int64), f"{prefix}/axis0")
    conv_inputs = [f"{prefix}/batch_of_one", f"{prefix}/sample_weight"]
    initializers = [axis]
    if "bias" in node.params:
        initializers.append(numpy_helper.from_array(node.params["bias"], f"{prefix}/bias"))
        conv_inputs.append(f"{prefix}/bias")
    body_nodes = [
        helper.make_node("Unsqueeze", [f"{prefix}/sample", f"{prefix}/axis0"], [f"{prefix}/batch_of_one"],
                         name=f"{prefix}/Unsqueeze"),
        helper.make_node("Conv", conv_inputs, [f"{prefix}/sample_output"], name=f"{prefix}/Conv", **_geometry(node)),
        helper.make_node("Squeeze", [f"{prefix}/sample_output", f"{prefix}/axis0"], [f"{prefix}/output"],
                         name=f"{prefix}/Squeeze"),
    ]
    body = helper.make_graph(body_nodes, f"{prefix}/per_sample",
                             body_inputs, [helper.make_tensor_value_info(f"{prefix}/output", TensorProto.FLOAT, None)],
                             initializers)
    builder.add("Scan", node.inputs, node.name, output=node.outputs[0], body=body, num_scan_inputs=2)


EXPORTERS = {
    "Add": _same("Add"),
    "AveragePool": _pool,
    "ChannelAffine": _channel_affine,
    "Clip": _clip,
    "Concat": _same("Concat", ("axis",)),
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Div": _with_constant,
    "DynamicConv": _dynamic_conv,
    "Flatten": _flatten,
    "Gemm": _gemm,
    "GlobalAveragePool": _same("GlobalAveragePool"),
    "HardSigmoid": _same("HardSigmoid", ("alpha", "beta")),
    "HardSwish": _same("HardSwish"),
    "IntConv": _int_conv,
    "IntLinear": _int_conv,
    "LRN": _same("LRN", ("size", "alpha", "beta", "bias")),
    "LeakyRelu": _same("LeakyRelu", ("alpha",)),
    "LogSoftmax": _same("LogSoftmax", ("axis",)),
    "MatMul": _with_constant,
    "MaxPool": _pool,
    "Mul": _with_constant,
    "PAConv": export_pa_conv,
    "PALinear": export_pa_linear,
    "PRelu": _prelu,
    "Pad": _pad,
    "ReduceMax": _reduce,
    "ReduceMean": _reduce,
    "ReduceSum": _reduce,
    "Relu": _same("Relu"),
    "Reshape": _reshape,
    "Resize": _resize,
    "Sigmoid": _same("Sigmoid"),
    "Slice": _slice,
    "Softmax": _same("Softmax", ("axis",)),
    "Split": _split,
    "Staircase": export_staircase,
    "Sub": _with_constant,
    "Tanh": _same("Tanh"),
    "Transpose": _same("Transpose", ("perm",)),
}


# ---- the model --------------------------------------------------------------------------------

def graph_to_onnx(graph, progress=False):
    """The onnx.ModelProto emulating `graph` (a pabnn Graph); raises ConversionError naming the node
    for an op or attribute without an ONNX emulation. progress: a bar on stderr over the nodes."""
    shapes = graph.infer_shapes()
    taken = set(shapes) | {node.name for node in graph.nodes}
    builder = OnnxBuilder(taken)
    for node in tqdm(graph.nodes, desc="exporting", unit="node", disable=not progress, leave=False):
        exporter = EXPORTERS.get(node.op)
        if exporter is None:
            get_op(node.op, node.name)  # an unknown op: the registry's error
            raise ConversionError(f"node {node.name!r}: op {node.op!r} has no ONNX export; exported ops: "
                                  f"{', '.join(sorted(EXPORTERS))}")
        try:
            check_stored_node(node)  # attributes a stored graph may not hold have no export
            exporter(builder, node, shapes)
        except GraphError as error:
            raise ConversionError(f"cannot export to ONNX: {error}") from None
    symbols = graph.symbols()
    batch = "batch" if "batch" not in symbols else "pabnn_batch"
    inputs = []
    for info in graph.inputs:
        dims = [batch] + list(info.shape[1:])
        for axis, symbol in info.symbol_axes():
            dims[axis] = symbol
        inputs.append(helper.make_tensor_value_info(info.name, TensorProto.FLOAT, dims))
    other_shapes = _shapes_at_other_sizes(graph) if symbols else shapes
    outputs = []
    for name in graph.outputs:
        # An axis whose size depends on the symbolic input sizes is left unnamed.
        dims = [batch] + [size if other_shapes is not None and other_shapes[name][axis] == size else None
                            for axis, size in enumerate(shapes[name]) if axis > 0]
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
    onnx_graph = helper.make_graph(builder.nodes, "pabnn_export", inputs, outputs, builder.initializers,
                                   doc_string="float emulation of a pabnn PA model (pabnn export)")
    model = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="pabnn")
    model.ir_version = IR_VERSION
    return model


def _shapes_at_other_sizes(graph):
    """The tensor shapes with every symbolic input size one larger than its example (None when the
    graph does not take those sizes)."""
    try:
        return graph.at_sizes({symbol: size + 1 for symbol, size in graph.symbols().items()}).infer_shapes()
    except GraphError:
        return None


def export_onnx(model, path=None, progress=False):
    """The standard-op float ONNX model computing what `model` computes; written to `path`
    atomically when given.

    model: a .pab file path or a pabnn Graph. Returns the onnx.ModelProto. Raises FormatError for
    a file that is not a valid .pab, ConversionError naming the node for anything without an ONNX
    emulation, OSError when the file cannot be written (no partial file is left). progress: a bar
    on stderr over the nodes."""
    if isinstance(model, Graph):
        graph = model
    elif isinstance(model, (str, os.PathLike)):
        graph = load_graph(model)
    else:
        raise ConversionError(f"export_onnx takes a .pab path or a pabnn Graph, found {type(model).__name__}")
    proto = graph_to_onnx(graph, progress)
    onnx.checker.check_model(proto)
    if path is not None:
        data = proto.SerializeToString()
        write_atomically(path, lambda handle: handle.write(data), ".onnx")
    return proto


