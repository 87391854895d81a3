"""Quantizers that are already few-level (converters/onnx_ops_quantize.py) imported exactly.

QuantizeLinear [-> Clip] -> DequantizeLinear (QDQ / QCDQ) and QONNX BipolarQuant on activations
become exact Staircases; on weights they fold into float constants. Each model is built with
onnx.helper and run by onnxruntime (BipolarQuant, which onnxruntime does not know, by an
equivalent standard model) and by pabnn: a quantizer alone must agree bit for bit on values at
and next to every threshold; a network must agree within FLOAT32_RTOL (only float sums round)
with its binary layers imported as PAConv/PALinear with M = 1, and the engine must equal the
reference executor.
"""
import numpy as np
import onnx
import onnxruntime
import pytest
from models import assert_engine_matches_reference_per_op
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from test_binary_import import binary_weight
from tolerances import FLOAT32_RTOL, assert_close

from pabnn.converters import convert, import_onnx
from pabnn.converters.onnx_ops_quantize import MAX_LEVELS, integer_thresholds, quantize_to_integer
from pabnn.engine import ConversionError, Session, load, run_reference

CHANNELS = 4
INPUT_SHAPE = (CHANNELS, 6, 7)
BATCH = 2
QONNX = "qonnx.custom_op.general"
FINN = "finn.custom_op.general"


# ---- building and running models ----------------------------------------------------------------

def build_model(nodes, initializers, opset, input_shape=INPUT_SHAPE, output_shape=None, custom_domains=(),
                check=True):
    """A model with input "x" [N, *input_shape] and output "y" (shape inferred unless given).
    check: run ONNX's strict shape inference and full check (impossible with custom-domain ops)."""
    graph = helper.make_graph(nodes, "test", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                            ["N", *input_shape])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)],
                              list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)] +
                              [helper.make_opsetid(domain, 1) for domain in custom_domains])
    model.ir_version = 10 if opset >= 21 else 9
    if check:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        onnx.checker.check_model(model, full_check=True)
    return model


def onnxruntime_output(model, x, optimized=True):
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    if not optimized:  # onnxruntime's QDQ fusions must not be what the comparison relies on
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def integer_constant(name, dtype, value):
    """A scalar initializer of ONNX integer type `dtype` (TensorProto enum; int4 included)."""
    return helper.make_tensor(name, dtype, [], [int(value)])


def float_constant(name, value):
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def qdq_nodes(source, output, clip=False, prefix=""):
    """QuantizeLinear(source, s, zp) [-> Clip(lo, hi)] -> DequantizeLinear(., ds, dzp) -> output."""
    nodes = [helper.make_node("QuantizeLinear", [source, prefix + "s", prefix + "zp"], [prefix + "q"],
                              name=prefix + "quantize")]
    integer = prefix + "q"
    if clip:
        nodes.append(helper.make_node("Clip", [integer, prefix + "lo", prefix + "hi"], [prefix + "qc"],
                                      name=prefix + "clip"))
        integer = prefix + "qc"
    nodes.append(helper.make_node("DequantizeLinear", [integer, prefix + "ds", prefix + "dzp"], [output],
                                  name=prefix + "dequantize"))
    return nodes


def qdq_initializers(dtype, scale, zero_point, clip=None, dequantize_scale=None, dequantize_zero_point=None,
                     prefix=""):
    initializers = [float_constant(prefix + "s", scale), integer_constant(prefix + "zp", dtype, zero_point),
                    float_constant(prefix + "ds", scale if dequantize_scale is None else dequantize_scale),
                    integer_constant(prefix + "dzp", dtype,
                                     zero_point if dequantize_zero_point is None else dequantize_zero_point)]
    if clip is not None:
        initializers += [integer_constant(prefix + "lo", dtype, clip[0]),
                         integer_constant(prefix + "hi", dtype, clip[1])]
    return initializers


def boundary_values(thresholds):
    """Each threshold, the float32 just below and above it, and 0, -0, tiny, large and infinite values, NaN."""
    thresholds = np.asarray(thresholds, np.float32).reshape(-1)
    specials = np.array([0.0, -0.0, 1e-45, -1e-45, 1e-30, -1e-30, 3e38, -3e38, np.inf, -np.inf, np.nan, 1.0, -1.0],
                        np.float32)
    return np.concatenate([thresholds, np.nextafter(thresholds, np.float32(-np.inf)),
                           np.nextafter(thresholds, np.float32(np.inf)), specials])


