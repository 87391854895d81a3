"""The ONNX importer's float path against onnxruntime.

Every model is built in code with `onnx.helper`, has a dynamic batch dimension and is run with
batch 3 through `import_onnx` + `Session` (float32 kernels) and `run_reference` (float64); both
must equal onnxruntime's outputs within FLOAT32_RTOL. One test per converter of
converters/onnx_ops.py, over opsets 11, 13 and 17, then the errors a user meets on models the
importer cannot take.
"""
import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper
from tolerances import FLOAT32_RTOL, assert_close

from pabnn.converters import fold_batchnorm, import_onnx
from pabnn.engine import ConversionError, Session, run_reference

BATCH = 3
OPSETS = [11, 13, 17]
IR_VERSION = 9  # read by every onnxruntime release that runs opsets up to 19


# ---- building and running models ------------------------------------------------------------

def make_model(nodes, input_shape, outputs=("y",), opset=13, initializers=(), extra_inputs=(), opset_imports=(),
               output_shapes=None):
    """An ONNX model with one float input "x" of shape [N, *input_shape] (N dynamic).

    Output shapes are left to ONNX shape inference unless given in output_shapes {name: shape};
    the model is checked before it is returned. extra_inputs: more graph inputs as (name, shape).
    """
    output_shapes = output_shapes or {}
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *input_shape])]
    graph_inputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))
                     for name, shape in extra_inputs]
    graph = helper.make_graph(
        nodes, "test", graph_inputs,
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, output_shapes.get(name)) for name in outputs],
        list(initializers),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *opset_imports])
    model.ir_version = IR_VERSION
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def random_initializer(rng, name, shape, scale=1.0):
    return numpy_helper.from_array((scale * rng.standard_normal(shape)).astype(np.float32), name)


def int64_initializer(name, values):
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def random_input(rng, input_shape, batch=BATCH):
    return rng.standard_normal((batch, *input_shape)).astype(np.float32)


