import os
import sys

import numpy as np
import onnx
import pytest

# tests/ holds shared helpers (tolerances.py, models.py); make them importable as modules.
sys.path.insert(0, os.path.dirname(__file__))

# The bundled digits ResNet and its sample of calibration and evaluation digits, and one of its
# layers, for the calibration tests (test_calibration.py, test_methods.py).
DATA = os.path.join(os.path.dirname(__file__), "..", "examples", "data")
MODEL = os.path.join(DATA, "digits_resnet.onnx")
LAYER = "/stage2/conv1/Conv"  # stride 2, pads 1, input after a ReLU


@pytest.fixture(scope="module")
def sample():
    return np.load(os.path.join(DATA, "digits_sample.npz"))


@pytest.fixture(scope="module")
def float_graph():
    from pabnn.converters import fold_batchnorm, import_onnx
    return fold_batchnorm(import_onnx(onnx.load(MODEL)))


@pytest.fixture(scope="module")
def layer_data(sample, float_graph):
    """(float Conv node, its float input [32, ...], its float output) on 32 calibration digits."""
    from pabnn.converters.calibration import run_tensors
    node = next(n for n in float_graph.nodes if n.name == LAYER)
    values = run_tensors(float_graph, {"input": sample["calibration"][:32]}, [node.inputs[0], node.outputs[0]])
    return node, values[node.inputs[0]], values[node.outputs[0]]


def pytest_terminal_summary(terminalreporter):
    """Print how many cases the fuzz tests tried (tests/fuzzing.py), when any ran."""
    fuzzing = sys.modules.get("fuzzing")
    lines = fuzzing.summary() if fuzzing is not None else []
    if lines:
        terminalreporter.section("pabnn fuzz cases")
        for line in lines:
            terminalreporter.write_line(line)