def as_input(values, channels=CHANNELS, batch=BATCH):
    """Every value in every channel: float32 [batch, channels, 1, k] (batch 2: the values reversed)."""
    values = np.asarray(values, np.float32)
    rows = [np.broadcast_to(values, (channels, values.size)), np.broadcast_to(values[::-1], (channels, values.size))]
    return np.ascontiguousarray(np.stack(rows[:batch])[:, :, None, :])


def convert_and_compare(model, x, expected_ops, reference_model=None):
    """convert(model); pabnn equals onnxruntime on reference_model (default: model) within
    FLOAT32_RTOL, the whole graph equals the reference executor, each kernel its reference; the
    nodes named in expected_ops have those ops. Also saved and loaded back."""
    calibration = np.where(np.isfinite(x), x, 0.0).astype(np.float32)
    converted = convert(model, calibration=calibration, weight_bases=2, act_bases=2)
    ops = {node.name: node for node in converted.graph.nodes}
    for name, op in expected_ops.items():
        assert ops[name].op == op, f"{name}: {ops[name].op} != {op}"
        if op in ("PAConv", "PALinear"):
            assert ops[name].params["weight_planes"].shape[0] == 1, f"{name}: M != 1"
    expected = onnxruntime_output(reference_model or model, x)
    (actual,) = Session(converted.graph).run(None, {"x": x})
    assert_close(actual, expected, FLOAT32_RTOL, "pabnn vs onnxruntime")
    reference = run_reference(converted.graph, {"x": x})[converted.graph.outputs[0]]
    assert_close(reference, actual, FLOAT32_RTOL, "reference executor vs pabnn")
    assert_engine_matches_reference_per_op(converted.graph, {"x": x})
    return converted, actual


# ---- the threshold search -------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [0.1, 0.37, 1 / 3, 0.7, 2.0, 1e-3, 1e-40])
def test_integer_thresholds_are_the_first_float_of_each_level(scale):
    scale = np.array([scale], np.float32)
    zero_point = np.array([1], np.int64)
    thresholds = integer_thresholds(scale, zero_point, -2, 3)
    assert thresholds.shape == (5, 1) and np.all(np.isfinite(thresholds))
    for level, threshold in zip(range(-1, 4), thresholds[:, 0]):
        assert quantize_to_integer(threshold, scale, zero_point, -2, 3)[0] == level
        below = np.nextafter(threshold, np.float32(-np.inf))
        assert quantize_to_integer(below, scale, zero_point, -2, 3)[0] == level - 1


# ---- QuantizeLinear [-> Clip] -> DequantizeLinear alone: bit-exact at every threshold ---------------

# (opset, integer type, scale, zero point, clip or None, dequantize scale, dequantize zero point)
QDQ_CASES = [
    (12, TensorProto.INT8, 0.37, 0, (-1, 1), None, None),  # ternary QCDQ
    (13, TensorProto.INT8, 0.1, 0, (-1, 0), None, None),  # binary {-s, 0}
    (13, TensorProto.UINT8, 1 / 3, 0, (0, 1), None, None),  # binary {0, s}
    (13, TensorProto.UINT8, 0.7, 128, (127, 129), 0.25, 128),  # a zero point; another dequantize scale
    (17, TensorProto.INT8, 2.0, 3, (2, 5), 0.5, 4),  # four levels, dequantize zero point differs
    (19, TensorProto.INT8, 1e-3, -2, (-3, -1), None, None),
    (21, TensorProto.INT4, 0.3, 0, None, None, None),  # 16 levels: the limit is inclusive
    (21, TensorProto.UINT4, 0.45, 8, None, None, None),  # (Clip takes no 4-bit types)
    (21, TensorProto.INT16, 0.05, 0, (-2, 1), None, None),  # onnxruntime has no Clip of 16-bit integers
    (21, TensorProto.UINT16, 0.2, 1, (0, 3), None, None),
]
SIXTEEN_BITS = (TensorProto.INT16, TensorProto.UINT16)