def onnxruntime_outputs(model, x):
    """{output name: array} computed by onnxruntime on the CPU."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, {"x": x})))


def assert_graph_matches(graph, expected, x):
    """The engine (float32 kernels) and the float64 reference both equal `expected` on input x."""
    assert sorted(graph.outputs) == sorted(expected)
    engine = dict(zip(graph.outputs, Session(graph).run(None, {"x": x})))
    reference = run_reference(graph, {"x": x})
    for name, value in expected.items():
        assert engine[name].dtype == np.float32
        assert_close(engine[name], value, FLOAT32_RTOL, f"engine output {name!r}")
        assert_close(reference[name], value, FLOAT32_RTOL, f"reference output {name!r}")


def assert_matches_onnxruntime(model, x):
    """Import `model`, check it against onnxruntime on input x, and return the imported graph."""
    graph = import_onnx(model)
    assert_graph_matches(graph, onnxruntime_outputs(model, x), x)
    return graph


def ops_of(graph):
    return [node.op for node in graph.nodes]


def conv_node(inputs, output, kernel, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1, name="conv"):
    """A Conv node that leaves default-valued attributes out, as exporters do."""
    attrs = {"kernel_shape": list(kernel)}
    if tuple(strides) != (1, 1):
        attrs["strides"] = list(strides)
    if any(pads):
        attrs["pads"] = list(pads)
    if tuple(dilations) != (1, 1):
        attrs["dilations"] = list(dilations)
    if group != 1:
        attrs["group"] = group
    return helper.make_node("Conv", list(inputs), [output], name=name, **attrs)


# ---- Conv -----------------------------------------------------------------------------------

# (in_channels, out_channels, kernel, strides, pads [top, left, bottom, right], dilations, group, bias, H, W)
CONV_CASES = [
    pytest.param(3, 5, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, True, 9, 9, id="3x3-pad1"),
    pytest.param(6, 10, (3, 3), (2, 2), (1, 0, 2, 1), (1, 1), 1, True, 11, 10, id="3x3-stride2-asymmetric-pads"),
    pytest.param(5, 7, (5, 5), (1, 1), (2, 2, 2, 2), (1, 1), 1, False, 9, 8, id="5x5-no-bias"),
    pytest.param(5, 3, (3, 3), (1, 1), (2, 1, 2, 0), (2, 2), 1, True, 10, 9, id="3x3-dilation2"),
    pytest.param(6, 4, (3, 3), (2, 1), (0, 1, 1, 0), (1, 1), 2, True, 9, 9, id="3x3-group2-stride2x1"),
    pytest.param(6, 10, (5, 5), (1, 2), (2, 2, 2, 2), (2, 1), 2, False, 13, 12, id="5x5-group2-dilation2-no-bias"),
    pytest.param(6, 6, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 6, True, 8, 8, id="3x3-depthwise-stride2"),
    pytest.param(9, 3, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 1, True, 7, 7, id="1x1-stride2"),
    pytest.param(7, 11, (1, 1), (1, 1), (1, 0, 0, 1), (1, 1), 1, False, 5, 6, id="1x1-padded-no-bias"),
    pytest.param(4, 6, (3, 5), (1, 2), (1, 2, 0, 2), (1, 1), 1, True, 8, 11, id="3x5-stride1x2"),
]


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("in_channels, out_channels, kernel, strides, pads, dilations, group, bias, height, width",
                         CONV_CASES)
def test_conv(opset, in_channels, out_channels, kernel, strides, pads, dilations, group, bias, height, width):
    rng = np.random.default_rng(1)
    initializers = [random_initializer(rng, "w", (out_channels, in_channels // group, *kernel), 0.3)]
    inputs = ["x", "w"]
    if bias:
        initializers.append(random_initializer(rng, "b", (out_channels,)))
        inputs.append("b")
    node = conv_node(inputs, "y", kernel, strides, pads, dilations, group)
    model = make_model([node], (in_channels, height, width), opset=opset, initializers=initializers)
    graph = assert_matches_onnxruntime(model, random_input(rng, (in_channels, height, width)))
    assert ops_of(graph) == ["Conv"]


def test_conv_batch_is_dynamic():
    """One imported graph runs any batch size, each sample independently of the others."""
    rng = np.random.default_rng(2)
    model = make_model([conv_node(["x", "w", "b"], "y", (3, 3), pads=(1, 1, 1, 1))], (5, 6, 6),
                       initializers=[random_initializer(rng, "w", (4, 5, 3, 3)), random_initializer(rng, "b", (4,))])
    graph = import_onnx(model)
    assert graph.inputs[0].shape == (None, 5, 6, 6)
    session = Session(graph)
    x = random_input(rng, (5, 6, 6), batch=7)
    (whole,) = session.run(None, {"x": x})
    for batch in (1, 2, 7):
        (part,) = session.run(None, {"x": x[:batch]})
        assert_close(part, whole[:batch], FLOAT32_RTOL, f"batch {batch}")
        assert_close(part, onnxruntime_outputs(model, x[:batch])["y"], FLOAT32_RTOL, f"batch {batch} vs onnxruntime")


def _one_hot_conv_model(in_channels, out_channels, strides, pads, dilations, height, width):
    """Conv whose weight w[o, c, ky, kx] = 2 ** (tap index): each output value names the tap that fired."""
    exponents = np.arange(out_channels * in_channels * 9).reshape(out_channels, in_channels, 3, 3)
    weight = (2.0 ** exponents).astype(np.float32)
    node = conv_node(["x", "w"], "y", (3, 3), strides, pads, dilations)
    model = make_model([node], (in_channels, height, width), initializers=[numpy_helper.from_array(weight, "w")])
    return model, weight


def test_conv_one_hot_input_fires_the_expected_taps_by_hand():
    """A single 1 at the top-left corner under a padded 3x3 conv, written out by hand.

    Output (oy, ox) sees input (oy + ky - 1, ox + kx - 1); the 1 at (0, 0) is under tap
    (ky, kx) = (1 - oy, 1 - ox), whose weight is 2 ** (3 * ky + kx).
    """
    model, _ = _one_hot_conv_model(1, 1, (1, 1), (1, 1, 1, 1), (1, 1), 4, 5)
    x = np.zeros((1, 1, 4, 5), np.float32)
    x[0, 0, 0, 0] = 1.0
    expected = np.zeros((1, 1, 4, 5), np.float32)
    expected[0, 0, 0, 0] = 2.0 ** 4  # center tap (1, 1)
    expected[0, 0, 0, 1] = 2.0 ** 3  # tap (1, 0)
    expected[0, 0, 1, 0] = 2.0 ** 1  # tap (0, 1)
    expected[0, 0, 1, 1] = 2.0 ** 0  # tap (0, 0)
    graph = import_onnx(model)
    # Every output is a single power of two (or 0), exact in float32: no tolerance is needed.
    np.testing.assert_array_equal(Session(graph).run(None, {"x": x})[0], expected)
    np.testing.assert_array_equal(run_reference(graph, {"x": x})["y"], expected)
    assert_close(onnxruntime_outputs(model, x)["y"], expected, FLOAT32_RTOL, "onnxruntime")


@pytest.mark.parametrize("strides, pads, dilations", [
    ((1, 1), (1, 1, 1, 1), (1, 1)),
    ((2, 2), (1, 0, 2, 1), (1, 1)),
    ((1, 2), (2, 2, 2, 2), (2, 2)),
    ((2, 1), (0, 2, 1, 0), (2, 1)),
])
def test_conv_one_hot_inputs_fire_the_expected_taps(strides, pads, dilations):
    """Each sample holds a single 1 at its own (channel, row, column); output (o, oy, ox) must be
    the weight of the one tap (c, ky, kx) with oy*s + ky*d - pad == row, or 0 if there is none."""
    in_channels, out_channels, height, width = 2, 2, 6, 7
    model, weight = _one_hot_conv_model(in_channels, out_channels, strides, pads, dilations, height, width)
    positions = [(0, 0, 0), (1, 5, 6), (1, 2, 3), (0, 5, 0), (0, 3, 6)]  # corners, edges and the middle
    x = np.zeros((len(positions), in_channels, height, width), np.float32)
    for b, (c, row, col) in enumerate(positions):
        x[b, c, row, col] = 1.0
    graph = import_onnx(model)
    engine = Session(graph).run(None, {"x": x})[0]
    reference = run_reference(graph, {"x": x})["y"]
    expected = np.zeros_like(engine)
    for b, (c, row, col) in enumerate(positions):
        for oy in range(expected.shape[2]):
            for ox in range(expected.shape[3]):
                for ky in range(3):
                    for kx in range(3):
                        if (oy * strides[0] + ky * dilations[0] - pads[0] == row
                                and ox * strides[1] + kx * dilations[1] - pads[1] == col):
                            expected[b, :, oy, ox] = weight[:, c, ky, kx]
    assert np.count_nonzero(expected) > 0
    np.testing.assert_array_equal(engine, expected)
    np.testing.assert_array_equal(reference, expected)
    assert_close(onnxruntime_outputs(model, x)["y"], expected, FLOAT32_RTOL, "onnxruntime")


# ---- Gemm and MatMul ------------------------------------------------------------------------

@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("trans_b, alpha, beta, bias", [
    (0, 1.0, 1.0, "vector"),
    (1, 1.0, 1.0, "vector"),
    (1, 0.5, 2.0, "vector"),
    (0, -1.5, 0.25, "scalar"),
    (1, 1.0, 3.0, "row"),
    (0, 2.0, 1.0, None),
])
def test_gemm(opset, trans_b, alpha, beta, bias):
    rng = np.random.default_rng(3)
    features, outputs = 13, 6
    initializers = [random_initializer(rng, "B", (outputs, features) if trans_b else (features, outputs))]
    inputs = ["x", "B"]
    if bias is not None:
        shape = {"vector": (outputs,), "scalar": (), "row": (1, outputs)}[bias]
        initializers.append(random_initializer(rng, "C", shape))
        inputs.append("C")
    node = helper.make_node("Gemm", inputs, ["y"], name="gemm", transB=trans_b, alpha=alpha, beta=beta)
    model = make_model([node], (features,), opset=opset, initializers=initializers)
    graph = assert_matches_onnxruntime(model, random_input(rng, (features,)))
    assert ops_of(graph) == ["Gemm"]


@pytest.mark.parametrize("opset", OPSETS)
def test_matmul(opset):
    rng = np.random.default_rng(4)
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="matmul")
    model = make_model([node], (10,), opset=opset, initializers=[random_initializer(rng, "W", (10, 7))])
    graph = assert_matches_onnxruntime(model, random_input(rng, (10,)))
    assert ops_of(graph) == ["Gemm"]


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("bias_first", [False, True])
def test_matmul_then_add_bias_folds_into_one_gemm(opset, bias_first):
    """MatMul + Add(constant vector), as exporters write a Linear layer, becomes one Gemm."""
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["product"], name="matmul"),
        helper.make_node("Add", ["b", "product"] if bias_first else ["product", "b"], ["y"], name="add_bias"),
    ]
    model = make_model(nodes, (10,), opset=opset,
                       initializers=[random_initializer(rng, "W", (10, 7)), random_initializer(rng, "b", (7,))])
    x = random_input(rng, (10,))
    graph = assert_matches_onnxruntime(model, x)
    assert ops_of(graph) == ["Gemm", "ChannelAffine"]
    folded = fold_batchnorm(graph)
    assert ops_of(folded) == ["Gemm"]
    assert folded.outputs == ["y"]
    assert_graph_matches(folded, onnxruntime_outputs(model, x), x)


# ---- BatchNormalization ---------------------------------------------------------------------

def _batchnorm_initializers(rng, prefix, channels):
    return [
        numpy_helper.from_array(rng.uniform(0.5, 2.0, channels).astype(np.float32), f"{prefix}_gamma"),
        random_initializer(rng, f"{prefix}_beta", (channels,)),
        random_initializer(rng, f"{prefix}_mean", (channels,)),
        numpy_helper.from_array(rng.uniform(0.2, 3.0, channels).astype(np.float32), f"{prefix}_var"),
    ]


def _batchnorm_node(source, output, prefix, epsilon=1e-3):
    inputs = [source] + [f"{prefix}_{key}" for key in ("gamma", "beta", "mean", "var")]
    return helper.make_node("BatchNormalization", inputs, [output], name=prefix, epsilon=epsilon)


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("conv_bias", [False, True])
def test_batchnorm_after_conv_folds_into_the_conv(opset, conv_bias):
    rng = np.random.default_rng(6)
    initializers = [random_initializer(rng, "w", (5, 3, 3, 3), 0.3)] + _batchnorm_initializers(rng, "bn", 5)
    inputs = ["x", "w"]
    if conv_bias:
        initializers.append(random_initializer(rng, "b", (5,)))
        inputs.append("b")
    nodes = [conv_node(inputs, "conv_out", (3, 3), (2, 2), (1, 1, 1, 1)), _batchnorm_node("conv_out", "y", "bn")]
    model = make_model(nodes, (3, 9, 9), opset=opset, initializers=initializers)
    x = random_input(rng, (3, 9, 9))
    graph = assert_matches_onnxruntime(model, x)
    assert ops_of(graph) == ["Conv", "ChannelAffine"]
    folded = fold_batchnorm(graph)
    assert ops_of(folded) == ["Conv"]
    assert folded.outputs == ["y"]
    assert_graph_matches(folded, onnxruntime_outputs(model, x), x)


def test_conv_batchnorm_add_chain_folds_completely():
    """Conv -> BatchNorm -> Add(per-channel constant) folds into one Conv."""
    rng = np.random.default_rng(7)
    initializers = ([random_initializer(rng, "w", (4, 3, 3, 3), 0.3), random_initializer(rng, "shift", (1, 4, 1, 1))]
                    + _batchnorm_initializers(rng, "bn", 4))
    nodes = [
        conv_node(["x", "w"], "conv_out", (3, 3), pads=(1, 1, 1, 1)),
        _batchnorm_node("conv_out", "bn_out", "bn"),
        helper.make_node("Add", ["bn_out", "shift"], ["y"], name="add_shift"),
    ]
    model = make_model(nodes, (3, 6, 6), initializers=initializers)
    x = random_input(rng, (3, 6, 6))
    graph = assert_matches_onnxruntime(model, x)
    folded = fold_batchnorm(graph)
    assert ops_of(folded) == ["Conv"]
    assert_graph_matches(folded, onnxruntime_outputs(model, x), x)


@pytest.mark.parametrize("opset", OPSETS)
def test_batchnorm_on_the_graph_input_stays_a_channel_affine(opset):
    """Nothing precedes this BatchNorm, so it cannot fold; it runs as a ChannelAffine."""
    rng = np.random.default_rng(8)
    initializers = [random_initializer(rng, "w", (6, 5, 3, 3), 0.3)] + _batchnorm_initializers(rng, "bn", 5)
    nodes = [_batchnorm_node("x", "normalized", "bn"), conv_node(["normalized", "w"], "y", (3, 3))]
    model = make_model(nodes, (5, 7, 7), opset=opset, initializers=initializers)
    x = random_input(rng, (5, 7, 7))
    folded = fold_batchnorm(assert_matches_onnxruntime(model, x))
    assert ops_of(folded) == ["ChannelAffine", "Conv"]
    assert_graph_matches(folded, onnxruntime_outputs(model, x), x)


def test_batchnorm_whose_conv_output_is_also_read_elsewhere_does_not_fold():
    """Folding would change the Conv's other reader, so the pass must leave the pair alone."""
    rng = np.random.default_rng(9)
    initializers = [random_initializer(rng, "w", (4, 4, 3, 3), 0.3)] + _batchnorm_initializers(rng, "bn", 4)
    nodes = [
        conv_node(["x", "w"], "conv_out", (3, 3), pads=(1, 1, 1, 1)),
        _batchnorm_node("conv_out", "bn_out", "bn"),
        helper.make_node("Add", ["conv_out", "bn_out"], ["y"], name="add"),
    ]
    model = make_model(nodes, (4, 5, 5), initializers=initializers)
    x = random_input(rng, (4, 5, 5))
    folded = fold_batchnorm(assert_matches_onnxruntime(model, x))
    assert ops_of(folded) == ["Conv", "ChannelAffine", "Add"]
    assert_graph_matches(folded, onnxruntime_outputs(model, x), x)


