"""convert() end to end on the bundled digits ResNet (real MNIST digits)."""
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
from models import assert_engine_matches_reference_per_op
from tolerances import FLOAT32_RTOL, assert_close

from pabnn.converters import convert
from pabnn.engine import ConversionError, Session

DATA = os.path.join(os.path.dirname(__file__), "..", "examples", "data")
MODEL = os.path.join(DATA, "digits_resnet.onnx")


@pytest.fixture(scope="module")
def sample():
    return np.load(os.path.join(DATA, "digits_sample.npz"))


@pytest.fixture(scope="module")
def float_logits(sample):
    session = onnxruntime.InferenceSession(MODEL, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": sample["evaluation"][:300]})[0]


def top1(logits, labels):
    return float(np.mean(logits.argmax(axis=1) == labels))


def test_float_path_equals_onnxruntime(sample, float_logits):
    model = convert(MODEL, calibration=sample["calibration"][:8], binarize=[])
    assert not model.fits and all(node.op not in ("PAConv", "PALinear") for node in model.graph.nodes)
    assert "ChannelAffine" not in [node.op for node in model.graph.nodes]  # every BatchNorm folded
    (logits,) = model.session().run(None, {"input": sample["evaluation"][:300]})
    assert_close(logits, float_logits, FLOAT32_RTOL, "float path vs onnxruntime")


@pytest.mark.slow
@pytest.mark.parametrize("bases", [(1, 1), (2, 2), (4, 5)])
def test_every_op_of_the_converted_model_equals_the_reference(sample, bases):
    model = convert(MODEL, calibration=sample["calibration"][:64], weight_bases=bases[0], act_bases=bases[1])
    ops = [node.op for node in model.graph.nodes]
    # first and last stay float, and the two 1x1 shortcuts (fan-in 16 and 32 < min_fan_in)
    assert ops.count("PAConv") == 6 and ops.count("Conv") == 3 and ops[0] == "Conv" and ops[-1] == "Gemm"
    assert_engine_matches_reference_per_op(model.graph, {"input": sample["evaluation"][:6]})


def test_fits_are_reported_and_shrink_as_bases_grow(sample):
    errors = []
    for bases in (1, 2, 4, 8):
        model = convert(MODEL, calibration=sample["calibration"][:32], weight_bases=bases, act_bases=bases)
        assert [fit["layer"] for fit in model.fits] == model.graph.metadata["converter"]["binarized"]
        errors.append((np.mean([f["weight_relative_error"] for f in model.fits]),
                       np.mean([f["act_relative_error"] for f in model.fits])))
    for earlier, later in zip(errors, errors[1:]):
        assert later[0] < earlier[0] and later[1] < earlier[1], errors


@pytest.mark.slow
def test_many_bases_approach_the_float_model(sample, float_logits):
    labels = sample["evaluation_labels"][:300]
    model = convert(MODEL, calibration=sample["calibration"], weight_bases=8, act_bases=8)
    (logits,) = model.session().run(None, {"input": sample["evaluation"][:300]})
    assert top1(logits, labels) >= top1(float_logits, labels) - 0.03


def test_layer_selection_by_pattern(sample):
    calibration = sample["calibration"][:8]
    model = convert(MODEL, calibration=calibration, weight_bases=1, act_bases=1, binarize=["/stage2/*"],
                    keep_float=["*shortcut*"])
    binary = [node.name for node in model.graph.nodes if node.op == "PAConv"]
    assert binary == ["/stage2/conv1/Conv", "/stage2/conv2/Conv"]
    assert model.graph.metadata["converter"]["binarized"] == binary


def test_layer_selection(sample):
    calibration = sample["calibration"][:8]
    model = convert(MODEL, calibration=calibration, weight_bases=1, act_bases=1,
                    binarize=["/stage1/conv1/Conv", "/fc/Gemm"])
    kinds = {node.name: node.op for node in model.graph.nodes}
    assert kinds["/stage1/conv1/Conv"] == "PAConv" and kinds["/fc/Gemm"] == "PALinear"
    assert kinds["/stage1/conv2/Conv"] == "Conv"
    model = convert(MODEL, calibration=calibration, weight_bases=1, act_bases=1, keep_float=["/stage1/conv1/Conv"])
    assert {node.name: node.op for node in model.graph.nodes}["/stage1/conv1/Conv"] == "Conv"
    assert len(model.fits) == 5


def test_default_choice_keeps_layers_with_small_fan_in_float(sample):
    """fan-in = (C/group) * kh * kw: the shortcuts read 16 and 32 channels through 1x1 kernels, the
    3x3 convs 16 * 9 = 144 and more."""
    from pabnn.converters.passes import fan_in

    calibration = sample["calibration"][:8]
    shortcuts = ["/stage2/shortcut/shortcut.0/Conv", "/stage3/shortcut/shortcut.0/Conv"]
    chosen = {}
    for min_fan_in in (64, 32, 1):
        model = convert(MODEL, calibration=calibration, weight_bases=1, act_bases=1, method="sequential",
                        min_fan_in=min_fan_in, progress=False)
        chosen[min_fan_in] = model.graph.metadata["converter"]["binarized"]
        fans = {node.name: fan_in(node) for node in model.float_graph.nodes if node.op in ("Conv", "Gemm")}
        layers = list(fans)
        assert chosen[min_fan_in] == [name for name in layers[1:-1] if fans[name] >= min_fan_in]
    assert [fans[name] for name in shortcuts] == [16, 32]
    assert not set(shortcuts) & set(chosen[64])
    assert shortcuts[1] in chosen[32] and shortcuts[0] not in chosen[32]
    assert set(shortcuts) <= set(chosen[1]) and len(chosen[1]) == 8


@pytest.mark.parametrize("kwargs,message", [
    ({"weight_bases": 0}, "weight_bases must be an int in 1..16"),
    ({"act_bases": 2.5}, "act_bases must be an int"),
    ({"calibration": np.zeros((4, 1, 27, 28), np.float32)}, r"expected shape \['batch', 1, 28, 28\]"),
    ({"calibration": np.full((4, 1, 28, 28), np.nan, np.float32)}, "NaN"),
    ({"binarize": ["nope"]}, "cannot binarize 'nope'"),
    ({"keep_float": ["/Flatten"]}, "matches no Conv/Gemm layer"),
    ({"binarize": ["/stage9/*"]}, r"cannot binarize '/stage9/\*'"),
    ({"min_fan_in": 0}, "min_fan_in must be an int >= 1"),
])
def test_bad_arguments_give_clear_errors(sample, kwargs, message):
    arguments = {"calibration": sample["calibration"][:4], **kwargs}
    with pytest.raises(ConversionError, match=message):
        convert(MODEL, **arguments)


def test_bad_sources_give_clear_errors(tmp_path, sample):
    with pytest.raises(ConversionError, match="cannot read"):
        convert(tmp_path / "missing.onnx", calibration=sample["calibration"][:4])
    (tmp_path / "junk.onnx").write_bytes(b"\x00\xff" * 100)
    with pytest.raises(ConversionError, match="junk.onnx"):
        convert(tmp_path / "junk.onnx", calibration=sample["calibration"][:4])
    with pytest.raises(ConversionError, match="ONNX path, an onnx.ModelProto or a torch.nn.Module"):
        convert(42, calibration=sample["calibration"][:4])


def test_onnx_model_proto_and_path_convert_identically(sample):
    calibration = sample["calibration"][:16]
    from_path = convert(MODEL, calibration=calibration, weight_bases=2, act_bases=2)
    from_proto = convert(onnx.load(MODEL), calibration=calibration, weight_bases=2, act_bases=2)
    x = {"input": sample["evaluation"][:8]}
    np.testing.assert_array_equal(Session(from_path.graph).run(None, x)[0], Session(from_proto.graph).run(None, x)[0])
    assert from_path.graph.metadata["source_sha256"] == from_proto.graph.metadata["source_sha256"]


def test_the_engine_imports_neither_torch_nor_onnx(tmp_path, sample):
    path = tmp_path / "m.pab"
    convert(MODEL, calibration=sample["calibration"][:8], weight_bases=1, act_bases=1).save(path)
    np.save(tmp_path / "x.npy", sample["evaluation"][:2])
    script = (
        "import sys, numpy as np\n"
        "from pabnn.engine import load\n"
        f"session = load({str(path)!r})\n"
        f"session.run(None, {{'input': np.load({str(tmp_path / 'x.npy')!r})}})\n"
        "assert 'torch' not in sys.modules and 'onnx' not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