@pytest.mark.parametrize("case", QDQ_CASES, ids=lambda case: f"opset{case[0]}-{TensorProto.DataType.Name(case[1])}")
def test_qdq_quantizer_equals_onnxruntime_at_and_next_to_every_threshold(case):
    """The Staircase equals onnxruntime bit for bit on each threshold and its float32 neighbours,
    on 0, -0, subnormals, +-3e38, +-inf, and on NaN (onnxruntime quantizes NaN to the type's lowest
    integer, i.e. the lowest level; the Staircase gives NaN its lowest level). onnxruntime cannot
    Clip 16-bit integers: those chains are compared with ONNX's reference evaluator on values
    below 1e6 (it casts x / scale to int32 before saturating, undefined for NaN, inf and huge values)."""
    opset, dtype, scale, zero_point, clip, dequantize_scale, dequantize_zero_point = case

    def model_of_width(width):
        return build_model(qdq_nodes("x", "y", clip=clip is not None),
                           qdq_initializers(dtype, scale, zero_point, clip, dequantize_scale, dequantize_zero_point),
                           opset, input_shape=(CHANNELS, 1, width), output_shape=["N", CHANNELS, 1, width])

    (node,) = import_onnx(model_of_width(1)).nodes
    assert node.op == "Staircase"
    levels = node.params["steps"].shape[0] + 1
    assert levels == (clip[1] - clip[0] + 1 if clip else MAX_LEVELS)
    x = as_input(boundary_values(node.params["thresholds"]))
    model = model_of_width(x.shape[-1])
    graph = import_onnx(model)
    (actual,) = Session(graph).run(None, {"x": x})
    if dtype in SIXTEEN_BITS:
        moderate = np.abs(x) < 1e6
        (expected,) = ReferenceEvaluator(model).run(None, {"x": np.where(moderate, x, 0).astype(np.float32)})
        np.testing.assert_array_equal(actual[moderate], expected[moderate])
    else:
        for optimized in (False, True):
            np.testing.assert_array_equal(actual, onnxruntime_output(model, x, optimized))
    np.testing.assert_array_equal(run_reference(graph, {"x": x})["y"], actual)
    assert np.all(actual[np.isnan(x)] == node.params["lowest"][0])


def test_per_channel_quantize_scale_gives_per_channel_thresholds():
    """QuantizeLinear with one scale and zero point per channel (axis 1), DequantizeLinear per tensor."""
    scales = np.array([0.1, 0.37, 1.5, 2e-3], np.float32)
    zero_points = np.array([0, 1, -1, 0], np.int8)
    initializers = [numpy_helper.from_array(scales, "s"), numpy_helper.from_array(zero_points, "zp"),
                    float_constant("ds", 0.5), integer_constant("dzp", TensorProto.INT8, 0),
                    integer_constant("lo", TensorProto.INT8, -1), integer_constant("hi", TensorProto.INT8, 1)]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="quantize", axis=1),
             helper.make_node("Clip", ["q", "lo", "hi"], ["qc"], name="clip"),
             helper.make_node("DequantizeLinear", ["qc", "ds", "dzp"], ["y"], name="dequantize")]
    thresholds = import_onnx(build_model(nodes, initializers, 13)).nodes[0].params["thresholds"]
    assert len(np.unique(thresholds[0])) == CHANNELS
    x = as_input(boundary_values(thresholds))
    model = build_model(nodes, initializers, 13, input_shape=x.shape[1:], output_shape=["N", *x.shape[1:]])
    (actual,) = Session(import_onnx(model)).run(None, {"x": x})
    np.testing.assert_array_equal(actual, onnxruntime_output(model, x, optimized=False))


# ---- QDQ on activations before a binary conv -------------------------------------------------------

