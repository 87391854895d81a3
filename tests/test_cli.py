"""The `pabnn` command line, end to end in subprocesses: convert, run, report, ops, and errors.

Every failure must exit non-zero with one line on stderr ("pabnn <command>: error: ...") and no
traceback, and must leave existing files alone.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import pabnn.engine
from pabnn.engine import load_graph, model_report, registered_ops
from pabnn.engine.pab_format import _PREFIX

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"
ONNX_MODEL = EXAMPLES / "digits_resnet.onnx"
SAMPLE = EXAMPLES / "digits_sample.npz"
WEIGHT_BASES = 2
ACT_BASES = 2


def run_cli(*args, cwd, executable=None):
    """Run the CLI (`python -m pabnn.engine.cli`, or a given console script) and capture its output."""
    command = [executable] if executable else [sys.executable, "-m", "pabnn.engine.cli"]
    return subprocess.run(command + [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300)


def assert_succeeded(result):
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr


def assert_clean_error(result, command, *fragments):
    """Non-zero exit, exactly one line on stderr naming the command, no traceback."""
    assert result.returncode != 0, f"expected a failure\nstdout:\n{result.stdout}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"pabnn {command}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def tiny_onnx(op_type, path):
    """A one-node ONNX model x [batch, 1, 4, 4] -> op_type -> y."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1, 4, 4])
    graph = helper.make_graph([helper.make_node(op_type, ["x"], ["y"], name=f"the_{op_type.lower()}")],
                              "tiny", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def blob_entries(path):
    """The blob entries of a .pab file's header."""
    data = Path(path).read_bytes()
    header_length = _PREFIX.unpack_from(data)[3]
    return json.loads(data[_PREFIX.size:_PREFIX.size + header_length])["blobs"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder holding the inputs of the commands: calibration and evaluation .npy files, a copy
    of the example ONNX model, and the .pab that `pabnn convert` writes from them."""
    folder = tmp_path_factory.mktemp("cli")
    with np.load(SAMPLE) as sample:
        np.save(folder / "calib.npy", sample["calibration"][:64])
        np.save(folder / "x.npy", sample["evaluation"][:8])
    shutil.copyfile(ONNX_MODEL, folder / "model.onnx")
    result = run_cli("convert", "model.onnx", "-o", "model.pab", "--calibration", "calib.npy",
                   "--weight-bases", WEIGHT_BASES, "--act-bases", ACT_BASES, cwd=folder)
    return {"folder": folder, "convert": result, "model": folder / "model.pab"}


@pytest.fixture(scope="module")
def damaged_model(work):
    """model.pab with one bit flipped inside its first blob."""
    data = bytearray(work["model"].read_bytes())
    first = blob_entries(work["model"])[0]
    data[first["offset"] + 1] ^= 0x04
    path = work["folder"] / "damaged.pab"
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def report_json(work):
    result = run_cli("report", "model.pab", "--json", cwd=work["folder"])
    assert_succeeded(result)
    return json.loads(result.stdout)


# ---- the commands -----------------------------------------------------------------------------

def test_convert_writes_a_pab_file(work):
    result = work["convert"]
    assert_succeeded(result)
    graph = load_graph(work["model"])
    binarized = [node for node in graph.nodes if node.op == "PAConv"]
    assert binarized, "convert binarized no layer"
    for node in binarized:
        assert node.params["weight_planes"].shape[0] == WEIGHT_BASES
        assert node.params["act_steps"].shape[0] == ACT_BASES
    converter = graph.metadata["converter"]
    assert (converter["weight_bases"], converter["act_bases"]) == (WEIGHT_BASES, ACT_BASES)
    assert converter["calibration_samples"] == 64
    size = work["model"].stat().st_size
    assert f"wrote model.pab ({size:,} bytes, {len(binarized)} binarized layers)" in result.stdout
    assert sorted(p.name for p in work["folder"].iterdir() if p.name.startswith(".tmp-")) == []


def test_run_writes_exactly_the_session_output(work):
    folder = work["folder"]
    result = run_cli("run", "model.pab", "--input", "x.npy", "--output", "y.npy", cwd=folder)
    assert_succeeded(result)
    got = np.load(folder / "y.npy")
    session = pabnn.engine.load(work["model"])
    (expected,) = session.run(None, {session.input_names[0]: np.load(folder / "x.npy")})
    assert got.dtype == np.float32 and got.shape == (8, 10)
    assert got.tobytes() == expected.tobytes()
    assert "wrote y.npy" in result.stdout


def test_run_with_amx_off_gives_the_same_output_and_on_needs_amx(work):
    from pabnn.engine import amx

    folder = work["folder"]
    result = run_cli("run", "model.pab", "--input", "x.npy", "--output", "y_off.npy", "--amx", "off", cwd=folder)
    assert_succeeded(result)
    session = pabnn.engine.load(work["model"], amx=False)
    (expected,) = session.run(None, {session.input_names[0]: np.load(folder / "x.npy")})
    assert np.load(folder / "y_off.npy").tobytes() == expected.tobytes()
    result = run_cli("run", "model.pab", "--input", "x.npy", "--output", "y_on.npy", "--amx", "on", cwd=folder)
    if amx.available():
        assert_succeeded(result)
    else:
        assert_clean_error(result, "run", "--amx on: AMX-INT8 tiles are not available here")
        assert not (folder / "y_on.npy").exists()


def test_report_prints_a_table_with_pa_rows_and_totals(work):
    result = run_cli("report", "model.pab", cwd=work["folder"])
    assert_succeeded(result)
    graph = load_graph(work["model"])
    binarized = sum(node.op == "PAConv" for node in graph.nodes)
    rows = [line for line in result.stdout.splitlines() if f"PA({WEIGHT_BASES},{ACT_BASES})" in line]
    assert len(rows) == binarized
    assert all(" PAConv " in row for row in rows)
    assert f"binary layers: {binarized} of {len(graph.nodes)}" in result.stdout
    size = work["model"].stat().st_size
    assert f"file on disk: {size:,} bytes" in result.stdout
    assert "OPs = FLOPs + BOPs/64" in result.stdout


def test_report_json_accounts_for_every_byte(work, report_json):
    totals = report_json["totals"]
    assert totals["file_bytes"] == work["model"].stat().st_size
    assert totals["stored_bytes"] + totals["header_and_padding_bytes"] == totals["file_bytes"]
    assert totals["stored_bytes"] == sum(entry["nbytes"] for entry in blob_entries(work["model"]))
    assert totals["stored_bytes"] == sum(row["stored_bytes"] for row in report_json["layers"])
    assert totals["memory_saving"] > 1
    assert totals["ops_saving"] > 1
    assert totals["binary_layers"] == sum(row["kind"] == f"PA({WEIGHT_BASES},{ACT_BASES})"
                                          for row in report_json["layers"]) > 0


def test_ops_lists_the_registered_ops(work):
    result = run_cli("ops", cwd=work["folder"])
    assert_succeeded(result)
    names = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    assert {"PAConv", "Conv"} <= set(names)
    assert names == [op.name for op in registered_ops()]


@pytest.mark.skipif(shutil.which("pabnn") is None, reason="the pabnn console script is not on PATH "
                                                          "(package not installed with pip install -e .)")
def test_console_script_report_matches_the_library(work):
    result = run_cli("report", "model.pab", "--json", cwd=work["folder"], executable=shutil.which("pabnn"))
    assert_succeeded(result)
    expected = model_report(load_graph(work["model"]), file_bytes=work["model"].stat().st_size)
    assert json.loads(result.stdout) == json.loads(json.dumps(expected))


# ---- errors -----------------------------------------------------------------------------------

def test_convert_refuses_to_replace_an_existing_output_without_force(work, tmp_path):
    (tmp_path / "out.pab").write_bytes(b"keep me")
    result = run_cli("convert", work["folder"] / "model.onnx", "-o", "out.pab",
                   "--calibration", work["folder"] / "calib.npy", cwd=tmp_path)
    assert_clean_error(result, "convert", "out.pab exists", "--force")
    assert (tmp_path / "out.pab").read_bytes() == b"keep me"


@pytest.mark.parametrize("overwritten", ["model", "calibration"])
def test_convert_refuses_to_overwrite_its_inputs_even_with_force(work, tmp_path, overwritten):
    shutil.copyfile(work["folder"] / "model.onnx", tmp_path / "model.onnx")
    shutil.copyfile(work["folder"] / "calib.npy", tmp_path / "calib.npy")
    before = {name: (tmp_path / name).read_bytes() for name in ("model.onnx", "calib.npy")}
    output = {"model": "model.onnx", "calibration": "calib.npy"}[overwritten]
    # "./" spells the same path differently: the check must compare real paths, not strings.
    result = run_cli("convert", "model.onnx", "-o", f"./{output}", "--calibration", "calib.npy", "--force",
                   cwd=tmp_path)
    assert_clean_error(result, "convert", "would overwrite an input")
    assert {name: (tmp_path / name).read_bytes() for name in before} == before


def test_run_refuses_to_overwrite_its_input_even_with_force(work, tmp_path):
    shutil.copyfile(work["folder"] / "x.npy", tmp_path / "x.npy")
    before = (tmp_path / "x.npy").read_bytes()
    result = run_cli("run", work["model"], "--input", "x.npy", "--output", "x.npy", "--force", cwd=tmp_path)
    assert_clean_error(result, "run", "would overwrite an input")
    assert (tmp_path / "x.npy").read_bytes() == before


def test_run_refuses_to_replace_an_existing_output_without_force(work, tmp_path):
    (tmp_path / "y.npy").write_bytes(b"keep me")
    result = run_cli("run", work["model"], "--input", work["folder"] / "x.npy", "--output", "y.npy", cwd=tmp_path)
    assert_clean_error(result, "run", "y.npy exists", "--force")
    assert (tmp_path / "y.npy").read_bytes() == b"keep me"


def test_convert_with_a_missing_calibration_file(work, tmp_path):
    result = run_cli("convert", work["folder"] / "model.onnx", "-o", "out.pab", "--calibration", "absent.npy",
                   cwd=tmp_path)
    assert_clean_error(result, "convert", "calibration absent.npy", "not a readable .npy file")
    assert not (tmp_path / "out.pab").exists()


def test_convert_with_a_calibration_of_the_wrong_shape(work, tmp_path):
    np.save(tmp_path / "calib.npy", np.zeros((4, 1, 14, 14), dtype=np.float32))
    result = run_cli("convert", work["folder"] / "model.onnx", "-o", "out.pab", "--calibration", "calib.npy",
                   cwd=tmp_path)
    assert_clean_error(result, "convert", "calibration", "1, 28, 28]", "[4, 1, 14, 14]")
    assert not (tmp_path / "out.pab").exists()


def test_run_with_an_input_of_the_wrong_shape(work, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 28, 28), dtype=np.float32))
    result = run_cli("run", work["model"], "--input", "x.npy", "--output", "y.npy", cwd=tmp_path)
    assert_clean_error(result, "run", "expected shape", "[2, 28, 28]")
    assert not (tmp_path / "y.npy").exists()


@pytest.mark.parametrize("command", ["run", "report"])
def test_damaged_model_is_reported_without_a_traceback(work, damaged_model, tmp_path, command):
    if command == "run":
        result = run_cli("run", damaged_model, "--input", work["folder"] / "x.npy", "--output", "y.npy", cwd=tmp_path)
    else:
        result = run_cli("report", damaged_model, cwd=tmp_path)
    assert_clean_error(result, command, str(damaged_model), "blobs[0] checksum mismatch")
    assert result.stdout == ""
    assert not (tmp_path / "y.npy").exists()


def test_convert_an_unsupported_onnx_op(tmp_path):
    tiny_onnx("Hardmax", tmp_path / "hardmax.onnx")
    np.save(tmp_path / "calib.npy", np.zeros((2, 1, 4, 4), dtype=np.float32))
    result = run_cli("convert", "hardmax.onnx", "-o", "hardmax.pab", "--calibration", "calib.npy", cwd=tmp_path)
    assert_clean_error(result, "convert", "'the_hardmax'", "Hardmax", "not supported", "supported ops:")
    assert not (tmp_path / "hardmax.pab").exists()


def test_run_with_an_invalid_thread_count(work, tmp_path):
    result = run_cli("run", work["model"], "--input", work["folder"] / "x.npy", "--output", "y.npy",
                     "--threads", 0, cwd=tmp_path)
    # argparse rejects it before any work: usage plus one error line, exit 2, no traceback.
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--threads: must be a positive integer, found 0" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "y.npy").exists()


def test_run_into_a_missing_folder(work, tmp_path):
    result = run_cli("run", work["model"], "--input", work["folder"] / "x.npy", "--output", "absent/y.npy",
                   cwd=tmp_path)
    assert_clean_error(result, "run", "absent")


def test_convert_into_a_missing_folder(tmp_path):
    tiny_onnx("Relu", tmp_path / "relu.onnx")
    np.save(tmp_path / "calib.npy", np.zeros((2, 1, 4, 4), dtype=np.float32))
    result = run_cli("convert", "relu.onnx", "-o", "absent/relu.pab", "--calibration", "calib.npy", cwd=tmp_path)
    assert_clean_error(result, "convert", "absent")


def test_operator_docs_are_generated_from_the_registries():
    from pabnn.engine.cli import operators_markdown

    committed = (Path(__file__).parent.parent / "docs" / "operators.md").read_text()
    assert committed == operators_markdown(), "docs/operators.md is stale: run `pabnn ops --markdown > docs/operators.md`"