# ---- Add and Relu ---------------------------------------------------------------------------

@pytest.mark.parametrize("opset", OPSETS)
def test_add_of_two_tensors_with_relu(opset):
    """A residual connection: y = relu(x + conv(x))."""
    rng = np.random.default_rng(10)
    nodes = [
        conv_node(["x", "w"], "branch", (3, 3), pads=(1, 1, 1, 1)),
        helper.make_node("Add", ["x", "branch"], ["sum"], name="residual"),
        helper.make_node("Relu", ["sum"], ["y"], name="relu"),
    ]
    model = make_model(nodes, (5, 6, 6), opset=opset, initializers=[random_initializer(rng, "w", (5, 5, 3, 3), 0.3)])
    graph = assert_matches_onnxruntime(model, random_input(rng, (5, 6, 6)))
    assert ops_of(graph) == ["Conv", "Add", "Relu"]


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("input_shape, constant_shape, constant_first", [
    ((5, 4, 6), (5, 1, 1), False),
    ((5, 4, 6), (1, 5, 1, 1), True),
    ((5, 4, 6), (), False),
    ((5, 4, 6), (1,), True),
    ((7,), (7,), False),
    ((7,), (1, 7), True),
], ids=["C11", "1C11-first", "scalar", "one-first", "rank2-vector", "rank2-row-first"])
def test_add_of_a_tensor_and_a_per_channel_constant(opset, input_shape, constant_shape, constant_first):
    rng = np.random.default_rng(11)
    inputs = ["shift", "x"] if constant_first else ["x", "shift"]
    nodes = [helper.make_node("Add", inputs, ["y"], name="add_shift")]
    model = make_model(nodes, input_shape, opset=opset, initializers=[random_initializer(rng, "shift", constant_shape)])
    graph = assert_matches_onnxruntime(model, random_input(rng, input_shape))
    assert ops_of(graph) == ["ChannelAffine"]