def conv_initializers(rng, out_channels, in_channels, group=1, zero_channel=None):
    return [numpy_helper.from_array(binary_weight(rng, (out_channels, in_channels // group, 3, 3), zero_channel), "w"),
            numpy_helper.from_array(rng.standard_normal(out_channels).astype(np.float32), "b")]


def network_input(rng, thresholds=None, nan=True):
    """Normal inputs [BATCH, *INPUT_SHAPE] with zeros, -0, NaN (unless not `nan`: ONNX Sign keeps
    NaN, which no staircase can) and, in one row, the thresholds and the floats just below them."""
    x = rng.standard_normal((BATCH, *INPUT_SHAPE)).astype(np.float32)
    x.reshape(-1)[::7] = 0.0
    x.reshape(-1)[3::11] = -0.0
    if nan:
        x.reshape(-1)[5::29] = np.nan
    if thresholds is not None:
        row = np.resize(np.asarray(thresholds, np.float32).reshape(-1), INPUT_SHAPE[2])
        x[:, :, 2, :] = row
        x[:, :, 3, :] = np.nextafter(row, np.float32(-np.inf))
    return x


@pytest.mark.parametrize("pads", [(1, 1, 1, 1), (0, 0, 0, 0), (0, 2, 1, 0)])
@pytest.mark.parametrize("quantizer", [
    (13, TensorProto.INT8, 0.37, 0, (-1, 1)),  # ternary, Qa(0) = 0
    (13, TensorProto.UINT8, 0.3, 0, (0, 1)),  # binary {0, s}
    (17, TensorProto.INT8, 0.5, 1, (0, 2)),  # zero point 1: levels {-s, 0, s}
    (13, TensorProto.INT8, 0.25, -1, (-1, 0)),  # binary {0, s}: levels of q - zp = 0, 1
    (21, TensorProto.INT4, 0.3, 0, None),  # 16 levels
], ids=["ternary-int8", "binary-uint8", "zero-point", "binary-offset", "int4"])
def test_qdq_then_conv_is_imported_exactly(quantizer, pads):
    """QuantizeLinear -> Clip -> DequantizeLinear -> Conv (+-alpha weights, one channel all zero):
    a PAConv with M = 1, the Staircase folded into it; zero padding after the quantizer."""
    opset, dtype, scale, zero_point, clip = quantizer
    rng = np.random.default_rng(1)
    nodes = qdq_nodes("x", "d", clip=clip is not None) + [helper.make_node("Conv", ["d", "w", "b"], ["y"], name="conv",
                                                               kernel_shape=[3, 3], pads=list(pads))]
    model = build_model(nodes, qdq_initializers(dtype, scale, zero_point, clip) +
                        conv_initializers(rng, 5, CHANNELS, zero_channel=2), opset)
    thresholds = import_onnx(model).nodes[0].params["thresholds"]
    converted, _ = convert_and_compare(model, network_input(rng, thresholds), {"conv": "PAConv"})
    (node,) = converted.graph.nodes
    assert node.inputs == ["x"]
    assert node.params["act_steps"].shape == ((clip[1] - clip[0]) if clip else MAX_LEVELS - 1,)
    assert node.attrs["padding_rule"] == ("zero_after_quantizer" if any(pads) else "zero_before_quantizer")


def test_qdq_network_with_gemm_saves_and_loads(tmp_path):
    """QDQ -> Conv (stride 2) -> BatchNorm-free QDQ -> GlobalAveragePool -> Flatten -> QDQ -> Gemm:
    two PAConv-free float parts and two binary layers; the .pab file runs the same."""
    rng = np.random.default_rng(2)
    nodes = (qdq_nodes("x", "d0", clip=True, prefix="a_") +
             [helper.make_node("Conv", ["d0", "w", "b"], ["c0"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                               strides=[2, 2]),
              helper.make_node("GlobalAveragePool", ["c0"], ["gp"], name="gap"),
              helper.make_node("Flatten", ["gp"], ["f"], name="flatten")] +
             qdq_nodes("f", "d1", clip=True, prefix="b_") +
             [helper.make_node("Gemm", ["d1", "g", "gb"], ["y"], name="fc", transB=1)])
    initializers = (qdq_initializers(TensorProto.INT8, 0.37, 0, (-1, 1), prefix="a_") +
                    conv_initializers(rng, 6, CHANNELS) +
                    qdq_initializers(TensorProto.UINT8, 0.05, 0, (0, 1), prefix="b_") +
                    [numpy_helper.from_array(binary_weight(rng, (3, 6)), "g"),
                     numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "gb")])
    model = build_model(nodes, initializers, 13)
    x = network_input(rng)
    converted, actual = convert_and_compare(model, x, {"conv": "PAConv", "fc": "PALinear"})
    assert not any(node.op == "Staircase" for node in converted.graph.nodes)
    path = tmp_path / "qdq.pab"
    converted.save(path)
    np.testing.assert_array_equal(load(path).run(None, {"x": x})[0], actual)


# ---- quantized weights: folded into float constants ---------------------------------------------------

def sign_then_conv(weight_nodes, weight_initializers, opset=13, group=1):
    nodes = [helper.make_node("Sign", ["x"], ["s"], name="sign"), *weight_nodes,
             helper.make_node("Conv", ["s", "w", "b"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                              group=group)]
    return build_model(nodes, [*weight_initializers, float_constant("b", [0.5, -0.25, 0.0, 1.0, 2.0])], opset)


@pytest.mark.parametrize("opset", [13, 21])
def test_int8_weights_with_per_channel_dequantize_become_a_binary_layer(opset):
    """int8 weights of +-1 (and +-127) times a per-output-channel scale (DequantizeLinear axis 0)."""
    rng = np.random.default_rng(3)
    signs = np.where(rng.random((5, CHANNELS, 3, 3)) < 0.5, -1, 1).astype(np.int8)
    signs[1] *= 127
    scales = np.array([0.5, 0.01, 1.25, 0.3, 2.0], np.float32)
    model = sign_then_conv([helper.make_node("DequantizeLinear", ["w_int", "w_scale", "w_zero"], ["w"],
                                             name="weight_dequantize", axis=0)],
                           [numpy_helper.from_array(signs, "w_int"), numpy_helper.from_array(scales, "w_scale"),
                            numpy_helper.from_array(np.zeros(5, np.int8), "w_zero")], opset)
    converted, _ = convert_and_compare(model, network_input(rng, nan=False), {"conv": "PAConv"})
    alpha = converted.graph.nodes[0].params["weight_scales"][0]
    np.testing.assert_array_equal(alpha, scales * np.array([1, 127, 1, 1, 1], np.float32))


def test_float_weights_through_quantize_and_dequantize_become_a_binary_layer():
    """float weights -> QuantizeLinear (per tensor) -> Clip(-1, 1) -> DequantizeLinear: +-s and 0."""
    rng = np.random.default_rng(4)
    weight = np.where(rng.random((5, CHANNELS, 3, 3)) < 0.5, -0.8, 0.9).astype(np.float32)
    model = sign_then_conv(qdq_nodes("w_float", "w", clip=True, prefix="w_"),
                           [numpy_helper.from_array(weight, "w_float"),
                            *qdq_initializers(TensorProto.INT8, 0.4, 0, (-1, 1), prefix="w_")])
    converted, _ = convert_and_compare(model, network_input(rng, nan=False), {"conv": "PAConv"})
    np.testing.assert_array_equal(converted.graph.nodes[0].params["weight_scales"], np.full((1, 5), 0.4, np.float32))


# ---- QONNX BipolarQuant ------------------------------------------------------------------------------

def bipolar_quant(source, scale_name, output, domain):
    return helper.make_node("BipolarQuant", [source, scale_name], [output], name=f"bipolar_{output}", domain=domain)


def bipolar_equivalent(source, scale_name, output):
    """Standard ONNX for BipolarQuant: Where(x >= 0, scale, -scale) (opset 12+)."""
    return [helper.make_node("GreaterOrEqual", [source, "zero"], [output + "_ge"], name=f"ge_{output}"),
            helper.make_node("Neg", [scale_name], [output + "_neg"], name=f"neg_{output}"),
            helper.make_node("Where", [output + "_ge", scale_name, output + "_neg"], [output], name=f"where_{output}")]


@pytest.mark.parametrize("domain", [QONNX, FINN])
@pytest.mark.parametrize("pads", [(1, 1, 1, 1), (0, 0, 0, 0)])
def test_bipolar_quant_on_activations_and_weights_becomes_a_binary_layer(domain, pads):
    """BipolarQuant(x, 0.75) -> Conv whose weight is BipolarQuant(W, per-channel scale): a PAConv
    with M = 1; compared with onnxruntime on the same network written with Where (NaN -> -scale)."""
    rng = np.random.default_rng(5)
    latent = rng.standard_normal((5, CHANNELS, 3, 3)).astype(np.float32)
    weight_scale = rng.uniform(0.1, 2.0, (5, 1, 1, 1)).astype(np.float32)
    initializers = [numpy_helper.from_array(latent, "latent"), numpy_helper.from_array(weight_scale, "ws"),
                    float_constant("as", 0.75), float_constant("zero", 0.0),
                    numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "b")]
    conv = helper.make_node("Conv", ["a", "w", "b"], ["y"], name="conv", kernel_shape=[3, 3], pads=list(pads))
    model = build_model([bipolar_quant("x", "as", "a", domain), bipolar_quant("latent", "ws", "w", domain), conv],
                        initializers, 13, output_shape=["N", 5, 6 - 2 + sum(pads[::2]), 7 - 2 + sum(pads[1::2])],
                        custom_domains=[domain], check=False)
    equivalent = build_model(bipolar_equivalent("x", "as", "a") + bipolar_equivalent("latent", "ws", "w") + [conv],
                             initializers, 13)
    converted, _ = convert_and_compare(model, network_input(rng, [0.0]), {"conv": "PAConv"}, equivalent)
    (node,) = converted.graph.nodes
    np.testing.assert_array_equal(node.params["weight_scales"][0], weight_scale.reshape(-1))
    assert node.params["act_lowest"].tolist() == [-0.75] and node.params["act_steps"].tolist() == [1.5]


def test_bipolar_quant_of_nan_and_zeros_matches_its_definition():
    """y = scale * (x >= 0 ? +1 : -1): -0 and 0 give +scale, NaN gives -scale."""
    x = as_input(np.array([0.0, -0.0, -1e-45, 1e-45, np.nan, np.inf, -np.inf, -2.0], np.float32))
    model = build_model([bipolar_quant("x", "scale", "y", QONNX)], [float_constant("scale", 0.5)], 13,
                        input_shape=(CHANNELS, 1, 8), output_shape=["N", CHANNELS, 1, 8], custom_domains=[QONNX],
                        check=False)
    (actual,) = Session(import_onnx(model)).run(None, {"x": x})
    expected = np.where(x >= 0, np.float32(1), np.float32(-1)) * np.float32(0.5)
    np.testing.assert_array_equal(actual, expected)
    assert actual[0, 0, 0, :5].tolist() == [0.5, 0.5, -0.5, 0.5, -0.5]


# ---- grouped and depthwise convs that are already binary ------------------------------------------

@pytest.mark.parametrize("group,out_channels", [(2, 6), (4, 4), (4, 8)], ids=["group2", "depthwise", "depthwise-x2"])
@pytest.mark.parametrize("pads", [(1, 1, 1, 1), (0, 0, 0, 0)])
@pytest.mark.parametrize("quantizer", ["sign", "qdq"])
def test_grouped_and_depthwise_binary_convs_are_imported_exactly(group, out_channels, pads, quantizer):
    rng = np.random.default_rng(6)
    if quantizer == "sign":
        nodes, initializers = [helper.make_node("Sign", ["x"], ["a"], name="sign")], []
    else:
        nodes = qdq_nodes("x", "a", clip=True)
        initializers = qdq_initializers(TensorProto.INT8, 0.37, 0, (-1, 1))
    nodes.append(helper.make_node("Conv", ["a", "w", "b"], ["y"], name="conv", kernel_shape=[3, 3], pads=list(pads),
                                  group=group))
    model = build_model(nodes, initializers + conv_initializers(rng, out_channels, CHANNELS, group, zero_channel=1),
                        13)
    converted, _ = convert_and_compare(model, network_input(rng, nan=quantizer == "qdq"), {"conv": "PAConv"})
    (node,) = converted.graph.nodes
    assert node.attrs["group"] == group and node.attrs["in_channels"] == CHANNELS


# ---- clear errors ------------------------------------------------------------------------------------

def test_quantizer_of_too_many_levels_is_refused():
    model = build_model(qdq_nodes("x", "y"), qdq_initializers(TensorProto.INT8, 0.1, 0), 13,
                        output_shape=["N", *INPUT_SHAPE])
    with pytest.raises(ConversionError, match=r"'dequantize'.*QuantizeLinear 'quantize' takes 256 levels.*"
                                              rf"only quantizers of at most {MAX_LEVELS} levels"):
        import_onnx(model)
    wide = build_model(qdq_nodes("x", "y", clip=True), qdq_initializers(TensorProto.INT8, 0.1, 0, (-8, 8)), 13,
                       output_shape=["N", *INPUT_SHAPE])
    with pytest.raises(ConversionError, match="takes 17 levels"):
        import_onnx(wide)


def test_quantized_integer_read_by_another_op_is_refused():
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="quantize"),
             helper.make_node("Cast", ["q"], ["y"], name="cast", to=TensorProto.FLOAT)]
    model = build_model(nodes, [float_constant("s", 0.1), integer_constant("zp", TensorProto.INT8, 0)], 13,
                        output_shape=["N", *INPUT_SHAPE])
    with pytest.raises(ConversionError, match="'cast'.*integer output of QuantizeLinear 'quantize'.*Clip or "
                                              "DequantizeLinear"):
        import_onnx(model)


def test_quantized_integer_as_graph_output_is_refused():
    graph = helper.make_graph([helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["y"], name="quantize")], "test",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *INPUT_SHAPE])],
                              [helper.make_tensor_value_info("y", TensorProto.INT8, ["N", *INPUT_SHAPE])],
                              [float_constant("s", 0.1), integer_constant("zp", TensorProto.INT8, 0)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model, full_check=True)
    with pytest.raises(ConversionError, match="graph output 'y' is the integer output of QuantizeLinear 'quantize'"):
        import_onnx(model)


