"""Already binary networks (converters/binary_import.py): imported exactly as PA(1, N) layers.

Each model is built with onnx.helper (or exported from torch), run by onnxruntime (or torch)
and by pabnn after `convert` with the default layer policy; outputs must agree within
FLOAT32_RTOL (only float sums round), and every node's kernel must equal its reference.
"""
import numpy as np
import onnxruntime
import pytest
import torch
from onnx import helper, numpy_helper
from models import assert_engine_matches_reference_per_op
from test_onnx_import import make_model
from tolerances import FLOAT32_RTOL, assert_close

from pabnn.converters import convert
from pabnn.converters.binary_import import import_binary_layers, input_for_level, plus_minus_alpha
from pabnn.engine import ConversionError, Session
from pabnn.engine.graph import Node

INPUT_SHAPE = (4, 7, 6)
BATCH = 3


def binary_weight(rng, shape, zero_channel=None):
    """+-alpha[o] per output channel (alpha > 0), optionally one channel of zeros."""
    alpha = rng.uniform(0.1, 2.0, size=(shape[0],) + (1,) * (len(shape) - 1))
    weight = (alpha * np.where(rng.random(shape) < 0.5, -1.0, 1.0)).astype(np.float32)
    if zero_channel is not None:
        weight[zero_channel] = 0.0
    return weight


def inputs_with_zeros(rng, shape=INPUT_SHAPE, batch=BATCH):
    """Normal inputs with exact zeros, negative zeros and tiny values (Sign(0) = 0 matters)."""
    x = rng.standard_normal((batch, *shape)).astype(np.float32)
    x.reshape(-1)[::7] = 0.0
    x.reshape(-1)[3::11] = -0.0
    x.reshape(-1)[5::13] = np.float32(1e-40)
    return x


def onnxruntime_outputs(model, x):
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def convert_and_compare(model, x, expected_ops):
    """convert(model) with the default policy; pabnn equals onnxruntime within FLOAT32_RTOL, the
    kernels equal their references, and the nodes named in expected_ops have those ops."""
    converted = convert(model, calibration=np.where(np.isfinite(x), x, 0.0), weight_bases=2, act_bases=2)
    ops = {node.name: node for node in converted.graph.nodes}
    for name, op in expected_ops.items():
        assert ops[name].op == op, f"{name}: {ops[name].op} != {op}"
    (expected,) = onnxruntime_outputs(model, x)
    (actual,) = Session(converted.graph).run(None, {"x": x})
    assert_close(actual, expected, FLOAT32_RTOL, "pabnn vs onnxruntime")
    assert_engine_matches_reference_per_op(converted.graph, {"x": x})
    return converted, actual, expected


def conv_node(name, source, weight_name, output, pads=(1, 1, 1, 1), **attrs):
    return helper.make_node("Conv", [source, weight_name, weight_name + "_bias"], [output], name=name,
                            kernel_shape=[3, 3], pads=list(pads), **attrs)


def conv_initializers(rng, weight_name, out_channels, in_channels, zero_channel=None):
    return [numpy_helper.from_array(binary_weight(rng, (out_channels, in_channels, 3, 3), zero_channel), weight_name),
            numpy_helper.from_array(rng.standard_normal(out_channels).astype(np.float32), weight_name + "_bias")]


# ---- Sign -> Conv ---------------------------------------------------------------------------------

@pytest.mark.parametrize("pads,strides", [((1, 1, 1, 1), (1, 1)), ((0, 2, 1, 0), (2, 1)), ((0, 0, 0, 0), (1, 1))])
def test_sign_then_conv_is_imported_exactly(pads, strides):
    """Sign(x) -> Conv with +-alpha weights (one channel all zero): a PAConv with M = 1 and N = 2
    (levels -1, 0, +1: Sign(0) = 0), zero padding after the quantizer; the only layer, so also
    the first and last."""
    rng = np.random.default_rng(1)
    model = make_model([helper.make_node("Sign", ["x"], ["s"], name="sign"),
                        conv_node("conv", "s", "w", "y", pads, strides=list(strides))],
                       INPUT_SHAPE, initializers=conv_initializers(rng, "w", 5, 4, zero_channel=2))
    converted, _, _ = convert_and_compare(model, inputs_with_zeros(rng), {"conv": "PAConv"})
    (node,) = converted.graph.nodes
    assert node.inputs == ["x"]
    assert node.params["weight_planes"].shape[0] == 1 and node.params["act_steps"].shape == (2,)
    assert node.attrs["padding_rule"] == ("zero_after_quantizer" if any(pads) else "zero_before_quantizer")
    assert converted.fits == [] and converted.graph.metadata["converter"]["imported_binary"] == ["conv"]


