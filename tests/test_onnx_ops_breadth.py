"""The importer's newer converters against onnxruntime, across opsets 11 to 21.

Style of tests/test_onnx_import.py: each model is built with `onnx.helper`, has a dynamic batch
dimension, runs with batch 3 through `import_onnx` + `Session` (float32 kernels) and
`run_reference` (float64), and both must equal onnxruntime within FLOAT32_RTOL. Then the
errors for ops that would move or mix the batch axis.
"""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_onnx_import import (assert_graph_matches, int64_initializer, ops_of,
                              random_initializer, random_input)

from pabnn.converters import import_onnx
from pabnn.engine import ConversionError

OPSETS = [11, 13, 18, 21]


def make_model(nodes, input_shape, opset, initializers=(), outputs=("y",), extra_inputs=(), output_shapes=None):
    """A checked ONNX model with float input "x" [N, *input_shape] (N dynamic); output shapes are
    inferred by ONNX unless given in output_shapes {name: shape}."""
    output_shapes = output_shapes or {}
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *input_shape])]
    inputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", *shape]) for name, shape in extra_inputs]
    graph = helper.make_graph(nodes, "test", inputs,
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, output_shapes.get(name)) for name in outputs],
                              list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10 if opset >= 21 else 9
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def check(model, x, extra=None):
    """Import, compare with onnxruntime (engine and reference), return the graph."""
    graph = import_onnx(model)
    feeds = dict({"x": x}, **(extra or {}))
    import onnxruntime

    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    expected = dict(zip(names, session.run(names, feeds)))
    if extra:
        from pabnn.engine import Session, run_reference
        from tolerances import FLOAT32_RTOL, assert_close

        engine = dict(zip(graph.outputs, Session(graph).run(None, feeds)))
        reference = run_reference(graph, feeds)
        for name, value in expected.items():
            assert_close(engine[name], value, FLOAT32_RTOL, f"engine {name}")
            assert_close(reference[name], value, FLOAT32_RTOL, f"reference {name}")
    else:
        assert_graph_matches(graph, expected, x)
    return graph


def float_initializer(name, array):
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


def conversion_error(model):
    with pytest.raises(ConversionError) as error:
        import_onnx(model)
    return str(error.value)


# ---- activations --------------------------------------------------------------------------------

@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("op, attrs", [
    ("Sigmoid", {}), ("Tanh", {}), ("HardSigmoid", {}), ("HardSigmoid", {"alpha": 1 / 6, "beta": 0.5}),
    ("HardSwish", {}), ("LeakyRelu", {}), ("LeakyRelu", {"alpha": 0.2}),
])
def test_activations(opset, op, attrs):
    if op == "HardSwish" and opset < 14:
        pytest.skip("HardSwish exists from opset 14")
    rng = np.random.default_rng(1)
    model = make_model([helper.make_node(op, ["x"], ["y"], name="act", **attrs)], (3, 4, 5), opset)
    x = 4.0 * random_input(rng, (3, 4, 5))
    x[0, 0, 0, :4] = [0.0, -3.0, 3.0, 40.0]  # HardSwish/HardSigmoid corners, sigmoid saturation
    assert ops_of(check(model, x)) == [op]


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("low, high", [(0.0, 6.0), (-1.0, None), (None, 0.5), (None, None), (2.0, 1.0)])
def test_clip(opset, low, high):
    rng = np.random.default_rng(2)
    initializers, inputs = [], ["x", "", ""]
    for index, (name, value) in enumerate((("low", low), ("high", high)), start=1):
        if value is not None:
            initializers.append(float_initializer(name, value))
            inputs[index] = name
    while inputs[-1] == "":
        inputs.pop()
    model = make_model([helper.make_node("Clip", inputs, ["y"], name="clip")], (3, 4), opset, initializers)
    assert ops_of(check(model, 4.0 * random_input(rng, (3, 4)))) == ["Clip"]


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("slope_shape", [(4, 1, 1), (1,), (5,), (4, 3, 5), (1, 4, 1, 1)])
def test_prelu(opset, slope_shape):
    rng = np.random.default_rng(3)
    model = make_model([helper.make_node("PRelu", ["x", "slope"], ["y"], name="prelu")], (4, 3, 5), opset,
                       [random_initializer(rng, "slope", slope_shape)])
    assert ops_of(check(model, random_input(rng, (4, 3, 5)))) == ["PRelu"]


