"""`pabnn export` / converters.onnx_export: a .pab model as a standard-op float ONNX model.

Every exported model passes onnx.checker (full_check) and runs in onnxruntime. Two comparisons
with pabnn:
- node by node: each node exported alone and fed the float32 values pabnn itself computed for its
  inputs (its threshold comparisons then see identical values) equals pabnn within FLOAT32_RTOL;
- end to end: the whole model's outputs equal the Session's within FLOAT32_RTOL except on at
  most EXPORT_FLIPPED_SAMPLE_FRACTION of the samples (where float32 rounding moved an activation
  across a threshold, see tests/tolerances.py), and top-1 agrees on all but that fraction.
Models: the small model of tests/small_models.py, the architectures of tests/test_architectures.py
and the bundled digits_resnet.onnx, converted with the cheap "lloyd" calibration; then single PA
nodes for every padding rule, groups and geometries, every float op, and the errors.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from small_models import small_pa_graph
from test_architectures import ARCHITECTURES, _data, build
from test_pa_conv import random_pa_node
from tolerances import EXPORT_FLIPPED_SAMPLE_FRACTION, FLOAT32_RTOL, assert_close

from pabnn.converters import convert
from pabnn.converters.onnx_export import EXPORTERS, export_onnx
from pabnn.engine import ConversionError, FormatError, Graph, Node, Session, TensorInfo
from pabnn.engine.cli import main
from pabnn.engine.graph import run_graph, run_reference
from pabnn.engine.ops import get_op, registered_ops
from pabnn.engine.pab_format import save

DATA = Path(__file__).resolve().parent.parent / "examples" / "data"


def run_onnx(graph, feeds):
    """Export `graph`, check the ONNX model in full and run it in onnxruntime: {output name: array}."""
    proto = export_onnx(graph)
    onnx.checker.check_model(proto, full_check=True)
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    assert names == list(graph.outputs)
    return dict(zip(names, session.run(names, {name: np.asarray(v, np.float32) for name, v in feeds.items()})))


def single_node_graph(node, shapes):
    inputs = [TensorInfo(name, (None,) + tuple(shapes[name][1:])) for name in dict.fromkeys(node.inputs)]
    return Graph(inputs, list(node.outputs), [node])


def assert_nodes_match(graph, feeds):
    """Each node exported alone, fed pabnn's own float32 values of its inputs, equals pabnn's output.

    The nodes go into one ONNX model as separate components (one onnxruntime session): node n
    reads graph inputs "<tensor>@<n>" holding pabnn's values and writes outputs "<tensor>@<n>"."""
    values = run_graph(graph, {k: np.asarray(v, np.float32) for k, v in feeds.items()},
                       lambda node: get_op(node.op, node.name).make_kernel(node), keep="all")
    inputs, nodes, node_feeds, expected = [], [], {}, {}
    for node in graph.nodes:
        renamed = {name: f"{name}@{node.name}" for name in list(node.inputs) + list(node.outputs)}
        for name in dict.fromkeys(node.inputs):
            inputs.append(TensorInfo(renamed[name], (None,) + values[name].shape[1:]))
            node_feeds[renamed[name]] = values[name]
        for name in node.outputs:
            expected[renamed[name]] = (values[name], f"node {node.name!r} ({node.op}) output {name}")
        nodes.append(Node(node.op, node.name, [renamed[n] for n in node.inputs], [renamed[n] for n in node.outputs],
                          node.attrs, node.params))
    exported = run_onnx(Graph(inputs, list(expected), nodes), node_feeds)
    for name, (value, where) in expected.items():
        assert_close(exported[name], value, FLOAT32_RTOL, where)


def assert_model_matches(graph, x):
    """The whole exported model against a pabnn Session: see the module docstring."""
    name = graph.inputs[0].name
    (exported,) = run_onnx(graph, {name: x}).values()
    (expected,) = Session(graph).run(None, {name: x})
    scale = max(1.0, float(np.abs(expected).max()))
    off = np.abs(exported - expected).reshape(len(x), -1).max(axis=1) > FLOAT32_RTOL * scale
    allowed = int(EXPORT_FLIPPED_SAMPLE_FRACTION * len(x))
    assert off.sum() <= allowed, f"{off.sum()} of {len(x)} samples differ beyond FLOAT32_RTOL (allowed {allowed})"
    disagree = int((exported.argmax(axis=1) != expected.argmax(axis=1)).sum())
    assert disagree <= allowed, f"top-1 differs on {disagree} of {len(x)} samples (allowed {allowed})"