def test_sign_of_zero_and_negative_zero_is_zero():
    """A 1x1 conv with weight +1 outputs Sign(x) itself: 0 for +0 and -0, -1/+1 otherwise, and +-1
    for the smallest subnormals."""
    tiny = np.nextafter(np.float32(0), np.float32(1))
    values = np.array([0.0, -0.0, tiny, -tiny, 1e-30, -3.0, 2.5, np.inf, -np.inf], np.float32)
    x = values.reshape(1, 1, 1, -1)
    model = make_model([helper.make_node("Sign", ["x"], ["s"], name="sign"),
                        helper.make_node("Conv", ["s", "w"], ["y"], name="conv", kernel_shape=[1, 1])],
                       (1, 1, len(values)), initializers=[numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32),
                                                                                  "w")])
    _, actual, expected = convert_and_compare(model, x, {"conv": "PAConv"})
    np.testing.assert_array_equal(actual.ravel(), [0, 0, 1, -1, 1, -1, 1, 1, -1])
    np.testing.assert_array_equal(actual, expected)


def binary_network(rng, pad_value=None):
    """float Conv -> Relu -> BatchNorm -> Sign [-> Pad(pad_value)] -> binary Conv -> BatchNorm -> Sign
    -> binary Conv (stride 2) -> GlobalAveragePool -> Flatten -> Sign -> binary Gemm (the last layer)."""
    channels = INPUT_SHAPE[0]

    def batchnorm(prefix, count):
        return [numpy_helper.from_array(v.astype(np.float32), f"{prefix}_{k}") for k, v in (
            ("scale", rng.uniform(0.5, 1.5, count)), ("bias", 0.3 * rng.standard_normal(count)),
            ("mean", 0.3 * rng.standard_normal(count)), ("var", rng.uniform(0.5, 1.5, count)))]

    bn = ["scale", "bias", "mean", "var"]
    initializers = [numpy_helper.from_array(rng.standard_normal((8, channels, 3, 3)).astype(np.float32), "w0"),
                    *conv_initializers(rng, "w1", 8, 8), *conv_initializers(rng, "w2", 6, 8),
                    numpy_helper.from_array(binary_weight(rng, (5, 6)), "g"), *batchnorm("bn0", 8),
                    *batchnorm("bn1", 8)]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
             helper.make_node("BatchNormalization", ["r0"] + [f"bn0_{k}" for k in bn], ["n0"], name="bn0"),
             helper.make_node("Sign", ["n0"], ["s0"], name="sign0")]
    if pad_value is None:
        nodes.append(conv_node("conv1", "s0", "w1", "c1"))
    else:
        initializers += [numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
                         numpy_helper.from_array(np.array(pad_value, np.float32), "pad_value")]
        nodes += [helper.make_node("Pad", ["s0", "pads", "pad_value"], ["p0"], name="pad", mode="constant"),
                  conv_node("conv1", "p0", "w1", "c1", pads=(0, 0, 0, 0))]
    nodes += [helper.make_node("BatchNormalization", ["c1"] + [f"bn1_{k}" for k in bn], ["n1"], name="bn1"),
              helper.make_node("Sign", ["n1"], ["s1"], name="sign1"),
              conv_node("conv2", "s1", "w2", "c2", strides=[2, 2]),
              helper.make_node("GlobalAveragePool", ["c2"], ["gp"], name="gap"),
              helper.make_node("Flatten", ["gp"], ["f"], name="flatten"),
              helper.make_node("Sign", ["f"], ["s2"], name="sign2"),
              helper.make_node("Gemm", ["s2", "g"], ["y"], name="fc", transB=1)]
    return make_model(nodes, INPUT_SHAPE, initializers=initializers)


