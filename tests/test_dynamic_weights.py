"""Per-sample dynamic convolution weights: the DynamicConv op and converters/dynamic_weights.py.

The PyTorch modules write the ODConv/CondConv idiom: attention from the input, weights =
W * attention per sample, the batch folded into the channels of one grouped conv (groups = B*g).
Exported at batch EXAMPLE_BATCH, they must run at other batch sizes; attention per output or input
channel must become a constant-weight Conv (binarizable), spatial or full attention a DynamicConv.
"""
import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from models import PA_OPS, assert_engine_matches_reference_per_op
from onnx import TensorProto, helper
from tolerances import FLOAT32_RTOL, assert_close
from torch import nn

from pabnn.converters import convert
from pabnn.converters.dynamic_weights import (
    DYNAMIC_WEIGHTS_DOMAIN, exportable_run_time_conv_weights, factor_dynamic_weights,
)
from pabnn.converters.onnx_import import import_onnx
from pabnn.converters.torch_export import export_to_onnx
from pabnn.engine import ConversionError, GraphError, Session, load, run_reference
from pabnn.engine.graph import Graph, Node, TensorInfo
from pabnn.engine.ops import get_op

IMAGE_SHAPE = (3, 10, 9)
EXAMPLE_BATCH = 2
RUN_BATCHES = (1, 5)
CALIBRATION_BATCH = 48
# PA(8, 8) against the float module, relative RMS error of the logits. Each binarized layer
# quantizes its weights and input to 9-level staircases (a Lloyd-Max 9-level quantizer of a
# Gaussian keeps a relative RMS error of about 15% per tensor before the output regression of
# calibration); about 1.5% is observed here. 0.05 still fails for a wrong tap, channel or sample.
PA_8_8_RELATIVE_RMS = 0.05


# ---- the op: kernel against reference ----------------------------------------------------------

def _dynamic_conv(in_channels, out_channels, group, kernel, strides=(1, 1), pads=(0, 0, 0, 0),
                  dilations=(1, 1), bias=None):
    params = {} if bias is None else {"bias": np.asarray(bias, np.float32)}
    return Node("DynamicConv", "dynamic", ["x", "w"], ["y"],
                {"strides": list(strides), "pads": list(pads), "dilations": list(dilations), "group": group}, params)