def test_per_channel_dequantize_of_activations_is_refused():
    initializers = qdq_initializers(TensorProto.INT8, 0.1, 0, (-1, 1))
    initializers[2] = numpy_helper.from_array(np.array([0.1, 0.2, 0.3, 0.4], np.float32), "ds")
    initializers[3] = numpy_helper.from_array(np.zeros(4, np.int8), "dzp")
    nodes = qdq_nodes("x", "y", clip=True)
    nodes[-1].attribute.extend([helper.make_attribute("axis", 1)])
    model = build_model(nodes, initializers, 13, output_shape=["N", *INPUT_SHAPE])
    with pytest.raises(ConversionError, match="'dequantize'.*must be scalars"):
        import_onnx(model)


def test_bipolar_quant_with_a_per_channel_scale_on_activations_is_refused():
    scale = numpy_helper.from_array(np.ones((1, CHANNELS, 1, 1), np.float32), "scale")
    model = build_model([bipolar_quant("x", "scale", "y", QONNX)], [scale], 13, output_shape=["N", *INPUT_SHAPE],
                        custom_domains=[QONNX], check=False)
    with pytest.raises(ConversionError, match=r"'bipolar_y'.*only a scalar scale.*\[1, 4, 1, 1\]"):
        import_onnx(model)


