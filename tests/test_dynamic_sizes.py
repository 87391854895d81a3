"""Symbolic input sizes: graphs whose input height and width are left open run at any size their
shape rules accept (engine/graph.py, engine/session.py), convert at one size and run at others,
keep their symbols in .pab files, and refuse sizes they cannot take with an InputError naming the
input, the node, the rule and the sizes that work."""
import importlib.util
import json
import os

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper
from tolerances import FLOAT32_RTOL, PA_COMBINE_RTOL, assert_close

from pabnn.converters import convert, import_onnx
from pabnn.engine import ConversionError, InputError, Session, load, run_reference, save
from pabnn.engine import session as session_module
from pab_files import rewrite_header, split_file

IR_VERSION = 9


def _model(nodes, initializers, input_shape, output_shape, opset=13):
    graph = helper.make_graph(nodes, "dynamic", [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def fully_convolutional_model(seed=0):
    """x [N, 3, H, W] -> Conv 3x3 stride 2 -> Relu -> MaxPool 2x2 -> Conv 3x3 -> Relu
    -> Resize x2 (scales, nearest) -> Conv 1x1 -> Relu -> Conv 3x3 -> GlobalAveragePool -> Flatten
    -> Gemm 16->4: takes any H, W >= 4."""
    rng = np.random.default_rng(seed)

    def weight(name, *shape, scale=0.4):
        return numpy_helper.from_array((scale * rng.standard_normal(shape)).astype(np.float32), name)

    initializers = [weight("w1", 8, 3, 3, 3), weight("b1", 8), weight("w2", 16, 8, 3, 3, scale=0.2), weight("b2", 16),
                    weight("w3", 16, 16, 1, 1, scale=0.3), weight("b3", 16), weight("w4", 16, 16, 3, 3, scale=0.2),
                    weight("b4", 16), weight("g", 4, 16), weight("gb", 4),
                    numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Resize", ["r2", "", "scales"], ["up"], name="upsample", mode="nearest"),
        helper.make_node("Conv", ["up", "w3", "b3"], ["c3"], name="conv3", kernel_shape=[1, 1]),
        helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        helper.make_node("Conv", ["r3", "w4", "b4"], ["c4"], name="conv4", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c4"], ["gp"], name="gap"),
        helper.make_node("Flatten", ["gp"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "g", "gb"], ["y"], name="fc", transB=1),
    ]
    return _model(nodes, initializers, ["N", 3, "height", "width"], ["N", 4])


def flatten_gemm_model():
    """x [N, 1, H, W] -> Conv 3x3 pad 1 (4 channels) -> MaxPool 2x2 -> Flatten -> Gemm (4*7*7 -> 3): the
    Gemm's weight takes 196 features, so H and W must be 14 or 15."""
    rng = np.random.default_rng(1)
    initializers = [numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "w"),
                    numpy_helper.from_array(rng.standard_normal((3, 196)).astype(np.float32), "g")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["c"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "g"], ["y"], name="fc", transB=1)]
    return _model(nodes, initializers, ["N", 1, "H", "W"], ["N", 3])


def _images(height, width, count=3, seed=0):
    return np.random.default_rng(seed).standard_normal((count, 3, height, width)).astype(np.float32)


SIZES = [(16, 16), (24, 40), (33, 17), (4, 5)]


@pytest.fixture(scope="module")
def model():
    return fully_convolutional_model()


@pytest.fixture(scope="module")
def float_session(model):
    return Session(import_onnx(model, example_shapes={"x": [None, 3, 16, 16]}))


def test_import_keeps_the_open_sizes_as_symbols(model):
    graph = import_onnx(model, example_shapes={"x": [None, 3, 16, 20]})
    (info,) = graph.inputs
    assert info.shape == (None, 3, 16, 20) and info.symbols == (None, None, "height", "width")
    assert graph.symbols() == {"height": 16, "width": 20}
    resize = next(node for node in graph.nodes if node.op == "Resize")
    assert "sizes" not in resize.attrs and resize.attrs["scales"] == [1.0, 2.0, 2.0]


@pytest.mark.parametrize("height, width", SIZES)
def test_float_graph_equals_onnxruntime_at_any_size(model, float_session, height, width):
    runtime = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = _images(height, width)
    expected = runtime.run(None, {"x": x})[0]
    assert_close(float_session.run(None, {"x": x})[0], expected, FLOAT32_RTOL, f"{height}x{width}")


def test_pa_conversion_at_one_size_runs_at_others(model):
    calibration = _images(16, 16, count=16, seed=2)
    converted = convert(model, calibration=calibration, weight_bases=2, act_bases=3, progress=False)
    ops = [node.op for node in converted.graph.nodes]
    assert "PAConv" in ops and converted.graph.inputs[0].shape == (None, 3, 16, 16)
    session = converted.session()
    for height, width in [(16, 16), (20, 28), (9, 31)]:
        x = _images(height, width, seed=3)
        expected = run_reference(converted.graph, {"x": x})["y"]
        assert_close(session.run(None, {"x": x})[0], expected, PA_COMBINE_RTOL, f"{height}x{width}")


def test_plans_are_made_per_size_cached_and_evicted(model, monkeypatch):
    monkeypatch.setattr(session_module, "PLAN_CACHE_SIZE", 2)
    session = Session(import_onnx(model, example_shapes={"x": [None, 3, 16, 16]}))
    assert [sizes for _, sizes in session.cached_plans()] == [{"height": 16, "width": 16}]
    first = session.run(None, {"x": _images(8, 12)})[0]
    plan = session._plans[next(reversed(session._plans))]
    session.run(None, {"x": _images(8, 12, count=5, seed=1)})  # same size, another batch: the same plan
    assert session._plans[next(reversed(session._plans))] is plan
    session.run(None, {"x": _images(10, 10)})  # a third size evicts the least recently used (16x16)
    assert [sizes for _, sizes in session.cached_plans()] == [{"height": 8, "width": 12}, {"height": 10, "width": 10}]
    session.run(None, {"x": _images(8, 12)})  # used again: now the most recent
    session.run(None, {"x": _images(16, 16)})
    assert [sizes for _, sizes in session.cached_plans()] == [{"height": 8, "width": 12}, {"height": 16, "width": 16}]
    assert_close(session.run(None, {"x": _images(8, 12)})[0], first, 0.0, "re-planned 8x12")


def test_a_size_the_graph_cannot_take_names_the_input_node_and_rule():
    session = Session(import_onnx(flatten_gemm_model(), example_shapes={"x": [None, 1, 14, 14]}))
    assert session.run(None, {"x": np.ones((2, 1, 15, 14), np.float32)})[0].shape == (2, 3)
    with pytest.raises(InputError) as error:
        session.run(None, {"x": np.ones((2, 1, 14, 100), np.float32)})
    message = str(error.value)
    assert "input 'x' H 14, W 100" in message and "'fc'" in message and "Gemm" in message
    assert "needs 196 input features" in message and "found 1400" in message
    assert message.endswith("so W must be one of 14..15 with the other sizes as given"), message
    with pytest.raises(InputError) as error:
        Session(import_onnx(fully_convolutional_model(), example_shapes={"x": [None, 3, 16, 16]})).run(
            None, {"x": _images(1, 16)})
    assert str(error.value) == ("input 'x' height 1, width 16: node 'pool1' (MaxPool): kernel span 2 does not fit "
                                "input size 1 with pads 0,0; so height must be at least 3 with the other sizes as given")
    with pytest.raises(InputError, match=r"expected shape \['batch', 1, 'H', 'W'\], found \[2, 3, 14, 14\]"):
        session.run(None, {"x": np.ones((2, 3, 14, 14), np.float32)})


def test_a_size_baked_into_a_node_is_refused_at_import_unless_fixed():
    """Reshape to [batch, C, H*W] with the target computed from Shape: the target holds the sizes."""
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "i01"], ["nc"], name="take_nc", axis=0),
             helper.make_node("Gather", ["s", "i2"], ["h"], name="take_h", axis=0),
             helper.make_node("Gather", ["s", "i3"], ["w"], name="take_w", axis=0),
             helper.make_node("Mul", ["h", "w"], ["hw"], name="area"),
             helper.make_node("Concat", ["nc", "hw"], ["target"], name="target", axis=0),
             helper.make_node("Reshape", ["x", "target"], ["y"], name="merge")]
    initializers = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
                    (("i01", [0, 1]), ("i2", [2]), ("i3", [3]))]
    model = _model(nodes, initializers, ["N", 3, "H", "W"], ["N", 3, "HW"])
    with pytest.raises(ConversionError, match=r"node 'merge' \(Reshape\): attribute 'shape' is \[3, 64\] at H 8, W 8 "
                                              r"but \[3, 256\] at H 16, W 16; .*input_shapes"):
        import_onnx(model, example_shapes={"x": [None, 3, 8, 8]})
    fixed = import_onnx(model, input_shapes={"x": [None, 3, 8, 8]})
    assert fixed.symbols() == {} and fixed.inputs[0].shape == (None, 3, 8, 8)