@pytest.mark.parametrize("opset, axis", [(11, None), (13, None), (13, 1), (18, -2), (21, 2)])
def test_log_softmax(opset, axis):
    rng = np.random.default_rng(4)
    attrs = {} if axis is None else {"axis": axis}
    shape = (6,) if opset < 13 else (4, 3, 5)
    model = make_model([helper.make_node("LogSoftmax", ["x"], ["y"], name="log_softmax", **attrs)], shape, opset)
    assert ops_of(check(model, 5.0 * random_input(rng, shape))) == ["LogSoftmax"]


# ---- Mul, Sub, Div, Add -------------------------------------------------------------------------

@pytest.mark.parametrize("opset", [11, 13, 21])
@pytest.mark.parametrize("op", ["Mul", "Sub", "Div", "Add"])
@pytest.mark.parametrize("other_shape", [(4, 3, 5), (4, 1, 1), (1, 3, 1)], ids=["same", "gate", "row"])
def test_arithmetic_of_two_tensors(opset, op, other_shape):
    rng = np.random.default_rng(5)
    model = make_model([helper.make_node(op, ["x", "other"], ["y"], name="arith")], (4, 3, 5), opset,
                       extra_inputs=[("other", other_shape)])
    other = rng.uniform(0.5, 2.0, (3, *other_shape)).astype(np.float32)
    check(model, random_input(rng, (4, 3, 5)), {"other": other})


@pytest.mark.parametrize("opset", [11, 13, 21])
@pytest.mark.parametrize("op", ["Mul", "Sub", "Div", "Add"])
@pytest.mark.parametrize("constant_shape, expected_op", [
    ((), "ChannelAffine"), ((4, 1, 1), "ChannelAffine"), ((1, 4, 1, 1), "ChannelAffine"),
    ((4, 3, 5), None), ((5,), None), ((1, 3, 1), None), ((1, 1, 1, 5), None),
])
@pytest.mark.parametrize("constant_first", [False, True])
def test_arithmetic_with_a_constant(opset, op, constant_shape, expected_op, constant_first):
    rng = np.random.default_rng(6)
    constant = numpy_helper.from_array(rng.uniform(0.5, 2.0, constant_shape).astype(np.float32), "c")
    inputs = ["c", "x"] if constant_first else ["x", "c"]
    model = make_model([helper.make_node(op, inputs, ["y"], name="arith")], (4, 3, 5), opset, [constant])
    graph = check(model, random_input(rng, (4, 3, 5)))
    if expected_op == "ChannelAffine" and op != "Div":
        assert ops_of(graph) == ["ChannelAffine"]
    elif expected_op is None:
        assert ops_of(graph) == ["Sub" if op == "Add" else op]


# ---- Concat, Split, Slice, Transpose, Squeeze, Unsqueeze ----------------------------------------------

@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("axis", [1, 2, -1])
def test_concat(opset, axis):
    rng = np.random.default_rng(7)
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Concat", ["x", "r", "x"], ["y"], name="concat", axis=axis)]
    assert ops_of(check(make_model(nodes, (3, 4, 5), opset), random_input(rng, (3, 4, 5)))) == ["Relu", "Concat"]


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("sizes", [None, [2, 4], [1, 2, 3]])
def test_split(opset, sizes):
    rng = np.random.default_rng(8)
    outputs = [f"part{i}" for i in range(len(sizes) if sizes else 2)]
    inputs, attrs, initializers = ["x"], {"axis": 1}, []
    if sizes is not None and opset < 13:
        attrs["split"] = sizes
    elif sizes is not None:
        inputs.append("split")
        initializers.append(int64_initializer("split", sizes))
    elif opset >= 18:
        attrs["num_outputs"] = 2
    model = make_model([helper.make_node("Split", inputs, outputs, name="split", **attrs)], (6, 5), opset,
                       initializers, outputs=outputs)
    assert ops_of(check(model, random_input(rng, (6, 5)))) == ["Split"]


