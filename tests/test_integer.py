"""converters/integer.py: choosing integer layers, the input quantization, and whole conversions."""
from pathlib import Path

import numpy as np
import pytest
from tolerances import FLOAT32_RTOL, assert_close

from pabnn.converters import convert
from pabnn.converters.integer import input_quantization
from pabnn.engine.cli import main
from pabnn.engine.errors import ConversionError
from pabnn.engine.graph import run_reference
from pabnn.engine.ops import get_op
from pabnn.engine.ops.int_conv import quantize_input
from pabnn.engine.pab_format import load_graph

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"
MODEL = EXAMPLES / "digits_resnet.onnx"
STEM = "/stem/stem.0/Conv"
# Top-1 points an integer first layer may lose against the same conversion with a float one.
TOP1_POINTS = 0.2


@pytest.fixture(scope="module")
def digits():
    with np.load(EXAMPLES / "digits_sample.npz") as sample:
        return {key: sample[key] for key in sample.files}


@pytest.mark.parametrize("values, scale, zero_point", [
    (np.arange(256) / 255.0, 1 / 255, 0),  # pixels / 255
    (np.arange(17) / 16.0, 1 / 16, 0),  # sklearn digits / 16
    (np.arange(10.0, 21.0), 1.0, 0),  # 0 is on the grid below the values
    ((np.arange(256) - 128) / 64.0, 1 / 64, 128),  # an affine map with 0 on the grid
])
def test_inputs_on_a_grid_are_quantized_exactly(values, scale, zero_point):
    values = np.random.default_rng(0).permutation(values.astype(np.float32))
    found_scale, found_zero_point, on_grid = input_quantization(values)
    assert on_grid and found_zero_point == zero_point
    assert abs(found_scale - scale) <= 1e-6 * scale
    q = quantize_input(values, found_scale, found_zero_point)
    assert len(np.unique(q)) == len(values)
    assert_close((q - found_zero_point) * np.float64(found_scale), values, 1e-6)


@pytest.mark.parametrize("values", [
    (np.arange(256) / 255.0 - 0.5) / 0.25,  # normalized pixels: 0 falls between two grid points
    np.linspace(-1.0, 3.0, 1000),  # more than 256 levels
])
def test_other_inputs_use_their_range_with_zero(values):
    values = values.astype(np.float32)
    scale, zero_point, on_grid = input_quantization(values)
    assert not on_grid
    low, high = min(0.0, values.min()), max(0.0, values.max())
    assert abs(scale - (high - low) / 255) <= 1e-6 * scale and zero_point == round(-low / scale)
    q = quantize_input(values, scale, zero_point)
    assert q.min() >= 0 and q.max() <= 255
    assert np.max(np.abs((q - zero_point) * np.float64(scale) - values)) <= 0.5 * scale * (1 + 1e-6)


def test_integer_layers_need_calibration_data():
    with pytest.raises(ConversionError, match="integer layers .* need calibration data"):
        convert(str(MODEL), integer=[STEM])


def test_an_integer_pattern_that_matches_nothing_is_an_error(digits):
    with pytest.raises(ConversionError, match="matches no Conv/Gemm layer"):
        convert(str(MODEL), calibration=digits["calibration"][:8], integer=["/nothing/*"], binarize=[])


@pytest.mark.slow
def test_digits_top1_with_an_integer_stem(digits):
    """The default conversion (PA(4,5), "selected", 256 calibration images as in the main job) with
    the stem conv as an int8 layer: the layer is exact against its reference on real images, and
    top-1 on the 1000 held-out digits is within TOP1_POINTS of the same conversion with a float
    stem (measured: 98.1% both; docs/benchmarks.md lists other conversions, where the change was
    -0.5 to +0.1)."""
    calibration, images, labels = digits["calibration"][:256], digits["evaluation"], digits["evaluation_labels"]
    top1 = {}
    for integer in (None, ["/stem/*"]):
        model = convert(str(MODEL), calibration=calibration, integer=integer, progress=False)
        session = model.session()
        (logits,) = session.run(None, {session.input_names[0]: images})
        top1[integer is not None] = 100 * float(np.mean(logits.argmax(axis=1) == labels))
    (stem,) = [node for node in model.graph.nodes if node.name == STEM]
    assert stem.op == "IntConv" and stem.attrs["input_zero_point"] == 0
    report = model.graph.metadata["converter"]["integer"]
    assert [(r["layer"], r["input_on_grid"]) for r in report] == [(STEM, True)]  # the images are pixels / 255
    (fast,) = get_op("IntConv").make_kernel(stem)([images[:64]])
    (exact,) = get_op("IntConv").reference(stem, [images[:64].astype(np.float64)])
    assert np.array_equal(fast, exact.astype(np.float32))
    assert top1[True] >= top1[False] - TOP1_POINTS, top1


def test_digits_float_model_with_an_integer_stem_matches_the_reference_executor(digits):
    model = convert(str(MODEL), calibration=digits["calibration"][:32], integer=[STEM], binarize=[], progress=False)
    assert [node.op for node in model.graph.nodes if node.op in ("IntConv", "PAConv", "PALinear")] == ["IntConv"]
    session = model.session()
    feeds = {session.input_names[0]: digits["evaluation"][:32]}
    (expected,) = run_reference(model.graph, feeds, keep=model.graph.outputs).values()
    assert_close(session.run(None, feeds)[0], expected, FLOAT32_RTOL)


def test_cli_convert_with_integer_layers(digits, tmp_path, capsys):
    """--integer takes precedence over --binarize, --keep-float over both; the report shows the
    int8 rows."""
    np.save(tmp_path / "calib.npy", digits["calibration"][:16])
    output = tmp_path / "model.pab"
    assert main(["convert", str(MODEL), "-o", str(output), "--calibration", str(tmp_path / "calib.npy"),
                 "--integer", "/stem/*", "/stage1/conv1/Conv", "/stage2/conv*", "--binarize", "/stage1/*",
                 "--keep-float", "/stage2/conv2/Conv", "--method", "lloyd", "--weight-bases", "1",
                 "--act-bases", "1"]) == 0
    out = capsys.readouterr().out
    assert f"{STEM}: int8 layer, input scale 0.00392157, zero point 0, exact" in out
    graph = load_graph(output)
    ops = {node.name: node.op for node in graph.nodes}
    assert [ops[name] for name in (STEM, "/stage1/conv1/Conv", "/stage1/conv2/Conv", "/stage2/conv1/Conv",
                                   "/stage2/conv2/Conv")] == ["IntConv", "IntConv", "PAConv", "IntConv", "Conv"]
    converter = graph.metadata["converter"]
    assert converter["binarized"] == ["/stage1/conv2/Conv"]
    layers = {report["layer"]: report for report in converter["integer"]}
    assert list(layers) == [STEM, "/stage1/conv1/Conv", "/stage2/conv1/Conv"]
    # After a ReLU the values are no 256-level grid: the range with 0, zero point 0.
    assert not layers["/stage1/conv1/Conv"]["input_on_grid"] and layers["/stage1/conv1/Conv"]["input_zero_point"] == 0
    assert main(["report", str(output)]) == 0
    text = capsys.readouterr().out
    assert "int8" in text and "integer (int8) layers: 3" in text and "int MACs" in text