def test_pab_round_trip_keeps_the_symbols(tmp_path, model, float_session):
    path = tmp_path / "dynamic.pab"
    save(float_session.graph, path)
    _, header, _ = split_file(path.read_bytes())
    assert header["graph"]["inputs"] == [{"name": "x", "shape": [None, 3, 16, 16],
                                          "symbols": [None, None, "height", "width"]}]
    loaded = load(path)
    assert loaded.graph.inputs == float_session.graph.inputs
    x = _images(20, 12)
    assert_close(loaded.run(None, {"x": x})[0], float_session.run(None, {"x": x})[0], 0.0, "loaded")


def test_files_without_symbols_load_as_before(tmp_path, float_session):
    """A fixed-size graph writes the same input entry as before symbols existed, and a file without the
    "symbols" entry (as every older file) loads as a graph fixed at its shape."""
    fixed = import_onnx(fully_convolutional_model(), input_shapes={"x": [None, 3, 16, 16]})
    save(fixed, tmp_path / "fixed.pab")
    _, header, _ = split_file((tmp_path / "fixed.pab").read_bytes())
    assert header["graph"]["inputs"] == [{"name": "x", "shape": [None, 3, 16, 16]}]
    save(float_session.graph, tmp_path / "dynamic.pab")
    older = rewrite_header((tmp_path / "dynamic.pab").read_bytes(),
                           lambda header: header["graph"]["inputs"][0].pop("symbols"))
    (tmp_path / "older.pab").write_bytes(older)
    session = load(tmp_path / "older.pab")
    assert session.graph.inputs[0].symbols is None
    assert session.run(None, {"x": _images(16, 16)})[0].shape == (3, 4)
    with pytest.raises(InputError, match=r"expected shape \['batch', 3, 16, 16\]"):
        session.run(None, {"x": _images(16, 20)})