def test_split_uneven_num_outputs_opset18():
    rng = np.random.default_rng(9)
    outputs = ["a", "b", "c"]
    model = make_model([helper.make_node("Split", ["x"], outputs, name="split", axis=2, num_outputs=3)], (2, 7), 18,
                       outputs=outputs)
    check(model, random_input(rng, (2, 7)))


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("starts, ends, axes, steps", [
    ([0], [3], [1], [1]), ([3], [6], [1], None), ([1, -4], [100, -1], [2, 3], [1, 2]),
    ([-1], [-100], [3], [-1]), ([5, 0], [1, 2 ** 62], [-1, 0], [-2, 1]), ([2], [2 ** 31 - 1], [-3], None),
])
def test_slice(opset, starts, ends, axes, steps):
    rng = np.random.default_rng(10)
    initializers = [int64_initializer("starts", starts), int64_initializer("ends", ends),
                    int64_initializer("axes", axes)]
    inputs = ["x", "starts", "ends", "axes"]
    if steps is not None:
        initializers.append(int64_initializer("steps", steps))
        inputs.append("steps")
    model = make_model([helper.make_node("Slice", inputs, ["y"], name="slice")], (6, 5, 7), opset, initializers)
    assert ops_of(check(model, random_input(rng, (6, 5, 7)))) == ["Slice"]


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("perm", [[0, 2, 3, 1], [0, 3, 1, 2], [0, 1, 3, 2]])
def test_transpose(opset, perm):
    rng = np.random.default_rng(11)
    model = make_model([helper.make_node("Transpose", ["x"], ["y"], name="transpose", perm=perm)], (3, 4, 5), opset)
    assert ops_of(check(model, random_input(rng, (3, 4, 5)))) == ["Transpose"]


@pytest.mark.parametrize("opset", OPSETS)
def test_squeeze_and_unsqueeze(opset):
    rng = np.random.default_rng(12)
    if opset < 13:
        nodes = [helper.make_node("Unsqueeze", ["x"], ["u"], name="unsqueeze", axes=[1, -1]),
                 helper.make_node("Squeeze", ["u"], ["y"], name="squeeze", axes=[-1])]
        initializers = []
    else:
        nodes = [helper.make_node("Unsqueeze", ["x", "axes_u"], ["u"], name="unsqueeze"),
                 helper.make_node("Squeeze", ["u", "axes_s"], ["y"], name="squeeze")]
        initializers = [int64_initializer("axes_u", [1, -1]), int64_initializer("axes_s", [-1])]
    graph = check(make_model(nodes, (3, 4), opset, initializers), random_input(rng, (3, 4)))
    assert ops_of(graph) == ["Reshape", "Reshape"]


# ---- shape subgraphs folded at conversion ----------------------------------------------------------------