@pytest.mark.parametrize("opset", OPSETS)
def test_relu(opset):
    rng = np.random.default_rng(12)
    model = make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], (3, 4, 5), opset=opset)
    x = random_input(rng, (3, 4, 5))
    x[0, 0, 0, :3] = [0.0, -0.0, -1e-30]
    graph = assert_matches_onnxruntime(model, x)
    assert ops_of(graph) == ["Relu"]


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("terms", [["tanh"], ["x", "relu"], ["x", "relu", "sigmoid", "tanh"], ["relu", "shift", "x"]])
def test_sum(opset, terms):
    """Sum of 1, 2 or 4 tensors, one a per-channel constant: a chain of Add in onnxruntime's order."""
    rng = np.random.default_rng(23)
    nodes = [helper.make_node(op, ["x"], [op.lower()], name=op.lower()) for op in ("Relu", "Sigmoid", "Tanh")]
    nodes.append(helper.make_node("Sum", terms, ["y"], name="sum"))
    model = make_model(nodes, (3, 4, 5), opset=opset, initializers=[random_initializer(rng, "shift", (3, 1, 1))])
    graph = assert_matches_onnxruntime(model, random_input(rng, (3, 4, 5)))
    assert ops_of(graph).count("Add") == max(0, len(terms) - 1 - ("shift" in terms))