def test_every_engine_op_has_an_export_or_a_refusal():
    # plan-only ops (engine/plan.py) are never in a stored graph, so never exported
    assert set(EXPORTERS) == {op.name for op in registered_ops() if not op.plan_only}


# ---- whole models ------------------------------------------------------------------------------

def test_small_model():
    graph = small_pa_graph()
    assert {"PAConv", "PALinear", "ChannelAffine"} <= {node.op for node in graph.nodes}
    x = np.random.default_rng(5).standard_normal((64, 3, 8, 8)).astype(np.float32)
    assert_nodes_match(graph, {"x": x[:4]})
    assert_model_matches(graph, x)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architectures(name):
    calibration = _data(1, 8)
    # MobileNetV2 with binarized depthwise convs: grouped PAConv layers.
    converted = convert(build(name), example_input=calibration[:2], calibration=calibration.numpy(), weight_bases=2,
                        act_bases=3, method="lloyd", binarize_depthwise=name == "mobilenet-v2", min_fan_in=1)
    graph = converted.graph
    assert any(node.op == "PAConv" for node in graph.nodes)
    x = _data(2, 50).numpy()
    assert_nodes_match(graph, {graph.inputs[0].name: x[:2]})
    assert_model_matches(graph, x)


def test_digits_resnet_file_through_the_cli(tmp_path):
    with np.load(DATA / "digits_sample.npz") as sample:
        calibration, x = sample["calibration"][:32], sample["evaluation"][:256]
    graph = convert(str(DATA / "digits_resnet.onnx"), calibration=calibration, weight_bases=4, act_bases=5,
                    method="lloyd").graph
    save(graph, tmp_path / "model.pab")
    result = subprocess.run([sys.executable, "-m", "pabnn.engine.cli", "export", "model.pab", "-o", "model.onnx"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "wrote model.onnx" in result.stdout, result.stderr
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.pab"]  # no temporary file left
    onnx.checker.check_model(str(tmp_path / "model.onnx"), full_check=True)
    assert_nodes_match(graph, {graph.inputs[0].name: x[:4]})
    assert_model_matches(graph, x)


# ---- PA nodes: padding rules, groups, geometry, epilogue ----------------------------------------

PA_CASES = [
    # rule, pad_value, kernel, strides, pads, dilations, group
    ("zero_before_quantizer", None, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    ("zero_before_quantizer", None, (3, 1), (2, 1), (0, 1, 2, 0), (1, 1), 1),
    ("value_before_quantizer", -1.0, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1),
    ("value_before_quantizer", "threshold", (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 2),
    ("zero_after_quantizer", None, (3, 3), (1, 1), (1, 2, 1, 0), (1, 1), 1),
    ("zero_after_quantizer", None, (5, 5), (1, 1), (2, 2, 2, 2), (1, 1), 6),
    ("zero_before_quantizer", None, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 6),
]


@pytest.mark.parametrize("rule,pad_value,kernel,strides,pads,dilations,group", PA_CASES)
def test_pa_conv_padding_rules_and_geometry(rule, pad_value, kernel, strides, pads, dilations, group):
    rng = np.random.default_rng(len(rule) + group + kernel[1])
    node = random_pa_node(rng, 6, 6, kernel, 2, 3, strides, pads, dilations, padding_rule=rule, group=group)
    if pad_value == "threshold":  # a pad value exactly on a threshold: ties go up
        node.attrs["pad_value"] = float(node.params["act_thresholds"][0, 0])
    elif pad_value is not None:
        node.attrs["pad_value"] = pad_value
    x = rng.normal(size=(3, 6, 7, 6)).astype(np.float32)
    x[0, :, 2, :] = node.params["act_thresholds"][1][:, None]  # exactly on a threshold
    x[1, 0, 0, 0] = np.nan  # compares false: the lowest level
    (exported,) = run_onnx(single_node_graph(node, {"x": x.shape}), {"x": x}).values()
    (expected,) = get_op("PAConv").reference(node, [x.astype(np.float64)])
    assert_close(exported, expected, FLOAT32_RTOL, f"PAConv {rule} group {group}")


def test_pa_conv_with_residual_and_relu_and_pa_linear():
    rng = np.random.default_rng(3)
    conv = random_pa_node(rng, 4, 5, padding_rule="zero_after_quantizer")
    conv.inputs, conv.attrs["activation"] = ["x", "shortcut"], "relu"
    linear = random_pa_node(rng, 3, 4 * 6 * 6, (1, 1), op="PALinear")
    linear.name, linear.inputs, linear.outputs = "linear", ["f"], ["z"]
    graph = Graph([TensorInfo("x", (None, 5, 6, 6)), TensorInfo("shortcut", (None, 4, 6, 6))], ["z"],
                  [conv, Node("Flatten", "flatten", ["y"], ["f"]), linear])
    feeds = {"x": rng.normal(size=(2, 5, 6, 6)), "shortcut": rng.normal(size=(2, 4, 6, 6))}
    assert_close(run_onnx(graph, feeds)["z"], run_reference(graph, feeds)["z"], FLOAT32_RTOL, "PAConv + PALinear")


@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 4, 5)])
def test_staircase(shape):
    rng = np.random.default_rng(4)
    node = Node("Staircase", "staircase", ["x"], ["y"], params={
        "thresholds": np.sort(rng.normal(size=(3, 3)), axis=0).astype(np.float32),
        "steps": np.array([1.0, 0.5, 2.0], np.float32), "lowest": np.array([-1.0], np.float32)})
    feeds = {"x": rng.normal(size=shape)}
    graph = single_node_graph(node, {"x": (None,) + shape[1:]})
    assert_close(run_onnx(graph, feeds)["y"], run_reference(graph, feeds)["y"], FLOAT32_RTOL, "Staircase")


# ---- float ops ----------------------------------------------------------------------------------

X = (2, 3, 4, 5)


def _f32(rng, *shape):
    return rng.normal(size=shape).astype(np.float32)


def _float_cases():
    rng = np.random.default_rng(7)
    conv_params = {"weight": _f32(rng, 6, 1, 3, 3), "bias": _f32(rng, 6)}
    return {
        "Relu": ({}, {}), "Sigmoid": ({}, {}), "Tanh": ({}, {}), "HardSwish": ({}, {}), "GlobalAveragePool": ({}, {}),
        "Flatten": ({}, {}),
        "HardSigmoid": ({"alpha": 0.3, "beta": 0.4}, {}), "LeakyRelu": ({"alpha": 0.1}, {}),
        "Clip": ({"min": -0.5, "max": None}, {}), "Clip-max": ({"min": None, "max": 0.5}, {}),
        "PRelu": ({}, {"slope": _f32(rng, 3, 1, 1)}),
        "Softmax": ({"axis": 3}, {}), "LogSoftmax": ({"axis": 1}, {}),
        "Reshape": ({"shape": [-1, 4]}, {}), "Transpose": ({"perm": [0, 2, 3, 1]}, {}),
        "Concat": ({"axis": 2}, {}), "Split": ({"axis": 1, "split": [1, 2]}, {}),
        "Slice": ({"axes": [2, 3], "starts": [1, -1], "ends": [None, None], "steps": [1, -2]}, {}),
        "Slice-ends": ({"axes": [3], "starts": [4], "ends": [0], "steps": [-1]}, {}),
        "Pad": ({"pads": [0, 1, 2, 0, 2, 1], "mode": "constant", "value": 0.5}, {}),
        "Pad-reflect": ({"pads": [0, 1, 2, 0, 2, 1], "mode": "reflect"}, {}),
        "Pad-edge": ({"pads": [0, 1, 2, 0, 2, 1], "mode": "edge"}, {}),
        "Pad-wrap": ({"pads": [0, 1, 2, 0, 2, 1], "mode": "wrap"}, {}),
        "ReduceMean": ({"axes": [2, 3], "keepdims": 1}, {}), "ReduceSum": ({"axes": [1], "keepdims": 0}, {}),
        "ReduceMax": ({"axes": [3], "keepdims": 0}, {}),
        "Resize": ({"scales": [1.0, 2.0, 1.5], "coordinate_transformation_mode": "asymmetric",
                    "nearest_mode": "floor"}, {}),
        "Resize-sizes": ({"sizes": [3, 7, 9], "coordinate_transformation_mode": "half_pixel"}, {}),
        "MaxPool": ({"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, {}),
        "AveragePool": ({"kernel_shape": [3, 2], "strides": [1, 2], "pads": [1, 0, 1, 1], "count_include_pad": 0}, {}),
        "AveragePool-dilated": ({"kernel_shape": [2, 2], "pads": [1, 1, 1, 1], "dilations": [2, 2],
                                 "count_include_pad": 1}, {}),
        "Conv": ({"strides": [1, 2], "pads": [1, 1, 1, 1], "dilations": [1, 1], "group": 3, "activation": "relu"},
                 conv_params),
        "ConvTranspose": ({"strides": [2, 2], "pads": [1, 0, 1, 1], "output_padding": [1, 0], "group": 1},
                          {"weight": _f32(rng, 3, 2, 3, 3), "bias": _f32(rng, 2)}),
        "ChannelAffine": ({}, {"scale": _f32(rng, 3), "shift": _f32(rng, 3)}),
        "Mul": ({}, {"constant": _f32(rng, 4, 1)}), "Sub": ({"constant_first": 1}, {"constant": _f32(rng, 5)}),
        "Div": ({"constant_first": 1}, {"constant": np.abs(_f32(rng, 3, 1, 1)) + 1}),
        "MatMul": ({}, {"constant": _f32(rng, 5, 2)}),
        "MatMul-first": ({"constant_first": 1}, {"constant": _f32(rng, 2, 4)}),
        "LRN": ({"size": 3, "alpha": 0.01, "beta": 0.75, "bias": 1.5}, {}),
        "Add": ({}, {}), "Mul-tensors": ({}, {}),
    }


FLOAT_CASES = _float_cases()


@pytest.mark.parametrize("case", list(FLOAT_CASES))
def test_float_op(case):
    attrs, params = FLOAT_CASES[case]
    op = case.split("-")[0]
    rng = np.random.default_rng(8)
    inputs, feeds = ["x"], {"x": rng.normal(size=X)}
    if case in ("Add", "Mul-tensors", "Concat"):
        inputs.append("x2")
        feeds["x2"] = rng.normal(size=X)
    outputs = ["y", "y2"] if op == "Split" else ["y"]
    node = Node(op, "the_node", inputs, outputs, dict(attrs), dict(params))
    graph = single_node_graph(node, {name: value.shape for name, value in feeds.items()})
    exported = run_onnx(graph, feeds)
    expected = run_reference(graph, feeds)
    for name in outputs:
        assert_close(exported[name], expected[name], FLOAT32_RTOL, f"{case} output {name}")


def test_gemm_and_conv_with_residual():
    rng = np.random.default_rng(9)
    conv = Node("Conv", "conv", ["x", "x"], ["c"], {"pads": [1, 1, 1, 1]},
                {"weight": _f32(rng, 3, 3, 3, 3), "bias": _f32(rng, 3)})
    gemm = Node("Gemm", "fc", ["f"], ["y"], {}, {"weight": _f32(rng, 4, 60), "bias": _f32(rng, 4)})
    graph = Graph([TensorInfo("x", (None,) + X[1:])], ["y"], [conv, Node("Flatten", "flat", ["c"], ["f"]), gemm])
    feeds = {"x": rng.normal(size=X)}
    assert_close(run_onnx(graph, feeds)["y"], run_reference(graph, feeds)["y"], FLOAT32_RTOL, "Conv + residual, Gemm")


# ---- errors -------------------------------------------------------------------------------------

def _pa_graph(**attrs):
    node = random_pa_node(np.random.default_rng(0), 4, 3)
    node.name = "binary_layer"
    node.attrs.update(attrs)
    return Graph([TensorInfo("x", (None, 3, 6, 6))], ["y"], [node])


@pytest.mark.parametrize("op", ["PAConv", "PALinear"])
def test_binary_act_coding_exports_as_equal_thermometer_steps(op):
    from pabnn.engine.ops.pa_conv import binary_plane_steps

    rng = np.random.default_rng(4)
    kernel = (3, 3) if op == "PAConv" else (1, 1)
    node = random_pa_node(rng, 5, 6, kernel, 2, 5, op=op)
    node.attrs["act_coding"] = "binary"
    node.params["act_steps"] = binary_plane_steps(0.3, 5)
    shape = (3, 6, 5, 4) if op == "PAConv" else (3, 6)
    x = rng.normal(size=shape).astype(np.float32)
    x[0, 1] = node.params["act_thresholds"][2, 1]  # exactly on a threshold
    (exported,) = run_onnx(single_node_graph(node, {"x": x.shape}), {"x": x}).values()
    (expected,) = get_op(op).reference(node, [x.astype(np.float64)])
    assert_close(exported, expected, FLOAT32_RTOL, f"binary-coded {op}")


def test_attributes_no_stored_op_has_are_refused_naming_the_node():
    with pytest.raises(ConversionError, match="'binary_layer'.*input_planes"):
        export_onnx(_pa_graph(input_planes=True))


@pytest.mark.parametrize("group,bias", [(1, True), (2, False)])
def test_dynamic_conv_is_a_scan_over_the_batch(group, bias):
    rng = np.random.default_rng(group)
    params = {"bias": _f32(rng, 4)} if bias else {}
    node = Node("DynamicConv", "dynamic", ["x", "w"], ["y"],
                {"strides": [2, 1], "pads": [1, 0, 1, 2], "dilations": [1, 2], "group": group}, params)
    graph = Graph([TensorInfo("x", (None, 2, 5, 6)), TensorInfo("w", (None, 4, 2 // group, 3, 3))], ["y"], [node])
    feeds = {"x": rng.normal(size=(3, 2, 5, 6)), "w": rng.normal(size=(3, 4, 2 // group, 3, 3))}
    assert_close(run_onnx(graph, feeds)["y"], run_reference(graph, feeds)["y"], FLOAT32_RTOL, "DynamicConv")


def test_symbolic_input_sizes_stay_symbolic():
    rng = np.random.default_rng(11)
    node = random_pa_node(rng, 4, 3, padding_rule="zero_after_quantizer")
    pool = Node("GlobalAveragePool", "pool", ["y"], ["p"])
    graph = Graph([TensorInfo("x", (None, 3, 6, 6), (None, None, "height", "width"))], ["p"], [node, pool])
    proto = export_onnx(graph)
    for value, expected in ((proto.graph.input[0], ["batch", 3, "height", "width"]),
                            (proto.graph.output[0], ["batch", 4, 1, 1])):
        assert [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim] == expected
    for size in ((6, 6), (9, 5)):
        feeds = {"x": rng.normal(size=(2, 3) + size)}
        assert_close(run_onnx(graph, feeds)["p"], run_reference(graph, feeds)["p"], FLOAT32_RTOL, f"size {size}")


def _cli(capsys, *args):
    code = main([str(a) for a in args])
    error = capsys.readouterr().err.strip().splitlines()
    return code, error


def test_cli_errors_are_one_line_and_leave_no_file(tmp_path, capsys):
    save(_pa_graph(), tmp_path / "model.pab")
    (tmp_path / "notes.txt").write_text("not a model, just notes long enough to hold a .pab prefix\n")
    existing = tmp_path / "existing.onnx"
    existing.write_bytes(b"keep me")
    cases = [
        (["export", tmp_path / "notes.txt", "-o", tmp_path / "a.onnx"], "not a .pab file"),
        (["export", tmp_path / "model.pab", "-o", existing], "exists; pass --force"),
        (["export", tmp_path / "model.pab", "-o", tmp_path / "missing" / "a.onnx"], "does not exist"),
        # /proc takes no new files, even for root (file permissions would not stop root).
        (["export", tmp_path / "model.pab", "-o", "/proc/pabnn-export.onnx"], "cannot write /proc/pabnn-export.onnx"),
    ]
    for args, fragment in cases:
        code, error = _cli(capsys, *args, "--quiet")
        assert code == 1 and len(error) == 1 and error[0].startswith("pabnn export: error: "), error
        assert fragment in error[0], error
        # Without --quiet a progress bar may come first; the error is still one line, the last.
        code, error = _cli(capsys, *args)
        assert code == 1 and error[-1].startswith("pabnn export: error: ") and fragment in error[-1], error
        assert sum("error" in line for line in error) == 1, error
    assert existing.read_bytes() == b"keep me"
    assert sorted(os.listdir(tmp_path)) == ["existing.onnx", "model.pab", "notes.txt"]
    code, _ = _cli(capsys, "export", tmp_path / "model.pab", "-o", existing, "--force")
    assert code == 0
    onnx.checker.check_model(str(existing), full_check=True)


def test_export_onnx_refuses_other_arguments(tmp_path):
    with pytest.raises(ConversionError, match="a .pab path or a pabnn Graph"):
        export_onnx(42)
    (tmp_path / "x.pab").write_bytes(b"\0" * 10)
    with pytest.raises(FormatError, match="x.pab"):
        export_onnx(tmp_path / "x.pab")


def test_integer_layers():
    """The digits ResNet with its stem conv and classifier as IntConv / IntLinear."""
    with np.load(DATA / "digits_sample.npz") as sample:
        calibration, x = sample["calibration"][:32], sample["evaluation"][:64]
    graph = convert(str(DATA / "digits_resnet.onnx"), calibration=calibration, binarize=[],
                    integer=["/stem/*", "/fc/Gemm"]).graph
    assert {"IntConv", "IntLinear"} <= {node.op for node in graph.nodes}
    assert_nodes_match(graph, {graph.inputs[0].name: x[:4]})
    assert_model_matches(graph, x)