@pytest.mark.parametrize("opset", OPSETS)
def test_flatten_through_a_shape_subgraph_keeps_the_batch_free(opset):
    """The TorchScript exporter's x.view(x.size(0), -1): Shape, Gather, Unsqueeze, Concat, Reshape."""
    rng = np.random.default_rng(13)
    unsqueeze = (helper.make_node("Unsqueeze", ["batch"], ["batch_1d"], name="unsqueeze", axes=[0]) if opset < 13
                 else helper.make_node("Unsqueeze", ["batch", "zero_axis"], ["batch_1d"], name="unsqueeze"))
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], name="gather", axis=0),
        unsqueeze,
        helper.make_node("Concat", ["batch_1d", "minus_one"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"], name="reshape"),
    ]
    initializers = [int64_initializer("zero", 0), int64_initializer("minus_one", [-1]),
                    int64_initializer("zero_axis", [0])]
    model = make_model(nodes, (3, 4, 5), opset, initializers, output_shapes={"y": ["N", 20]})
    assert ops_of(check(model, random_input(rng, (3, 4, 5)))) == ["Reshape"]


@pytest.mark.parametrize("opset", [13, 18, 21])
def test_channel_shuffle_with_shapes_computed_from_non_batch_dims(opset):
    """view(b, g, c // g, h, w).transpose(1, 2).view(b, c, h, w) with c, h, w from Shape -> Gather,
    c // g by Div, and a ConstantOfShape and Cast on the way (all folded)."""
    rng = np.random.default_rng(14)

    def dim(index):
        return [helper.make_node("Gather", ["shape", f"i{index}"], [f"d{index}"], name=f"gather{index}", axis=0),
                helper.make_node("Unsqueeze", [f"d{index}", "axis0"], [f"u{index}"], name=f"unsqueeze{index}")]

    nodes = [helper.make_node("Shape", ["x"], ["shape"], name="shape")]
    for index in range(4):
        nodes += dim(index)
    nodes += [
        helper.make_node("Div", ["u1", "groups"], ["per_group"], name="div"),
        helper.make_node("ConstantOfShape", ["one_shape"], ["ones"], name="ones",
                         value=numpy_helper.from_array(np.array([2], np.int64))),
        helper.make_node("Cast", ["ones"], ["groups_1d"], name="cast", to=TensorProto.INT64),
        helper.make_node("Concat", ["u0", "groups_1d", "per_group", "u2", "u3"], ["split_shape"], name="c1", axis=0),
        helper.make_node("Reshape", ["x", "split_shape"], ["grouped"], name="reshape1"),
        helper.make_node("Transpose", ["grouped"], ["swapped"], name="transpose", perm=[0, 2, 1, 3, 4]),
        helper.make_node("Concat", ["u0", "u1", "u2", "u3"], ["back_shape"], name="c2", axis=0),
        helper.make_node("Reshape", ["swapped", "back_shape"], ["y"], name="reshape2"),
    ]
    initializers = [int64_initializer(f"i{i}", i) for i in range(4)] + [
        int64_initializer("axis0", [0]), int64_initializer("groups", [2]), int64_initializer("one_shape", [1])]
    model = make_model(nodes, (6, 3, 4), opset, initializers, output_shapes={"y": ["N", 6, 3, 4]})
    graph = check(model, random_input(rng, (6, 3, 4)))
    assert ops_of(graph) == ["Reshape", "Transpose", "Reshape"]


def test_shape_arithmetic_on_the_batch_is_refused():
    """Reshape to [batch * 3, -1] mixes the batch into another axis: the folded shape holds BATCH * 3."""
    nodes = [helper.make_node("Shape", ["x"], ["shape"], name="shape"),
             helper.make_node("Gather", ["shape", "zero"], ["batch"], name="gather", axis=0),
             helper.make_node("Mul", ["batch", "three"], ["rows"], name="batch_times_three")]
    model = make_model(nodes + [
        helper.make_node("Unsqueeze", ["rows", "axis0"], ["rows_1d"], name="unsqueeze"),
        helper.make_node("Concat", ["rows_1d", "minus_one"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"], name="reshape")], (3, 4), 13,
        [int64_initializer("zero", 0), int64_initializer("three", 3), int64_initializer("axis0", [0]),
         int64_initializer("minus_one", [-1])], output_shapes={"y": ["M", 4]})
    message = conversion_error(model)
    assert "'batch_times_three'" in message and "Mul" in message and "batch" in message


def test_reshape_that_moves_the_batch_is_refused():
    nodes = [helper.make_node("Shape", ["x"], ["shape"], name="shape"),
             helper.make_node("Gather", ["shape", "order"], ["target"], name="gather", axis=0),
             helper.make_node("Reshape", ["x", "target"], ["y"], name="moving_reshape")]
    model = make_model(nodes, (1, 4), 13, [int64_initializer("order", [1, 0, 2])], output_shapes={"y": [1, "N", 4]})
    message = conversion_error(model)
    assert "'moving_reshape'" in message and "Reshape" in message and "batch" in message


# ---- Pad ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
@pytest.mark.parametrize("pads", [[0, 0, 1, 2, 0, 0, 2, 1], [0, 1, 0, 1, 0, 0, 1, 0]])
def test_pad(opset, mode, pads):
    rng = np.random.default_rng(15)
    initializers = [int64_initializer("pads", pads)]
    inputs = ["x", "pads"]
    if mode == "constant":
        initializers.append(float_initializer("value", -1.5))
        inputs.append("value")
    model = make_model([helper.make_node("Pad", inputs, ["y"], name="pad", mode=mode)], (3, 5, 6), opset, initializers)
    assert ops_of(check(model, random_input(rng, (3, 5, 6)))) == ["Pad"]


@pytest.mark.parametrize("opset", [18, 21])
def test_pad_with_axes(opset):
    rng = np.random.default_rng(16)
    model = make_model([helper.make_node("Pad", ["x", "pads", "", "axes"], ["y"], name="pad")], (3, 5, 6), opset,
                       [int64_initializer("pads", [1, 2, 3, 0]), int64_initializer("axes", [-1, 2])])
    assert ops_of(check(model, random_input(rng, (3, 5, 6)))) == ["Pad"]


def test_pad_of_the_batch_axis_is_refused():
    model = make_model([helper.make_node("Pad", ["x", "pads"], ["y"], name="batch_pad")], (3,), 13,
                       [int64_initializer("pads", [1, 0, 0, 0])])
    message = conversion_error(model)
    assert "'batch_pad'" in message and "Pad" in message and "batch" in message


# ---- ReduceMean, ReduceSum, ReduceMax -------------------------------------------------------------

@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("op", ["ReduceMean", "ReduceSum", "ReduceMax"])
@pytest.mark.parametrize("axes, keepdims", [([2, 3], 1), ([-1], 0), ([1, 3], 0)])
def test_reduce(opset, op, axes, keepdims):
    rng = np.random.default_rng(17)
    axes_as_input = opset >= (13 if op == "ReduceSum" else 18)
    if axes_as_input:
        node = helper.make_node(op, ["x", "axes"], ["y"], name="reduce", keepdims=keepdims)
        initializers = [int64_initializer("axes", axes)]
    else:
        node = helper.make_node(op, ["x"], ["y"], name="reduce", keepdims=keepdims, axes=axes)
        initializers = []
    model = make_model([node], (4, 3, 5), opset, initializers)
    assert ops_of(check(model, random_input(rng, (4, 3, 5)))) == [op]


def test_reduce_over_all_axes_is_refused():
    model = make_model([helper.make_node("ReduceMean", ["x"], ["y"], name="mean_all")], (4, 3), 13)
    message = conversion_error(model)
    assert "'mean_all'" in message and "ReduceMean" in message and "batch" in message


# ---- MatMul -------------------------------------------------------------------------------------

@pytest.mark.parametrize("opset", [11, 13, 21])
@pytest.mark.parametrize("input_shape, constant_shape, constant_first", [
    ((5, 4), (4, 6), False), ((2, 5, 4), (4, 3), False), ((2, 5, 4), (1, 4, 3), False),
    ((2, 5, 4), (2, 4, 3), False), ((5, 4), (4,), False), ((5, 4), (3, 5), True), ((2, 5, 4), (7, 5), True),
])
def test_matmul_with_a_constant(opset, input_shape, constant_shape, constant_first):
    rng = np.random.default_rng(18)
    inputs = ["W", "x"] if constant_first else ["x", "W"]
    model = make_model([helper.make_node("MatMul", inputs, ["y"], name="matmul")], input_shape, opset,
                       [random_initializer(rng, "W", constant_shape)])
    assert ops_of(check(model, random_input(rng, input_shape))) == ["MatMul"]


@pytest.mark.parametrize("opset", [11, 13, 21])
@pytest.mark.parametrize("a_shape, b_shape", [((5, 4), (4, 3)), ((2, 5, 4), (2, 4, 3)), ((1, 5, 4), (3, 4, 2))])
def test_matmul_of_two_tensors(opset, a_shape, b_shape):
    rng = np.random.default_rng(19)
    model = make_model([helper.make_node("MatMul", ["x", "b"], ["y"], name="matmul")], a_shape, opset,
                       extra_inputs=[("b", b_shape)])
    check(model, random_input(rng, a_shape), {"b": random_input(rng, b_shape)})


def test_matmul_mixing_the_batch_is_refused():
    rng = np.random.default_rng(20)
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="batch_mixing_matmul")], (4,), 13,
                       [random_initializer(rng, "W", (2, 4, 3))])
    message = conversion_error(model)
    assert "'batch_mixing_matmul'" in message and "MatMul" in message and "batch" in message


# ---- ConvTranspose ------------------------------------------------------------------------------

# (in_channels, out_channels, kernel, strides, pads, output_padding, dilations, group, H, W, extra attrs)
CONV_TRANSPOSE_CASES = [
    pytest.param(3, 4, (3, 3), (1, 1), (0, 0, 0, 0), (0, 0), (1, 1), 1, 5, 5, {}, id="3x3"),
    pytest.param(4, 6, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), (1, 1), 1, 4, 5, {}, id="stride2-pad1-outpad1"),
    pytest.param(4, 4, (4, 4), (2, 2), (1, 1, 1, 1), (0, 0), (1, 1), 2, 4, 4, {}, id="4x4-stride2-group2"),
    pytest.param(6, 6, (3, 3), (2, 1), (0, 1, 2, 0), (1, 0), (1, 1), 6, 5, 4, {}, id="depthwise-asymmetric"),
    pytest.param(3, 2, (3, 2), (1, 2), (1, 0, 0, 1), (0, 1), (2, 1), 1, 4, 5, {}, id="dilation2x1"),
    pytest.param(3, 4, (3, 3), (2, 2), None, (0, 0), (1, 1), 1, 4, 5, {"auto_pad": "SAME_UPPER"}, id="same-upper"),
    pytest.param(3, 4, (3, 3), (2, 2), None, (0, 0), (1, 1), 1, 4, 5, {"auto_pad": "SAME_LOWER"}, id="same-lower"),
    pytest.param(3, 4, (3, 3), (3, 2), None, (0, 0), (1, 1), 1, 3, 3, {"output_shape": [10, 8]}, id="output-shape"),
]


