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
        # one 56x56 binary layer: its rate is the profile's BOPs over its time, per core
        (group,) = row["binary_by_map"]
        assert group["map"] == "56x56" and group["layers"] == 1 and group["ms"] == pytest.approx(row["ops_ms"])
        rate = result["bops"] / (row["ops_ms"] / 1e3) / row["threads"]
        assert group["macs_per_s_per_core"] == pytest.approx(rate)
        assert group["of_roofline"] == pytest.approx(rate / row["roofline_macs_per_s_per_core"])
    text = format_case(result)
    assert "PA(1,1)" in text and "roofline" in text and "conv" in text and "outside them" in text
    assert "by output map" in text and "56x56" in text


@pytest.mark.slow
def test_bench_case_runs_chosen_layers_as_integer_layers():
    result = bench_case("conv3x3", 1, 1, threads_list=(1,), repeats=1, integer=["conv"])
    assert result["integer_layers"] == ["conv"] and result["bops"] == 0
    (row,) = result["threads"]
    assert [(layer["op"], layer["kind"]) for layer in row["profile"]] == [("IntConv", "int8")]
    assert row["binary_macs_per_s_per_core"] == 0.0
    assert "PA(1,1), int8 conv:" in format_case(result)


def test_roofline_loop_counts_binary_macs():
    macs, run = roofline_binary_macs(repeats=10, length=36)
    assert macs == 10 * 4 * 16 * 36 * 64
    assert np.isfinite(run())


def test_session_profile_names_the_planned_nodes():
    from test_fusion import residual_block

    graph = residual_block(np.random.default_rng(0), "PAConv")
    session = Session(graph, threads=1)
    profile = session.profile({"x": np.zeros((1, 70, 6, 5), np.float32)}, repeats=2)
    assert list(profile) == [node.name for node in session.plan_graph().nodes] == ["conv1.pack", "conv1", "conv2"]
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


# A stand-in for ../shared/peers/bench_ov.py: the same command line and the same JSON file, with
# times that tell the rounds apart (round k reports a median of 10 + k ms at every thread count).
FAKE_OPENVINO = """
import argparse, json, os
parser = argparse.ArgumentParser()
parser.add_argument("--models", nargs="+")
parser.add_argument("--threads", nargs="+", type=int)
parser.add_argument("--json")
parser.add_argument("--rounds", type=int)
parser.add_argument("--runs", type=int)
parser.add_argument("--warmup", type=int)
parser.add_argument("--profile-runs", type=int)
parser.add_argument("--no-bf16", action="store_true")
args = parser.parse_args()
with open({log!r}, "a") as log:
    log.write(" ".join(args.models) + "\\n")
with open({log!r}) as log:
    round_number = len(log.read().splitlines())
if round_number == {fail_round}:
    raise SystemExit("the peer broke in round " + str(round_number))
results = [dict(engine="openvino", model=model, threads=threads, round=1, median_ms=10.0 * (index + 1) + round_number,
                min_ms=9.0, p90_ms=20.0, runs=args.runs, foreign_cpu_s=0.0, foreign_cores=0.0)
           for index, model in enumerate(args.models) for threads in args.threads]
with open(args.json, "w") as handle:
    json.dump(dict(meta={{}}, results=results, profile=[], models={{}}), handle)
"""


def tiny_conv_network(seed=0):
    """A 3x3 conv 16->16 at 8x8: bench_case's path in a second."""
    from pabnn.converters.bench import _OnnxBuilder

    builder = _OnnxBuilder(seed)
    output = builder.conv("input", 16, 16, 3, 1, "conv", bias=True)
    return builder.model((1, 16, 8, 8), output), (1, 16, 8, 8), ["conv"]


@pytest.fixture
def tiny_networks(monkeypatch):
    from pabnn.converters import bench

    monkeypatch.setitem(bench.NETWORKS, "conv3x3", tiny_conv_network)