def _check_kernel(node, x, weights):
    """Kernel == reference within FLOAT32_RTOL, and each sample == Conv with that sample's weights."""
    op = get_op("DynamicConv")
    (shape,) = op.infer_shapes(node, [(None,) + x.shape[1:], (None,) + weights.shape[1:]])
    (fast,) = op.make_kernel(node)([x.astype(np.float32), weights.astype(np.float32)])
    (reference,) = op.reference(node, [x.astype(np.float64), weights.astype(np.float64)])
    assert fast.dtype == np.float32 and fast.shape == reference.shape == (x.shape[0],) + shape[1:]
    assert_close(fast, reference, FLOAT32_RTOL, "DynamicConv kernel vs reference")
    bias = node.params.get("bias", np.zeros(weights.shape[1], np.float32))
    for sample in range(x.shape[0]):
        conv = Node("Conv", "conv", ["x"], ["y"], dict(node.attrs),
                    {"weight": weights[sample].astype(np.float32), "bias": bias})
        (expected,) = get_op("Conv").reference(conv, [x[sample:sample + 1].astype(np.float64)])
        assert_close(reference[sample:sample + 1], expected, FLOAT32_RTOL, f"sample {sample} vs Conv")
    return fast


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("in_channels,out_channels,group", [(3, 5, 1), (4, 6, 2), (6, 6, 6), (65, 7, 1)])
@pytest.mark.parametrize("kernel,strides,pads,dilations", [
    ((1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),
    ((3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
    ((3, 3), (1, 1), (2, 2, 2, 2), (2, 2)),
    ((5, 5), (1, 2), (0, 2, 1, 2), (1, 1)),
])
def test_dynamic_conv_kernel_matches_reference(batch, in_channels, out_channels, group, kernel, strides, pads,
                                               dilations):
    rng = np.random.default_rng(in_channels * 10 + batch)
    bias = rng.normal(size=out_channels) if kernel[0] != 1 else None
    node = _dynamic_conv(in_channels, out_channels, group, kernel, strides, pads, dilations, bias)
    x = rng.normal(size=(batch, in_channels, 8, 7))
    weights = rng.normal(size=(batch, out_channels, in_channels // group) + kernel)
    _check_kernel(node, x, weights)


def test_dynamic_conv_uses_each_samples_own_weights():
    """One-hot input, sample b's 3x3 weights 2**(9b + tap): each output names the sample and tap."""
    batch = 3
    weights = (2.0 ** np.arange(9 * batch)).reshape(batch, 1, 1, 3, 3)
    x = np.zeros((batch, 1, 4, 4))
    x[:, 0, 1, 2] = 1.0
    y = _check_kernel(_dynamic_conv(1, 1, 1, (3, 3), pads=(1, 1, 1, 1)), x, weights)
    for sample in range(batch):
        for oy in range(4):
            for ox in range(4):
                ky, kx = 1 - oy + 1, 2 - ox + 1
                expected = 2.0 ** (9 * sample + 3 * ky + kx) if 0 <= ky < 3 and 0 <= kx < 3 else 0.0
                assert y[sample, 0, oy, ox] == expected


def test_dynamic_conv_shape_rule_and_cost():
    op = get_op("DynamicConv")
    node = _dynamic_conv(4, 6, 2, (3, 3), strides=(2, 2), pads=(1, 1, 1, 1), bias=np.zeros(6))
    (shape,) = op.infer_shapes(node, [(None, 4, 9, 8), (None, 6, 2, 3, 3)])
    assert shape == (None, 6, 5, 4)
    cost = op.cost(node, [(None, 4, 9, 8), (None, 6, 2, 3, 3)], [shape])
    assert cost.flops == 2 * 6 * 5 * 4 * 2 * 3 * 3 + 6 * 5 * 4 and cost.bops == 0 and cost.float32_params == 6


@pytest.mark.parametrize("weight_shape,message", [
    ((None, 6, 4, 3, 3), "weight input"),  # C/group must be 2 for group 2
    ((None, 5, 2, 3, 3), "group must divide"),
    ((None, 6, 2, 3), "rank 5"),
])
def test_dynamic_conv_rejects_mismatched_weights(weight_shape, message):
    with pytest.raises(GraphError, match=message):
        get_op("DynamicConv").infer_shapes(_dynamic_conv(4, 6, 2, (3, 3)), [(None, 4, 9, 8), weight_shape])


def test_dynamic_conv_rejects_weights_of_another_batch():
    node = _dynamic_conv(2, 3, 1, (3, 3))
    x, weights = np.zeros((2, 2, 5, 5), np.float32), np.zeros((3, 3, 2, 3, 3), np.float32)
    with pytest.raises(GraphError, match="one weight set per sample"):
        get_op("DynamicConv").make_kernel(node)([x, weights])


# ---- the factorization pass on hand-made graphs -----------------------------------------------

def _modulated_graph(attention_shape, group, bias):
    """x [B, 4, 6, 6], attention a [B, *attention_shape], weights W * a -> DynamicConv."""
    rng = np.random.default_rng(7)
    weight = rng.normal(size=(6, 4 // group, 3, 3)).astype(np.float32)
    params = {} if bias is None else {"bias": rng.normal(size=6).astype(np.float32)}
    nodes = [
        Node("Mul", "modulate", ["a"], ["w"], {"constant_first": 1}, {"constant": weight[None]}),
        Node("DynamicConv", "dynamic", ["x", "w"], ["y"],
             {"strides": [1, 1], "pads": [1, 0, 1, 2], "dilations": [1, 1], "group": group}, params),
    ]
    inputs = [TensorInfo("x", (None, 4, 6, 6)), TensorInfo("a", (None,) + attention_shape)]
    return Graph(inputs, ["y"], nodes)


@pytest.mark.parametrize("bias", [None, True])
@pytest.mark.parametrize("attention_shape,group,factored", [
    ((6, 1, 1, 1), 1, True), ((6, 1, 1, 1), 2, True), ((1, 1, 1, 1), 1, True),
    ((1, 4, 1, 1), 1, True), ((1, 2, 1, 1), 2, True),
    ((1, 1, 3, 3), 1, False), ((6, 4, 1, 1), 1, False),
])
def test_factor_dynamic_weights_computes_the_same(attention_shape, group, factored, bias):
    graph = _modulated_graph(attention_shape, group, bias)
    factored_graph = factor_dynamic_weights(graph)
    ops = [node.op for node in factored_graph.nodes]
    assert ("DynamicConv" not in ops and "Conv" in ops) == factored
    assert factored or factored_graph is graph
    rng = np.random.default_rng(3)
    feeds = {"x": rng.normal(size=(3, 4, 6, 6)), "a": rng.uniform(0.1, 1.0, size=(3,) + attention_shape)}
    expected = run_reference(graph, feeds)["y"]
    assert_close(run_reference(factored_graph, feeds)["y"], expected, 1e-12, "factored vs dynamic (float64)")
    assert_engine_matches_reference_per_op(factored_graph, feeds)
    if factored:
        conv = next(node for node in factored_graph.nodes if node.op == "Conv")
        assert conv.name == "dynamic" and conv.params["weight"].shape == (6, 4 // group, 3, 3)


# ---- PyTorch modules with the batch-folding idiom ----------------------------------------------

class ModulatedConvNet(nn.Module):
    """Stem conv, then a dynamic 3x3 conv whose weights are W * sigmoid(fc(mean(x))) shaped per
    `attention` ("output", "input", "spatial", "full"), grouped by `groups`, then a classifier."""

    def __init__(self, attention, groups=1, stride=1, channels=8, out_channels=10, kernel=3):
        super().__init__()
        self.attention, self.groups, self.stride, self.kernel = attention, groups, stride, kernel
        self.out_channels = out_channels
        self.stem = nn.Conv2d(IMAGE_SHAPE[0], channels, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(out_channels, channels // groups, kernel, kernel) * 0.3)
        sizes = {"output": out_channels, "input": channels // groups, "spatial": kernel * kernel,
                 "full": out_channels * channels // groups * kernel * kernel}
        self.fc = nn.Linear(channels, sizes[attention])
        self.head = nn.Linear(out_channels, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        b, c, h, w = x.shape
        k, g = self.kernel, self.groups
        shapes = {"output": (b, self.out_channels, 1, 1, 1), "input": (b, 1, c // g, 1, 1),
                  "spatial": (b, 1, 1, k, k), "full": (b, self.out_channels, c // g, k, k)}
        attention = torch.sigmoid(self.fc(x.mean((2, 3)))).reshape(shapes[self.attention])
        weight = self.weight.unsqueeze(0) * attention
        out = F.conv2d(x.reshape(1, b * c, h, w), weight.reshape(-1, c // g, k, k), padding=1, stride=self.stride,
                       groups=b * g)
        out = out.reshape(b, -1, out.shape[-2], out.shape[-1])
        return self.head(torch.relu(out).mean((2, 3)))


FACTORED = ("output", "input")


def _module_and_data(attention, groups=1, stride=1, seed=0):
    torch.manual_seed(seed)
    module = ModulatedConvNet(attention, groups, stride).eval()
    data = torch.randn(CALIBRATION_BATCH + max(RUN_BATCHES), *IMAGE_SHAPE)
    return module, data


def _torch_output(module, x):
    with torch.no_grad():
        return module(torch.as_tensor(x)).numpy()


def _check_float_conversion(graph, module, data):
    for batch in RUN_BATCHES:
        x = data[-batch:].numpy()
        (y,) = Session(graph).run(None, {"input": x})
        assert_close(y, _torch_output(module, x), FLOAT32_RTOL, f"engine vs torch at batch {batch}")
    assert_engine_matches_reference_per_op(graph, {"input": data[-3:].numpy()})


@pytest.mark.parametrize("attention", ["output", "input", "spatial", "full"])
@pytest.mark.parametrize("groups,stride", [(1, 1), (2, 2)])
def test_float_conversion_equals_torch_at_other_batch_sizes(attention, groups, stride):
    module, data = _module_and_data(attention, groups, stride)
    graph = convert(module, example_input=data[:EXAMPLE_BATCH], calibration=data[:8].numpy(), binarize=[]).graph
    ops = [node.op for node in graph.nodes]
    if attention in FACTORED:
        assert "DynamicConv" not in ops and ops.count("Conv") == 2
    else:
        assert ops.count("DynamicConv") == 1 and ops.count("Conv") == 1
        assert next(node for node in graph.nodes if node.op == "DynamicConv").attrs["group"] == groups
    _check_float_conversion(graph, module, data)


class CondConvNet(nn.Module):
    """CondConv: per-sample weights = routing [B, E] @ experts [E, O*C*k*k], with the batch folded
    by x.view(1, -1, h, w) and weights.view(-1, C, k, k) (sizes from module attributes)."""

    def __init__(self, experts=3, channels=8, out_channels=6, kernel=3):
        super().__init__()
        self.channels, self.kernel = channels, kernel
        self.stem = nn.Conv2d(IMAGE_SHAPE[0], channels, 3, padding=1)
        self.experts = nn.Parameter(torch.randn(experts, out_channels * channels * kernel * kernel) * 0.2)
        self.routing = nn.Linear(channels, experts)
        self.head = nn.Linear(out_channels, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        b, _, h, w = x.shape
        weights = torch.softmax(self.routing(x.mean((2, 3))), dim=1) @ self.experts
        out = F.conv2d(x.view(1, -1, h, w), weights.view(-1, self.channels, self.kernel, self.kernel), padding=1,
                       groups=b)
        out = out.view(b, -1, out.shape[-2], out.shape[-1])
        return self.head(torch.relu(out).mean((2, 3)))


def test_condconv_weights_from_a_matmul_convert():
    torch.manual_seed(1)
    module = CondConvNet().eval()
    data = torch.randn(CALIBRATION_BATCH + max(RUN_BATCHES), *IMAGE_SHAPE)
    graph = convert(module, example_input=data[:EXAMPLE_BATCH], calibration=data[:8].numpy(), binarize=[]).graph
    assert [node.op for node in graph.nodes].count("DynamicConv") == 1
    _check_float_conversion(graph, module, data)


@pytest.mark.parametrize("attention", ["output", "full"])
def test_onnx_file_exported_from_the_module_converts(attention, tmp_path):
    module, data = _module_and_data(attention, groups=2)
    with exportable_run_time_conv_weights():
        proto = export_to_onnx(module, data[:EXAMPLE_BATCH])
    path = tmp_path / "modulated.onnx"
    onnx.save(proto, str(path))
    assert any(node.op_type == "Conv" and node.input[1] not in {i.name for i in proto.graph.initializer}
               for node in proto.graph.node)
    graph = convert(str(path), calibration=data[:8].numpy(), binarize=[]).graph
    _check_float_conversion(graph, module, data)


@pytest.mark.parametrize("attention", FACTORED)
def test_pa_conversion_binarizes_the_factored_conv(attention):
    module, data = _module_and_data(attention, groups=2)
    model = convert(module, example_input=data[:EXAMPLE_BATCH], calibration=data[:CALIBRATION_BATCH].numpy(),
                    weight_bases=8, act_bases=8, min_fan_in=1)
    float_conv = next(node.name for node in model.float_graph.nodes if node.op == "Conv" and node.name != "/stem/Conv")
    assert float_conv in model.graph.metadata["converter"]["binarized"]
    assert next(node for node in model.graph.nodes if node.name == float_conv).op == "PAConv"
    test = data[CALIBRATION_BATCH:].numpy()
    values = assert_engine_matches_reference_per_op(model.graph, {"input": test})
    expected = _torch_output(module, test)
    error = np.linalg.norm(values[model.graph.outputs[0]] - expected) / np.linalg.norm(expected)
    assert error < PA_8_8_RELATIVE_RMS, f"PA(8,8) relative RMS error {error:.3g}"
    assert any(node.op in PA_OPS for node in model.graph.nodes)


def test_dynamic_conv_model_saves_and_loads(tmp_path):
    module, data = _module_and_data("spatial")
    model = convert(module, example_input=data[:EXAMPLE_BATCH], calibration=data[:8].numpy(), binarize=[])
    path = tmp_path / "dynamic.pab"
    model.save(path)
    loaded = load(path)
    x = data[-3:].numpy()
    assert "DynamicConv" in [node.op for node in loaded.graph.nodes]
    np.testing.assert_array_equal(loaded.run(None, {"input": x})[0], Session(model.graph).run(None, {"input": x})[0])


# ---- what is not the pattern fails clearly ----------------------------------------------------

def _onnx_model(nodes, initializers=()):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, 6, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", [x], [y], list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_conv_with_run_time_weight_outside_the_pattern_is_refused():
    """Conv(x, Relu(x)): the weight is computed at run time but not by a batch-folding Reshape."""
    model = _onnx_model([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                         helper.make_node("Conv", ["x", "r"], ["y"], name="conv")])
    with pytest.raises(ConversionError, match=r"'conv' \(Conv\): the weight must be a constant, or .*Relu node 'relu'"):
        import_onnx(model)


def test_batch_folded_conv_whose_output_is_not_reshaped_is_refused():
    shape_x = onnx.numpy_helper.from_array(np.array([1, -1, 6, 6], np.int64), "shape_x")
    shape_w = onnx.numpy_helper.from_array(np.array([-1, 2, 1, 1], np.int64), "shape_w")
    model = _onnx_model([helper.make_node("Reshape", ["x", "shape_x"], ["folded"], name="fold_x"),
                         helper.make_node("Relu", ["x"], ["w5"], name="weights"),
                         helper.make_node("Reshape", ["w5", "shape_w"], ["w"], name="fold_w"),
                         helper.make_node("Conv", ["folded", "w"], ["c"], name="conv", group=2),
                         helper.make_node("Relu", ["c"], ["y"], name="after")], [shape_x, shape_w])
    with pytest.raises(ConversionError, match=r"'conv' \(Conv\).*read by Relu 'after'"):
        import_onnx(model)


def test_reserved_domain_in_an_input_model_is_refused():
    model = _onnx_model([helper.make_node("DynamicConv", ["x", "x"], ["y"], name="own", domain=DYNAMIC_WEIGHTS_DOMAIN)])
    with pytest.raises(ConversionError, match="reserved"):
        import_onnx(model)