@pytest.mark.parametrize("opset", [11, 13, 21])
@pytest.mark.parametrize("in_channels, out_channels, kernel, strides, pads, output_padding, dilations, group, "
                         "height, width, extra", CONV_TRANSPOSE_CASES)
def test_conv_transpose(opset, in_channels, out_channels, kernel, strides, pads, output_padding, dilations, group,
                        height, width, extra):
    rng = np.random.default_rng(21)
    attrs = dict(extra, kernel_shape=list(kernel), strides=list(strides), dilations=list(dilations), group=group)
    if pads is not None:
        attrs["pads"] = list(pads)
    if any(output_padding):
        attrs["output_padding"] = list(output_padding)
    initializers = [random_initializer(rng, "w", (in_channels, out_channels // group, *kernel), 0.3),
                    random_initializer(rng, "b", (out_channels,))]
    model = make_model([helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], name="deconv", **attrs)],
                       (in_channels, height, width), opset, initializers)
    assert ops_of(check(model, random_input(rng, (in_channels, height, width)))) == ["ConvTranspose"]


# ---- Conv and MaxPool auto_pad ----------------------------------------------------------------

@pytest.mark.parametrize("opset", [11, 13, 21])
@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("kernel, strides, size", [((3, 3), (1, 1), 7), ((3, 3), (2, 2), 8), ((4, 2), (2, 3), 9),
                                                   ((5, 5), (2, 2), 7)])