def test_reshape_of_a_batch_1_export():
    """Caffe2's batch-1 exports fix the batch at 1 ([1, 9216] before AlexNet's classifier): equal to
    onnxruntime at batch 1, and each sample reshaped alone in a larger batch."""
    rng = np.random.default_rng(24)
    node = helper.make_node("Reshape", ["x", "shape"], ["y"], name="batch_1_reshape")
    model = make_model([node], (4, 3, 2), initializers=[int64_initializer("shape", [1, 2, 2, 6])],
                       output_shapes={"y": [1, 2, 2, 6]})
    graph = assert_matches_onnxruntime(model, random_input(rng, (4, 3, 2), batch=1))
    x = random_input(rng, (4, 3, 2))
    np.testing.assert_array_equal(Session(graph).run(None, {"x": x})[0], x.reshape(3, 2, 2, 6))


# ---- pools ----------------------------------------------------------------------------------

def _pool_node(op, kernel, strides=None, pads=None, dilations=None, ceil_mode=0, count_include_pad=None,
               source="x", output="y"):
    attrs = {"kernel_shape": list(kernel)}
    for key, value in (("strides", strides), ("pads", pads), ("dilations", dilations)):
        if value is not None:
            attrs[key] = list(value)
    if ceil_mode:
        attrs["ceil_mode"] = 1
    if count_include_pad is not None:
        attrs["count_include_pad"] = count_include_pad
    return helper.make_node(op, [source], [output], name=op.lower(), **attrs)


# (kernel, strides, pads, dilations, ceil_mode, H, W)
MAXPOOL_CASES = [
    pytest.param((2, 2), (2, 2), None, None, 0, 8, 8, id="k2-s2"),
    pytest.param((3, 3), None, (1, 1, 1, 1), None, 0, 7, 6, id="k3-s1-pad1"),
    pytest.param((3, 3), (2, 2), (0, 1, 2, 0), None, 0, 9, 8, id="k3-s2-asymmetric-pads"),
    pytest.param((3, 3), (2, 2), None, None, 1, 8, 8, id="k3-s2-ceil"),
    pytest.param((3, 3), (2, 2), (1, 1, 1, 1), None, 1, 10, 9, id="k3-s2-pad1-ceil"),
    pytest.param((2, 3), (1, 2), (1, 0, 0, 2), None, 0, 6, 9, id="k2x3-s1x2"),
    pytest.param((2, 2), (1, 1), None, (2, 2), 0, 7, 7, id="k2-dilation2"),
    pytest.param((3, 3), (2, 2), (1, 2, 1, 2), (2, 2), 0, 9, 10, id="k3-s2-dilation2-pads"),
    pytest.param((3, 3), (2, 2), None, (2, 1), 1, 10, 9, id="k3-s2-dilation2x1-ceil"),
    pytest.param(
        (2, 2), (3, 3), None, (2, 2), 1, 7, 7, id="k2-s3-dilation2-ceil",),
]


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("kernel, strides, pads, dilations, ceil_mode, height, width", MAXPOOL_CASES)
def test_maxpool(opset, kernel, strides, pads, dilations, ceil_mode, height, width):
    rng = np.random.default_rng(13)
    model = make_model([_pool_node("MaxPool", kernel, strides, pads, dilations, ceil_mode)], (3, height, width),
                       opset=opset)
    # All-negative values: a padded position that wrongly counted as 0 would win the max.
    x = -np.abs(random_input(rng, (3, height, width))) - 0.5
    graph = assert_matches_onnxruntime(model, x)
    assert ops_of(graph) == ["MaxPool"]


# (kernel, strides, pads, count_include_pad, ceil_mode, H, W)
AVERAGEPOOL_CASES = [
    pytest.param((2, 2), (2, 2), None, None, 0, 8, 8, id="k2-s2"),
    pytest.param((3, 3), None, (1, 1, 1, 1), 0, 0, 7, 6, id="k3-pad1-exclude-pad"),
    pytest.param((3, 3), None, (1, 1, 1, 1), 1, 0, 7, 6, id="k3-pad1-include-pad"),
    pytest.param((3, 3), (2, 2), (0, 1, 2, 0), 0, 0, 9, 8, id="k3-s2-asymmetric-pads-exclude-pad"),
    pytest.param((3, 3), (2, 2), (0, 1, 2, 0), 1, 0, 9, 8, id="k3-s2-asymmetric-pads-include-pad"),
    pytest.param((3, 3), (2, 2), None, 0, 1, 8, 8, id="k3-s2-ceil-exclude-pad"),
    pytest.param((2, 3), (2, 2), (1, 1, 1, 1), 0, 1, 9, 10, id="k2x3-s2-pad1-ceil-exclude-pad"),
]


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("kernel, strides, pads, count_include_pad, ceil_mode, height, width", AVERAGEPOOL_CASES)
def test_averagepool(opset, kernel, strides, pads, count_include_pad, ceil_mode, height, width):
    rng = np.random.default_rng(14)
    node = _pool_node("AveragePool", kernel, strides, pads, None, ceil_mode, count_include_pad)
    model = make_model([node], (3, height, width), opset=opset)
    # Values far from 0: a wrong divisor or a counted padded zero shows up clearly.
    graph = assert_matches_onnxruntime(model, random_input(rng, (3, height, width)) + 3.0)
    assert ops_of(graph) == ["AveragePool"]


