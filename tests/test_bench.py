"""`pabnn bench` and Session.profile: structure and consistency (never timing thresholds)."""
import json
import subprocess
import sys

import numpy as np
import pytest
from tolerances import FLOAT32_RTOL, assert_close

from pabnn.converters.bench import NETWORKS, bench_case, format_case, roofline_binary_macs
from pabnn.engine import Session, run_reference


@pytest.mark.slow
def test_benchmark_networks_convert_and_match_the_reference_on_their_float_path():
    import onnxruntime

    model, input_shape, _ = NETWORKS["resnet18"]()
    x = np.random.default_rng(0).normal(size=input_shape).astype(np.float32)
    (expected,) = onnxruntime.InferenceSession(model.SerializeToString(),
                                               providers=["CPUExecutionProvider"]).run(None, {"input": x})
    from pabnn.converters import convert

    graph = convert(model, calibration=x, binarize=[]).graph
    (logits,) = Session(graph).run(None, {"input": x})
    assert_close(logits, expected, FLOAT32_RTOL, "ResNet-18 float path vs onnxruntime")
    assert run_reference(graph, {"input": x})["fc"].shape == (1, 1000)


@pytest.mark.slow
def test_bench_case_reports_every_field_for_each_thread_count():
    result = bench_case("conv3x3", 1, 1, threads_list=(1, 2), repeats=2)
    assert result["bops"] == 256 * 256 * 9 * 56 * 56  # M*N*MACs
    assert [row["threads"] for row in result["threads"]] == [1, 2]
    for row in result["threads"]:
        assert row["pabnn_ms"] > 0 and row["onnxruntime_ms"] > 0 and row["roofline_macs_per_s_per_core"] > 0
        assert row["speedup_vs_onnxruntime"] == pytest.approx(row["onnxruntime_ms"] / row["pabnn_ms"])
        assert row["pabnn_in_a_row_ms"] > 0
        assert row["ops_ms"] == pytest.approx(sum(layer["ms"] for layer in row["profile"]))
        assert [layer["op"] for layer in row["profile"]] == ["PAConv"]
        assert row["profile"][0]["share"] == pytest.approx(1.0)
    text = format_case(result)
    assert "PA(1,1)" in text and "roofline" in text and "conv" in text and "outside them" in text


def test_roofline_loop_counts_binary_macs():
    macs, run = roofline_binary_macs(repeats=10, length=36)
    assert macs == 10 * 4 * 16 * 36 * 64
    assert np.isfinite(run())


def test_session_profile_names_the_planned_nodes():
    from test_fusion import residual_block

    graph = residual_block(np.random.default_rng(0), "PAConv")
    session = Session(graph, threads=1)
    profile = session.profile({"x": np.zeros((1, 70, 6, 5), np.float32)}, repeats=2)
    assert list(profile) == [node.name for node in session.plan_graph().nodes] == ["conv1", "conv2"]
    assert all(seconds > 0 for seconds in profile.values())


@pytest.mark.slow
def test_bench_cli_json_and_profile_plot(tmp_path):
    plot = tmp_path / "profile.png"
    result = subprocess.run([sys.executable, "-m", "pabnn.engine.cli", "bench", "--network", "conv3x3", "--bases",
                             "1,1", "--threads", "1", "--repeats", "1", "--json", "--plot", str(plot)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    (case,) = json.loads(result.stdout)
    assert case["network"] == "conv3x3" and case["threads"][0]["threads"] == 1
    assert "calibrating" in result.stderr and "timing conv3x3 PA(1,1)" in result.stderr  # progress, not --quiet
    from test_plots import png_size

    from pabnn.engine.plots import default_figure_size, profile_panels

    (panel,) = profile_panels([case])
    assert panel["series"] == {"1 thread": [layer["ms"] for layer in case["threads"][0]["profile"]]}
    width, height = default_figure_size([panel])
    assert png_size(plot) == (round(100 * width), round(100 * height))
