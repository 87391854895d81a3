"""Progress on stderr for the commands that can take a while (convert, report --calibration,
evaluate, export; bench in tests/test_bench.py): a bar unless --quiet, and stdout the same either
way. In-process through `main` on a small model, so each run costs what the command costs."""
import numpy as np
import onnx
import pytest
from small_models import calibration_images, small_onnx_model

from pabnn.engine.cli import main


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("progress")
    onnx.save(small_onnx_model(), folder / "model.onnx")
    np.save(folder / "calibration.npy", calibration_images(16, seed=1))
    np.save(folder / "x.npy", calibration_images(40, seed=2))
    np.save(folder / "y.npy", np.arange(40) % 2)
    assert main(["convert", str(folder / "model.onnx"), "-o", str(folder / "model.pab"), "--calibration",
                 str(folder / "calibration.npy"), "--weight-bases", "2", "--act-bases", "2", "--quiet"]) == 0
    return folder


def run(capsys, args):
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out, captured.err


def commands(folder):
    """(name, arguments without --quiet, what its bar says); outputs go to fresh paths per run."""
    return [
        ("convert", ["convert", folder / "model.onnx", "--calibration", folder / "calibration.npy",
                     "--weight-bases", "2", "--act-bases", "2", "--force", "-o"], "calibrating"),
        ("report", ["report", folder / "model.pab", "--calibration", folder / "x.npy", "--source",
                    folder / "model.onnx"], "running the float model"),
        ("evaluate", ["evaluate", folder / "model.pab", "--inputs", folder / "x.npy", "--labels", folder / "y.npy",
                      "--source", folder / "model.onnx"], "running the model"),
        ("export", ["export", folder / "model.pab", "--force", "-o"], "exporting"),
    ]


@pytest.mark.parametrize("index", range(4), ids=["convert", "report", "evaluate", "export"])
def test_progress_on_stderr_unless_quiet_and_the_same_stdout(workspace, capsys, index):
    name, args, label = commands(workspace)[index]
    outputs = {}
    for quiet in (False, True):
        arguments = list(args)
        if arguments[-1] == "-o":
            arguments.append(workspace / f"{name}-{quiet}.{'onnx' if name == 'export' else 'pab'}")
        out, err = run(capsys, arguments + (["--quiet"] if quiet else []))
        outputs[quiet] = out.replace(f"{name}-{quiet}", f"{name}-QUIET")
        if quiet:
            assert err == "", f"{name} --quiet wrote to stderr: {err!r}"
        else:
            assert label in err and "%" in err, f"{name}: no progress bar on stderr: {err!r}"
            assert label not in out
    assert outputs[False] == outputs[True]
    assert outputs[True].strip(), f"{name} printed no result"