def test_averagepool_dilation_opset19():
    rng = np.random.default_rng(15)
    model = make_model([_pool_node("AveragePool", (3, 3), dilations=(2, 2))], (3, 8, 8), opset=19)
    assert_matches_onnxruntime(model, random_input(rng, (3, 8, 8)))


def test_averagepool_ceil_mode_with_count_include_pad_is_refused():
    model = make_model([_pool_node("AveragePool", (3, 3), (2, 2), None, None, 1, 1)], (3, 8, 8))
    with pytest.raises(ConversionError) as error:
        import_onnx(model)
    message = str(error.value)
    assert "'averagepool'" in message and "AveragePool" in message and "count_include_pad" in message


@pytest.mark.parametrize("opset", OPSETS)
def test_global_average_pool(opset):
    rng = np.random.default_rng(16)
    model = make_model([helper.make_node("GlobalAveragePool", ["x"], ["y"], name="gap")], (6, 5, 7), opset=opset)
    graph = assert_matches_onnxruntime(model, random_input(rng, (6, 5, 7)) + 1.0)
    assert ops_of(graph) == ["GlobalAveragePool"]


# ---- shape ops ------------------------------------------------------------------------------

@pytest.mark.parametrize("opset", OPSETS)
def test_flatten_axis_1(opset):
    rng = np.random.default_rng(17)
    model = make_model([helper.make_node("Flatten", ["x"], ["y"], name="flatten", axis=1)], (3, 4, 5), opset=opset)
    graph = assert_matches_onnxruntime(model, random_input(rng, (3, 4, 5)))
    assert ops_of(graph) == ["Flatten"]


@pytest.mark.parametrize("axis", [2, -1, 0])
def test_flatten_axis_other_than_1_is_refused(axis):
    model = make_model([helper.make_node("Flatten", ["x"], ["y"], name="flatten", axis=axis)], (3, 4, 5))
    message = _conversion_error(model)
    assert "'flatten'" in message and "Flatten" in message and f"axis={axis}" in message


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("shape", [[0, -1], [-1, 60], [0, 3, -1], [-1, 12, 5]])
def test_reshape(opset, shape):
    rng = np.random.default_rng(19)
    node = helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape")
    model = make_model([node], (3, 4, 5), opset=opset, initializers=[int64_initializer("shape", shape)])
    graph = assert_matches_onnxruntime(model, random_input(rng, (3, 4, 5)))
    assert ops_of(graph) == ["Reshape"]


@pytest.mark.parametrize("opset, input_shape, axis", [
    (11, (10,), None),
    (11, (10,), 1),
    (13, (10,), None),
    (13, (4, 3, 5), None),
    (13, (4, 3, 5), 1),
    (17, (4, 3, 5), -2),
])
def test_softmax(opset, input_shape, axis):
    rng = np.random.default_rng(20)
    attrs = {} if axis is None else {"axis": axis}
    model = make_model([helper.make_node("Softmax", ["x"], ["y"], name="softmax", **attrs)], input_shape, opset=opset)
    graph = assert_matches_onnxruntime(model, 4.0 * random_input(rng, input_shape))
    assert ops_of(graph) == ["Softmax"]


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("opset, input_shape, axis, ops", [
    (11, (4, 3, 5), None, ["Reshape", "{op}", "Reshape"]),  # over C*H*W together
    (12, (4, 3, 5), 2, ["Reshape", "{op}", "Reshape"]),     # over H*W, per channel
    (11, (6, 1, 1), None, ["{op}"]),                        # SqueezeNet's [N, classes, 1, 1]: over C alone
])
def test_softmax_before_opset_13_over_flattened_axes(op, opset, input_shape, axis, ops):
    """Before opset 13 Softmax and LogSoftmax flatten the input to 2-D at `axis` and normalize each row."""
    rng = np.random.default_rng(21)
    attrs = {} if axis is None else {"axis": axis}
    model = make_model([helper.make_node(op, ["x"], ["y"], name="softmax", **attrs)], input_shape, opset=opset)
    graph = assert_matches_onnxruntime(model, 4.0 * random_input(rng, input_shape))
    assert ops_of(graph) == [name.format(op=op) for name in ops]


# ---- Identity, Dropout and Constant ---------------------------------------------------------