@pytest.mark.parametrize("pad_value", [None, -1.0, 1.0, 0.0])
def test_binary_network_with_batchnorm_and_explicit_pad_matches_onnxruntime(pad_value):
    """BatchNorm after a binary conv folds into it (still +-alpha per channel); an explicit
    Pad(-1, +1 or 0) of the Sign output becomes padding_rule value_before_quantizer."""
    rng = np.random.default_rng(2)
    model = binary_network(rng, pad_value)
    x = inputs_with_zeros(rng)
    converted, _, _ = convert_and_compare(model, x, {"conv0": "Conv", "conv1": "PAConv", "conv2": "PAConv",
                                                     "fc": "PALinear"})
    nodes = {node.name: node for node in converted.graph.nodes}
    assert not any(node.op in ("Staircase", "Pad") for node in converted.graph.nodes)
    if pad_value is None:
        assert nodes["conv1"].attrs["padding_rule"] == "zero_after_quantizer"
    else:
        assert nodes["conv1"].attrs["padding_rule"] == "value_before_quantizer"
        assert np.sign(nodes["conv1"].attrs["pad_value"]) == pad_value  # Sign(pad_value) is the pad level
        assert nodes["conv1"].attrs["pads"] == [1, 1, 1, 1]


def test_weights_that_are_not_plus_minus_alpha_stay_float():
    rng = np.random.default_rng(3)
    weight = binary_weight(rng, (5, 4, 3, 3))
    weight[1, 0, 0, 0] *= 0.5
    model = make_model([helper.make_node("Sign", ["x"], ["s"], name="sign"), conv_node("conv", "s", "w", "y")],
                       INPUT_SHAPE, initializers=[numpy_helper.from_array(weight, "w"),
                                                  numpy_helper.from_array(np.zeros(5, np.float32), "w_bias")])
    convert_and_compare(model, inputs_with_zeros(rng), {"conv": "Conv", "sign": "Staircase"})


def test_keep_float_keeps_an_already_binary_layer_float():
    rng = np.random.default_rng(4)
    model = make_model([helper.make_node("Sign", ["x"], ["s"], name="sign"), conv_node("conv", "s", "w", "y")],
                       INPUT_SHAPE, initializers=conv_initializers(rng, "w", 5, 4))
    converted = convert(model, calibration=inputs_with_zeros(rng), keep_float=["conv"])
    assert [node.op for node in converted.graph.nodes] == ["Staircase", "Conv"]


def test_plus_minus_alpha_and_input_for_level():
    assert plus_minus_alpha(np.array([[1.5, -1.5], [0.0, 0.0]], np.float32)).tolist() == [1.5, 0.0]
    assert plus_minus_alpha(np.array([[1.5, -1.5], [0.0, 1.0]], np.float32)) is None
    staircase = Node("Staircase", "s", ["x"], ["y"], {}, {
        "thresholds": np.array([[0.0, 1.0], [2.0, 3.0]], np.float32), "steps": np.array([1.0, 1.0], np.float32),
        "lowest": np.array([-1.0], np.float32)})
    assert input_for_level(staircase, -1.0) < 0.0
    assert 1.0 <= input_for_level(staircase, 0.0) < 2.0  # level 0 in both channels
    assert input_for_level(staircase, 1.0) >= 3.0
    assert input_for_level(staircase, 0.5) is None


def test_graph_without_binary_layers_is_returned_unchanged():
    rng = np.random.default_rng(5)
    model = make_model([conv_node("conv", "x", "w", "y")], INPUT_SHAPE,
                       initializers=conv_initializers(rng, "w", 5, 4))
    from pabnn.converters import import_onnx
    graph = import_onnx(model)
    assert import_binary_layers(graph) is graph


# ---- torch: a custom sign function, exported ---------------------------------------------------------

class SignSTE(torch.autograd.Function):
    """sign(x) forward (torch.sign: sign(0) = 0), straight-through backward; exports as ONNX Sign."""

    @staticmethod
    def forward(ctx, x):
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad):
        return grad

    @staticmethod
    def symbolic(g, x):
        return g.op("Sign", x)