def fake_openvino(tmp_path, fail_round=0):
    script = tmp_path / "bench_ov.py"
    log = tmp_path / "rounds.log"
    script.write_text(FAKE_OPENVINO.format(log=str(log), fail_round=fail_round))
    return str(script), log


def test_bench_case_times_openvino_in_alternating_rounds_and_prints_its_column(tmp_path, tiny_networks):
    from pabnn.converters.bench import OpenVinoPeer, format_summary

    script, log = fake_openvino(tmp_path)
    peer = OpenVinoPeer(sys.executable, script)
    result = bench_case("conv3x3", 1, 1, threads_list=(1, 2), repeats=2, rounds=2, openvino=peer)
    assert peer.error is None
    assert log.read_text().splitlines() == ["bconv256x256_56 bconv256x256_56_x2"] * 2  # one run per round
    for row in result["threads"]:
        single = row["openvino"]["bconv256x256_56"]
        assert single["round_medians_ms"] == [11.0, 12.0]
        assert row["openvino_ms"] == single["median_ms"] == 11.5
        assert row["openvino"]["bconv256x256_56_x2"]["median_ms"] == 21.5
        assert row["speedup_vs_openvino"] == pytest.approx(11.5 / row["pabnn_in_a_row_ms"])
    assert len(result["load_average"]) == 3
    text = format_case(result)
    assert "OV binary ms" in text and "11.50" in text and "10.00 ms for the second" in text
    summary = format_summary([result])
    assert "| pabnn in a row ms | OpenVINO binary ms |" in summary and "| 11.50 (bconv256x256_56) |" in summary


def test_openvino_peer_failure_is_one_line_and_the_bench_still_prints(tmp_path, tiny_networks, capsys):
    from pabnn.engine.cli import main

    script = tmp_path / "broken.py"
    script.write_text("import openvino_missing_here\n")
    status = main(["bench", "--network", "conv3x3", "--bases", "1,1", "--threads", "1", "--repeats", "1", "--quiet",
                   "--openvino-python", sys.executable, "--openvino-script", str(script)])
    captured = capsys.readouterr()
    assert status == 0
    message = ("exited with code 1: ModuleNotFoundError: No module named 'openvino_missing_here'; "
               "its column is left out")
    assert message in captured.out
    assert "ORT fp32 ms" in captured.out and "OV binary ms" not in captured.out
    assert "| conv3x3 PA(1,1) | 1 |" in captured.out and "| - | " in captured.out
    assert captured.err.count("\n") == 1 and "OpenVINO peer left out" in captured.err


def test_openvino_peer_names_a_missing_interpreter_or_script(tmp_path):
    from pabnn.converters.bench import OpenVinoPeer

    missing = OpenVinoPeer(str(tmp_path / "no-python"), fake_openvino(tmp_path)[0])
    assert "does not exist or is not executable" in missing.error
    assert missing.round(["birealnet"], [1], 1) is None
    assert "the peer script" in OpenVinoPeer(sys.executable, str(tmp_path / "none.py")).error
    silent = tmp_path / "silent.py"
    silent.write_text("")
    peer = OpenVinoPeer(sys.executable, str(silent))
    assert peer.round(["birealnet"], [1], 1) is None and "wrote no result" in peer.error


def test_a_peer_failing_in_a_later_round_is_left_out_whole(tmp_path, tiny_networks):
    from pabnn.converters.bench import OpenVinoPeer

    script, log = fake_openvino(tmp_path, fail_round=2)
    peer = OpenVinoPeer(sys.executable, script)
    result = bench_case("conv3x3", 1, 1, threads_list=(1,), repeats=1, rounds=3, openvino=peer)
    assert len(log.read_text().splitlines()) == 2  # not asked again after the failure
    assert peer.error.endswith("exited with code 1: the peer broke in round 2")
    assert result["openvino"]["error"] == peer.error and "openvino_ms" not in result["threads"][0]
    assert "its column is left out" in format_case(result)