@pytest.mark.parametrize("opset", OPSETS)
def test_identity_and_dropout_vanish(opset):
    rng = np.random.default_rng(21)
    if opset < 12:
        dropout = helper.make_node("Dropout", ["after_identity"], ["after_dropout"], name="dropout", ratio=0.3)
        initializers = []
    else:
        dropout = helper.make_node("Dropout", ["after_identity", "ratio"], ["after_dropout"], name="dropout")
        initializers = [numpy_helper.from_array(np.array(0.3, np.float32), "ratio")]
    nodes = [
        helper.make_node("Relu", ["x"], ["relu_out"], name="relu"),
        helper.make_node("Identity", ["relu_out"], ["after_identity"], name="identity"),
        dropout,
        helper.make_node("GlobalAveragePool", ["after_dropout"], ["y"], name="gap"),
    ]
    model = make_model(nodes, (4, 5, 5), opset=opset, initializers=initializers)
    graph = assert_matches_onnxruntime(model, random_input(rng, (4, 5, 5)))
    assert ops_of(graph) == ["Relu", "GlobalAveragePool"]


@pytest.mark.parametrize("opset", OPSETS)
def test_identity_producing_a_graph_output(opset):
    """The output keeps its ONNX name even though it comes from an Identity; the renamed tensor
    is also read by another node that feeds a second output."""
    rng = np.random.default_rng(22)
    nodes = [
        conv_node(["x", "w"], "conv_out", (3, 3), pads=(1, 1, 1, 1)),
        helper.make_node("Relu", ["conv_out"], ["features"], name="relu"),
        helper.make_node("Identity", ["features"], ["y"], name="identity"),
        helper.make_node("GlobalAveragePool", ["features"], ["pooled"], name="gap"),
    ]
    model = make_model(nodes, (3, 5, 5), outputs=("y", "pooled"), opset=opset,
                       initializers=[random_initializer(rng, "w", (4, 3, 3, 3), 0.3)])
    graph = assert_matches_onnxruntime(model, random_input(rng, (3, 5, 5)))
    assert graph.outputs == ["y", "pooled"]
    assert ops_of(graph) == ["Conv", "Relu", "GlobalAveragePool"]


@pytest.mark.parametrize("opset", OPSETS)
def test_constant_node_weights(opset):
    """Conv weight and bias, Gemm matrix and Reshape shape given as Constant nodes."""
    rng = np.random.default_rng(23)

    def constant(name, array):
        return helper.make_node("Constant", [], [name], name=f"const_{name}",
                                value=numpy_helper.from_array(array, f"{name}_value"))

    nodes = [
        constant("w", (0.3 * rng.standard_normal((4, 3, 3, 3))).astype(np.float32)),
        constant("b", rng.standard_normal(4).astype(np.float32)),
        conv_node(["x", "w", "b"], "conv_out", (3, 3), (2, 2), (1, 1, 1, 1)),
        constant("shape", np.array([0, -1], np.int64)),
        helper.make_node("Reshape", ["conv_out", "shape"], ["flat"], name="reshape"),
        constant("B", rng.standard_normal((6, 36)).astype(np.float32)),
        constant("C", rng.standard_normal(6).astype(np.float32)),
        helper.make_node("Gemm", ["flat", "B", "C"], ["y"], name="gemm", transB=1),
    ]
    model = make_model(nodes, (3, 5, 5), opset=opset)
    graph = assert_matches_onnxruntime(model, random_input(rng, (3, 5, 5)))
    assert ops_of(graph) == ["Conv", "Reshape", "Gemm"]


@pytest.mark.parametrize("opset", [13, 17])
def test_constant_node_with_value_ints_shape(opset):
    rng = np.random.default_rng(24)
    nodes = [
        helper.make_node("Constant", [], ["shape"], name="const_shape", value_ints=[-1, 20]),
        helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape"),
    ]
    graph = assert_matches_onnxruntime(make_model(nodes, (4, 5), opset=opset), random_input(rng, (4, 5)))
    assert ops_of(graph) == ["Reshape"]