def test_bipolar_quant_with_wrong_inputs_or_attributes_is_refused():
    node = helper.make_node("BipolarQuant", ["x"], ["y"], name="bipolar", domain=QONNX)
    model = build_model([node], [], 13, output_shape=["N", *INPUT_SHAPE], custom_domains=[QONNX], check=False)
    with pytest.raises(ConversionError, match=r"'bipolar'.*expects inputs \(X, scale\)"):
        import_onnx(model)
    node = helper.make_node("BipolarQuant", ["x", "scale"], ["y"], name="bipolar", domain=QONNX, narrow=1)
    model = build_model([node], [float_constant("scale", 1.0)], 13, output_shape=["N", *INPUT_SHAPE],
                        custom_domains=[QONNX], check=False)
    with pytest.raises(ConversionError, match="'bipolar'.*has no attributes, found \\['narrow'\\]"):
        import_onnx(model)


@pytest.mark.parametrize("domain,op_type,message", [
    (QONNX, "Quant", f"op {QONNX}::Quant \\(opset 1\\) is not supported"),
    ("com.example", "BipolarQuant", "op com.example::BipolarQuant is not supported \\(only the default ONNX domain"),
])
def test_unsupported_custom_domain_ops_are_refused(domain, op_type, message):
    node = helper.make_node(op_type, ["x", "scale"], ["y"], name="custom", domain=domain)
    model = build_model([node], [float_constant("scale", 1.0)], 13, output_shape=["N", *INPUT_SHAPE],
                        custom_domains=[domain], check=False)
    with pytest.raises(ConversionError, match="'custom'.*" + message):
        import_onnx(model)