def test_conv_and_maxpool_auto_pad(opset, auto_pad, kernel, strides, size):
    rng = np.random.default_rng(22)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=list(kernel),
                              strides=list(strides), auto_pad=auto_pad),
             helper.make_node("MaxPool", ["c"], ["y"], name="pool", kernel_shape=[2, 2], auto_pad=auto_pad)]
    model = make_model(nodes, (3, size, size), opset, [random_initializer(rng, "w", (4, 3, *kernel), 0.3)])
    assert ops_of(check(model, random_input(rng, (3, size, size)))) == ["Conv", "MaxPool"]


# ---- Resize -------------------------------------------------------------------------------------

RESIZE_MODES = [("asymmetric", "floor"), ("half_pixel", "round_prefer_floor"), ("asymmetric", "round_prefer_ceil"),
                ("align_corners", "round_prefer_floor"), ("pytorch_half_pixel", "floor"),
                ("half_pixel", "ceil")]


@pytest.mark.parametrize("opset", [11, 13, 18, 19, 21])
@pytest.mark.parametrize("transform, nearest", RESIZE_MODES)
@pytest.mark.parametrize("target", ["scales-up", "scales-down", "sizes"])
def test_resize_nearest(opset, transform, nearest, target):
    rng = np.random.default_rng(23)
    initializers, inputs = [], ["x", "roi" if opset < 13 else ""]
    if opset < 13:
        initializers.append(float_initializer("roi", np.zeros(0)))
    if target.startswith("scales"):
        scales = [1.0, 1.0, 2.0, 3.0] if target == "scales-up" else [1.0, 1.0, 0.5, 0.75]
        initializers.append(float_initializer("scales", scales))
        inputs.append("scales")
    else:
        if opset < 13:
            initializers.append(float_initializer("scales", np.zeros(0)))
            inputs.append("scales")
        else:
            inputs.append("")
        initializers.append(int64_initializer("sizes", [3, 2, 7, 5]))
        inputs.append("sizes")
    node = helper.make_node("Resize", inputs, ["y"], name="resize", mode="nearest",
                            coordinate_transformation_mode=transform, nearest_mode=nearest)
    model = make_model([node], (2, 4, 6), opset, initializers)
    assert ops_of(check(model, random_input(rng, (2, 4, 6)))) == ["Resize"]