class BinaryConv(torch.nn.Conv2d):
    """A conv of the signs of its input, whose weight is frozen to alpha[o] * sign(W[o]) with
    alpha the mean |W[o]| (XNOR-Net, as deployed: the binarized weight is the stored constant)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        with torch.no_grad():
            self.weight.copy_(self.weight.abs().mean(dim=(1, 2, 3), keepdim=True) * torch.sign(self.weight))

    def forward(self, x):
        return self._conv_forward(SignSTE.apply(x), self.weight, self.bias)


class TorchBinaryNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(INPUT_SHAPE[0], 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.binary1 = BinaryConv(8, 8, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.binary2 = BinaryConv(8, 6, 3, padding=1, stride=2)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        x = self.bn(self.stem(x))
        x = self.bn1(self.binary1(x)) + x
        x = self.binary2(x).mean(dim=(2, 3))
        return self.head(x)


def test_torch_binary_network_with_a_custom_sign_matches_torch():
    torch.manual_seed(0)
    module = TorchBinaryNet()
    x = inputs_with_zeros(np.random.default_rng(6))
    module.train()
    with torch.no_grad():  # a few steps of BatchNorm statistics
        for _ in range(3):
            module(torch.from_numpy(np.random.default_rng(7).standard_normal((16, *INPUT_SHAPE)).astype(np.float32)))
    module.eval()
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    converted = convert(module, example_input=torch.from_numpy(x), calibration=x)
    ops = [node.op for node in converted.graph.nodes]
    assert ops.count("PAConv") == 2 and "Staircase" not in ops, ops
    (actual,) = Session(converted.graph).run(None, {next(iter(converted.graph.inputs)).name: x})
    assert_close(actual, expected, FLOAT32_RTOL, "pabnn vs torch")
    assert_engine_matches_reference_per_op(converted.graph, {converted.graph.inputs[0].name: x})


# ---- two-level quantizers: Where(comparison, a, b) ------------------------------------------------

COMPARISONS = [("Greater", False), ("GreaterOrEqual", False), ("Less", False), ("LessOrEqual", False),
               ("Greater", True), ("LessOrEqual", True)]


@pytest.mark.parametrize("comparison,constant_first", COMPARISONS, ids=lambda v: str(v))
@pytest.mark.parametrize("levels", [(1.0, -1.0), (0.75, -0.25)], ids=lambda v: f"levels{v}")
def test_where_comparison_then_padded_conv_is_imported_exactly(comparison, constant_first, levels):
    """Where(x op t, a, b) with per-channel t -> Conv with zero pads: zero_after_quantizer, whose
    edge correction matters here (the quantizer maps 0 to a or b, never to 0). Inputs include
    values exactly on the thresholds."""
    rng = np.random.default_rng(9)
    thresholds = np.array([-0.5, 0.0, 0.25, 1.0], np.float32).reshape(1, 4, 1, 1)
    operands = ["t", "x"] if constant_first else ["x", "t"]
    model = make_model([helper.make_node(comparison, operands, ["condition"], name="compare"),
                        helper.make_node("Where", ["condition", "a", "b"], ["q"], name="where"),
                        conv_node("conv", "q", "w", "y", pads=(1, 2, 0, 1))],
                       INPUT_SHAPE, initializers=[numpy_helper.from_array(thresholds, "t"),
                                                  numpy_helper.from_array(np.array(levels[0], np.float32), "a"),
                                                  numpy_helper.from_array(np.array(levels[1], np.float32), "b"),
                                                  *conv_initializers(rng, "w", 5, 4, zero_channel=0)])
    x = inputs_with_zeros(rng)
    x[:, :, 2, :] = thresholds[:, :, 0, :]  # ties
    converted, _, _ = convert_and_compare(model, x, {"conv": "PAConv"})
    (node,) = converted.graph.nodes
    assert node.attrs["padding_rule"] == "zero_after_quantizer" and node.params["act_steps"].shape == (1,)


@pytest.mark.parametrize("pad_value", [1.0, -1.0])
def test_where_then_explicit_pad_is_value_before_quantizer(pad_value):
    rng = np.random.default_rng(10)
    model = make_model([helper.make_node("Greater", ["x", "t"], ["condition"], name="compare"),
                        helper.make_node("Where", ["condition", "a", "b"], ["q"], name="where"),
                        helper.make_node("Pad", ["q", "pads", "v"], ["p"], name="pad", mode="constant"),
                        conv_node("conv", "p", "w", "y", pads=(0, 0, 0, 0))],
                       INPUT_SHAPE, initializers=[
                           numpy_helper.from_array(np.array([0.3, -0.2, 0.0, 0.1], np.float32).reshape(4, 1, 1), "t"),
                           numpy_helper.from_array(np.array(1.0, np.float32), "a"),
                           numpy_helper.from_array(np.array(-1.0, np.float32), "b"),
                           numpy_helper.from_array(np.array([0, 0, 2, 1, 0, 0, 0, 1], np.int64), "pads"),
                           numpy_helper.from_array(np.array(pad_value, np.float32), "v"),
                           *conv_initializers(rng, "w", 3, 4)])
    converted, _, _ = convert_and_compare(model, inputs_with_zeros(rng), {"conv": "PAConv"})
    (node,) = converted.graph.nodes
    assert node.attrs["padding_rule"] == "value_before_quantizer" and node.attrs["pads"] == [2, 1, 0, 1]


def test_where_then_pad_with_a_value_that_is_no_level_stays_float():
    rng = np.random.default_rng(11)
    model = make_model([helper.make_node("Greater", ["x", "t"], ["condition"], name="compare"),
                        helper.make_node("Where", ["condition", "a", "b"], ["q"], name="where"),
                        helper.make_node("Pad", ["q", "pads", "v"], ["p"], name="pad", mode="constant"),
                        conv_node("conv", "p", "w", "y", pads=(0, 0, 0, 0))],
                       INPUT_SHAPE, initializers=[
                           numpy_helper.from_array(np.array(0.0, np.float32), "t"),
                           numpy_helper.from_array(np.array(1.0, np.float32), "a"),
                           numpy_helper.from_array(np.array(-1.0, np.float32), "b"),
                           numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
                           numpy_helper.from_array(np.array(0.0, np.float32), "v"),
                           *conv_initializers(rng, "w", 3, 4)])
    convert_and_compare(model, inputs_with_zeros(rng), {"conv": "Conv", "pad": "Pad", "where": "Staircase"})


def test_where_and_sign_before_matmul_are_imported_as_pa_linear():
    """Fan-ins are odd: a sum of an even number of +-alpha can be exactly 0, which pabnn computes
    exactly (integer popcounts times alpha) while onnxruntime's float32 sum may round it to
    +-1e-7, and the next Sign would then disagree by a whole level."""
    rng = np.random.default_rng(12)
    model = make_model([helper.make_node("Greater", ["x", "t"], ["condition"], name="compare"),
                        helper.make_node("Where", ["condition", "a", "b"], ["q"], name="where"),
                        helper.make_node("MatMul", ["q", "m"], ["h"], name="fc1"),
                        helper.make_node("Sign", ["h"], ["s"], name="sign"),
                        helper.make_node("MatMul", ["s", "m2"], ["y"], name="fc2")],
                       (9,), initializers=[
                           numpy_helper.from_array(rng.standard_normal(9).astype(np.float32), "t"),
                           numpy_helper.from_array(np.array(1.0, np.float32), "a"),
                           numpy_helper.from_array(np.array(-1.0, np.float32), "b"),
                           numpy_helper.from_array(binary_weight(rng, (7, 9)).T.copy(), "m"),
                           numpy_helper.from_array(binary_weight(rng, (3, 7)).T.copy(), "m2")])
    x = rng.standard_normal((5, 9)).astype(np.float32)
    convert_and_compare(model, x, {"fc1": "PALinear", "fc2": "PALinear"})


def test_comparison_read_by_anything_but_where_is_refused():
    model = make_model([helper.make_node("Greater", ["x", "t"], ["condition"], name="compare"),
                        helper.make_node("Cast", ["condition"], ["y"], name="cast", to=1)],
                       INPUT_SHAPE, initializers=[numpy_helper.from_array(np.array(0.0, np.float32), "t")])
    with pytest.raises(ConversionError, match="only supported as the condition of Where"):
        convert(model, calibration=np.zeros((1, *INPUT_SHAPE), np.float32))


def test_already_binary_layers_are_refused_by_fine_tuning():
    """Their padding rules and +-alpha weights have no latent float weights to train."""
    pytest.importorskip("torch")
    from pabnn.converters.torch import prepare

    rng = np.random.default_rng(4)
    with pytest.raises(ConversionError, match="'conv1'.*imported already binary"):
        prepare(binary_network(rng), calibration=inputs_with_zeros(rng), progress=False)