def test_small_cnn_with_every_converter():
    """Conv-BN-Relu-MaxPool, a residual Add, AveragePool, GlobalAveragePool, Flatten, Gemm and
    Softmax in one model, imported, folded and run against onnxruntime."""
    rng = np.random.default_rng(25)
    initializers = [
        random_initializer(rng, "w1", (6, 3, 3, 3), 0.3), random_initializer(rng, "b1", (6,)),
        random_initializer(rng, "w2", (6, 6, 3, 3), 0.2),
        random_initializer(rng, "fc_w", (10, 6), 0.5), random_initializer(rng, "fc_b", (10,)),
    ] + _batchnorm_initializers(rng, "bn1", 6) + _batchnorm_initializers(rng, "bn2", 6)
    nodes = [
        conv_node(["x", "w1", "b1"], "c1", (3, 3), pads=(1, 1, 1, 1), name="conv1"),
        _batchnorm_node("c1", "n1", "bn1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        _pool_node("MaxPool", (2, 2), (2, 2), source="r1", output="pool_in"),
        conv_node(["pool_in", "w2"], "c2", (3, 3), pads=(1, 1, 1, 1), name="conv2"),
        _batchnorm_node("c2", "n2", "bn2"),
        helper.make_node("Add", ["n2", "pool_in"], ["sum"], name="residual"),
        helper.make_node("Relu", ["sum"], ["r2"], name="relu2"),
        helper.make_node("AveragePool", ["r2"], ["avg"], name="avgpool", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["avg"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
        helper.make_node("Softmax", ["logits"], ["y"], name="softmax"),
    ]
    model = make_model(nodes, (3, 12, 12), opset=17, initializers=initializers)
    x = random_input(rng, (3, 12, 12))
    graph = assert_matches_onnxruntime(model, x)
    folded = fold_batchnorm(graph)
    assert "ChannelAffine" not in ops_of(folded)
    assert_graph_matches(folded, onnxruntime_outputs(model, x), x)


def test_unnamed_nodes_are_imported():
    """Node names are optional in ONNX; the importer names them after their op type."""
    rng = np.random.default_rng(26)
    nodes = [conv_node(["x", "w"], "conv_out", (3, 3), pads=(1, 1, 1, 1), name=""),
             helper.make_node("Relu", ["conv_out"], ["y"])]
    model = make_model(nodes, (3, 5, 5), initializers=[random_initializer(rng, "w", (4, 3, 3, 3), 0.3)])
    graph = assert_matches_onnxruntime(model, random_input(rng, (3, 5, 5)))
    assert ops_of(graph) == ["Conv", "Relu"]
    assert len({node.name for node in graph.nodes}) == 2 and all(node.name for node in graph.nodes)


def test_generated_node_names_do_not_collide_with_existing_ones():
    rng = np.random.default_rng(27)
    nodes = [helper.make_node("Relu", ["x"], ["hidden"]), helper.make_node("Relu", ["hidden"], ["y"], name="Relu_1")]
    model = make_model(nodes, (4,))
    graph = assert_matches_onnxruntime(model, random_input(rng, (4,)))
    assert len({node.name for node in graph.nodes}) == 2


def test_import_leaves_the_model_unchanged():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], (4,))
    serialized = model.SerializeToString()
    import_onnx(model)
    assert model.SerializeToString() == serialized


# ---- errors ---------------------------------------------------------------------------------

def _conversion_error(model):
    with pytest.raises(ConversionError) as error:
        import_onnx(model)
    return str(error.value)


def test_unsupported_op_names_node_op_and_what_is_supported():
    model = make_model([helper.make_node("Hardmax", ["x"], ["y"], name="my_hardmax")], (4,))
    message = _conversion_error(model)
    assert "'my_hardmax'" in message and "Hardmax" in message and "supported" in message
    assert "Conv" in message and "Gemm" in message  # the list of what is supported


def test_unsupported_lstm_names_node_op_and_what_is_supported():
    rng = np.random.default_rng(26)
    hidden, features = 3, 4
    node = helper.make_node("LSTM", ["x", "W", "R"], ["y"], name="encoder_lstm", hidden_size=hidden)
    model = make_model([node], (2, features), initializers=[
        random_initializer(rng, "W", (1, 4 * hidden, features)), random_initializer(rng, "R", (1, 4 * hidden, hidden))])
    message = _conversion_error(model)
    assert "'encoder_lstm'" in message and "LSTM" in message and "supported" in message


def test_non_constant_conv_weight():
    node = conv_node(["x", "w"], "y", (3, 3), name="conv_with_input_weight")
    model = make_model([node], (3, 6, 6), extra_inputs=[("w", (4, 3, 3, 3))])
    message = _conversion_error(model)
    assert "'conv_with_input_weight'" in message and "Conv" in message and "weight" in message
    assert "constant" in message


def test_reshape_that_fixes_the_batch_size():
    node = helper.make_node("Reshape", ["x", "shape"], ["y"], name="fixed_batch_reshape")
    model = make_model([node], (3, 4), initializers=[int64_initializer("shape", [3, 12])])
    message = _conversion_error(model)
    assert "'fixed_batch_reshape'" in message and "Reshape" in message and "batch" in message


def test_reshape_that_merges_the_batch_into_rows():
    """[N, 3, 4] -> [-1, 4] is [3N, 4] in ONNX: the batch does not survive, so it is refused."""
    node = helper.make_node("Reshape", ["x", "shape"], ["y"], name="merging_reshape")
    model = make_model([node], (3, 4), initializers=[int64_initializer("shape", [-1, 4])])
    message = _conversion_error(model)
    assert "'merging_reshape'" in message and "Reshape" in message and "[4]" in message


def test_unsupported_opset():
    model = make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], (4,), opset=6)
    message = _conversion_error(model)
    assert "opset 6" in message and "supported" in message and "7..21" in message


def test_graph_input_with_a_dynamic_non_batch_dimension():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["image"], ["y"], name="relu")], "test",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "height", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, "height", 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    graph = import_onnx(model, example_shapes={"image": [None, 3, 5, 8]})
    assert graph.inputs[0].shape == (None, 3, 5, 8)
    assert graph.inputs[0].symbols == (None, None, "height", None)
    fixed = import_onnx(model, input_shapes={"image": [None, None, 6, None]})
    assert fixed.inputs[0].shape == (None, 3, 6, 8) and fixed.inputs[0].symbols is None


def test_custom_domain_op():
    node = helper.make_node("FancyActivation", ["x"], ["y"], name="vendor_op", domain="com.example")
    model = make_model([node], (4,), opset_imports=[helper.make_opsetid("com.example", 1)],
                       output_shapes={"y": ["N", 4]})
    message = _conversion_error(model)
    assert "'vendor_op'" in message and "com.example::FancyActivation" in message and "supported" in message


def test_dropout_mask_output_is_refused():
    node = helper.make_node("Dropout", ["x"], ["y", "mask"], name="dropout_with_mask")
    model = make_model([node], (4,))
    message = _conversion_error(model)
    assert "'dropout_with_mask'" in message and "Dropout" in message and "mask" in message