@pytest.mark.parametrize("symbols, message", [
    ([None, None, "height"], "one entry per axis"),
    (["batch", None, "height", "width"], "one entry per axis"),
    ([None, None, "", "width"], "one entry per axis"),
    ([None, None, 7, "width"], "one entry per axis"),
    ([None, None, "side", "side"], "symbol 'side' has example size 20 on axis 3 but 16 elsewhere"),
])
def test_bad_symbols_in_a_file_are_refused(tmp_path, symbols, message):
    graph = import_onnx(fully_convolutional_model(), example_shapes={"x": [None, 3, 16, 20]})
    save(graph, tmp_path / "good.pab")

    def edit(header):
        header["graph"]["inputs"][0]["symbols"] = symbols
    (tmp_path / "bad.pab").write_bytes(rewrite_header((tmp_path / "good.pab").read_bytes(), edit))
    with pytest.raises(Exception) as error:
        load(tmp_path / "bad.pab")
    assert type(error.value).__name__ == "FormatError" and message in str(error.value)


OCR_PACKAGE = importlib.util.find_spec("rapidocr_onnxruntime")


@pytest.mark.skipif(OCR_PACKAGE is None, reason="rapidocr-onnxruntime (in the test extra for Python < 3.13) ships the OCR classifier")
def test_ocr_text_direction_classifier_equals_onnxruntime_at_two_widths():
    """PaddleOCR's mobile text-direction classifier (opset 11, Constant-node weights, input
    [N, 3, height, width] left open), imported once, at two widths."""
    path = os.path.join(os.path.dirname(OCR_PACKAGE.origin), "models", "ch_ppocr_mobile_v2.0_cls_infer.onnx")
    model = onnx.load(path)
    session = Session(import_onnx(model, example_shapes={"x": [None, 3, 48, 192]}))
    runtime = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    for width in (96, 320):
        x = np.random.default_rng(width).uniform(-1, 1, (4, 3, 48, width)).astype(np.float32)
        assert_close(session.run(None, {"x": x})[0], runtime.run(None, {"x": x})[0], FLOAT32_RTOL, f"width {width}")
