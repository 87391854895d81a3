"""`pabnn convert --method`, `pabnn report --calibration` and `pabnn evaluate`, end to end in
subprocesses on the bundled digits ResNet (real MNIST digits)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pabnn.converters.diagnostics import classification_metrics
from pabnn.engine import load, load_graph

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"
ONNX_MODEL = EXAMPLES / "digits_resnet.onnx"
SAMPLE = EXAMPLES / "digits_sample.npz"


def run_cli(*args, cwd):
    command = [sys.executable, "-m", "pabnn.engine.cli"] + [str(a) for a in args]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder with calibration/evaluation .npy files and a PA(2,2) model converted by the CLI."""
    folder = tmp_path_factory.mktemp("diagnostics")
    sample = np.load(SAMPLE)
    np.save(folder / "calibration.npy", sample["calibration"][:32])
    np.save(folder / "x.npy", sample["evaluation"][:100])
    np.save(folder / "y.npy", sample["evaluation_labels"][:100])
    result = run_cli("convert", ONNX_MODEL, "-o", "model.pab", "--calibration", "calibration.npy",
                     "--weight-bases", 2, "--act-bases", 2, "--method", "sequential", cwd=folder)
    assert result.returncode == 0, result.stderr
    assert "output SQNR" in result.stdout
    return folder


def test_convert_records_the_chosen_method(workspace):
    graph = load_graph(workspace / "model.pab")
    assert graph.metadata["converter"]["method"] == "sequential"
    assert {fit["method"] for fit in graph.metadata["fits"]} == {"sequential"}


def test_convert_refuses_an_unknown_method(workspace):
    result = run_cli("convert", ONNX_MODEL, "-o", "other.pab", "--calibration", "calibration.npy",
                     "--method", "magic", cwd=workspace)
    assert result.returncode == 1 and "unknown calibration method 'magic'" in result.stderr
    assert not (workspace / "other.pab").exists()


def test_report_prints_per_layer_sqnr_against_the_source(workspace):
    result = run_cli("report", "model.pab", "--calibration", "x.npy", "--source", ONNX_MODEL, "--json", cwd=workspace)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["layer_sqnr"]
    binarized = load_graph(workspace / "model.pab").metadata["converter"]["binarized"]
    assert [row["layer"] for row in rows] == binarized
    assert all(np.isfinite(row["sqnr_db"]) and row["kind"] == "PA(2,2)" for row in rows)
    table = run_cli("report", "model.pab", "--calibration", "x.npy", "--source", ONNX_MODEL, cwd=workspace).stdout
    assert all(name in table for name in binarized) and "dB" in table
    # Without --source the values measured at conversion are printed.
    stored = run_cli("report", "model.pab", "--calibration", "x.npy", "--json", cwd=workspace)
    assert [row["layer"] for row in json.loads(stored.stdout)["layer_sqnr"]] == binarized


def test_convert_and_report_show_the_refitted_classifier(workspace):
    """The default method refits the float layers after the first binarized one (the two 1x1
    shortcuts, narrower than min_fan_in, and the classifier); convert prints them and report lists
    them among the binarized layers in graph order, with their SQNR against the source's logits."""
    result = run_cli("convert", ONNX_MODEL, "-o", "refit.pab", "--calibration", "calibration.npy",
                     "--weight-bases", 1, "--act-bases", 1, cwd=workspace)
    assert result.returncode == 0, result.stderr
    refitted = [refit["layer"] for refit in load_graph(workspace / "refit.pab").metadata["converter"]["refitted_float"]]
    assert refitted == ["/stage2/shortcut/shortcut.0/Conv", "/stage3/shortcut/shortcut.0/Conv", "/fc/Gemm"]
    for layer in refitted:
        assert f"{layer}: float layer refitted" in result.stdout
    for extra in ([], ["--source", ONNX_MODEL]):
        report = run_cli("report", "refit.pab", "--calibration", "x.npy", "--json", *extra, cwd=workspace)
        rows = json.loads(report.stdout)["layer_sqnr"]
        assert [row["layer"] for row in rows if row["kind"] == "refit"] == refitted
        assert rows[-1]["layer"] == "/fc/Gemm" and all(np.isfinite(row["sqnr_db"]) for row in rows)


def test_evaluate_matches_metrics_computed_here(workspace):
    result = run_cli("evaluate", "model.pab", "--inputs", "x.npy", "--labels", "y.npy", "--source", ONNX_MODEL,
                     "--json", cwd=workspace)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    session = load(workspace / "model.pab")
    (logits,) = session.run(None, {"input": np.load(workspace / "x.npy")})
    expected = classification_metrics(logits, np.load(workspace / "y.npy"))
    assert printed["top1"] == expected["top1"] and printed["top5"] == expected["top5"]
    assert 0 < printed["top1_agreement"] <= 1 and -1 <= printed["logit_cosine"] <= 1
    assert printed["top1_change"] == pytest.approx(printed["top1"] - printed["float_top1"])
    assert printed["top1_change"] == pytest.approx((printed["gained"] - printed["lost"]) / 100)
    assert 0 <= printed["top1_change_ci95"] <= 1.96 * np.sqrt(printed["gained"] + printed["lost"]) / 100
    shown = run_cli("evaluate", "model.pab", "--inputs", "x.npy", "--labels", "y.npy", "--source", ONNX_MODEL,
                    cwd=workspace).stdout
    assert (f"top-1 change vs float ({100 * printed['float_top1']:.2f}%): {100 * printed['top1_change']:+.2f} points, "
            f"95% interval +-{100 * printed['top1_change_ci95']:.2f}") in shown
    text = run_cli("evaluate", "model.pab", "--inputs", "x.npy", "--labels", "y.npy", cwd=workspace).stdout
    assert f"top-1: {100 * expected['top1']:.2f}%" in text and "agreement" not in text


def test_evaluate_refuses_mismatched_labels(workspace):
    np.save(workspace / "few.npy", np.zeros(3, dtype=np.int64))
    result = run_cli("evaluate", "model.pab", "--inputs", "x.npy", "--labels", "few.npy", cwd=workspace)
    assert result.returncode == 1 and "3 labels for 100 samples" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