@pytest.mark.parametrize("opset", [18, 19, 21])
@pytest.mark.parametrize("policy", ["stretch", "not_larger", "not_smaller"])
def test_resize_sizes_with_axes(opset, policy):
    rng = np.random.default_rng(24)
    node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], name="resize", mode="nearest", axes=[3, 2],
                            keep_aspect_ratio_policy=policy)
    model = make_model([node], (2, 4, 6), opset, [int64_initializer("sizes", [9, 7])])
    assert ops_of(check(model, random_input(rng, (2, 4, 6)))) == ["Resize"]


# ---- ops that would move or mix the batch axis ------------------------------------------------------

@pytest.mark.parametrize("node, initializers, op", [
    (helper.make_node("Transpose", ["x"], ["y"], name="bad", perm=[1, 0, 2]), [], "Transpose"),
    (helper.make_node("Concat", ["x", "x"], ["y"], name="bad", axis=0), [], "Concat"),
    (helper.make_node("Split", ["x"], ["y", "z"], name="bad", axis=0), [], "Split"),
    (helper.make_node("Softmax", ["x"], ["y"], name="bad", axis=0), [], "Softmax"),
    (helper.make_node("LogSoftmax", ["x"], ["y"], name="bad", axis=-3), [], "LogSoftmax"),
    (helper.make_node("Slice", ["x", "s", "e", "a"], ["y"], name="bad"),
     [int64_initializer("s", [0]), int64_initializer("e", [1]), int64_initializer("a", [0])], "Slice"),
    (helper.make_node("Unsqueeze", ["x", "a"], ["y"], name="bad"), [int64_initializer("a", [0])], "Unsqueeze"),
], ids=["transpose", "concat", "split", "softmax", "log-softmax", "slice", "unsqueeze"])
def test_ops_on_the_batch_axis_are_refused(node, initializers, op):
    outputs = tuple(node.output)
    model = make_model([node], (4, 6), 13, initializers, outputs=outputs)
    message = conversion_error(model)
    assert "'bad'" in message and op in message and "batch" in message
