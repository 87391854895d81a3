"""PyTorch in: `convert(module, example_input=..., calibration=...)` on a small residual CNN.

The CNN has random weights and BatchNorm running statistics made nontrivial by a few forward
passes in train mode. Checked: the float conversion equals torch for another batch size than
the example's, the PA conversion's kernels equal their references op by op, more bases
approximate torch better, and export leaves the module as it found it.
"""
import numpy as np
import pytest
import torch
from models import PA_OPS, assert_engine_matches_reference_per_op
from tolerances import FLOAT32_RTOL, assert_close
from torch import nn

from pabnn.converters import convert
from pabnn.engine import ConversionError, Session, run_reference

IMAGE_SHAPE = (3, 16, 16)
EXAMPLE_BATCH = 2
TEST_BATCH = 5
CALIBRATION_BATCH = 48


class SmallResNet(nn.Module):
    """Conv-BN-ReLU-MaxPool stem, one residual block, a strided Conv-BN-ReLU, global average
    pooling and a Linear classifier. Channel counts (12, 20) are not multiples of 8."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
                                  nn.MaxPool2d(2))
        self.conv1 = nn.Conv2d(12, 12, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 12, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.down = nn.Sequential(nn.Conv2d(12, 20, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(20),
                                  nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(20, classes)

    def forward(self, x):
        x = self.stem(x)
        branch = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(branch)))
        x = self.down(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def batchnorms(module):
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


def make_model(seed=0):
    """A SmallResNet in eval mode with random weights, random BatchNorm affine parameters and
    running statistics gathered from a few train-mode passes over shifted random data."""
    torch.manual_seed(seed)
    model = SmallResNet()
    with torch.no_grad():
        for bn in batchnorms(model):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.3)
        model.train()
        for _ in range(4):
            model(1.5 * torch.randn(16, *IMAGE_SHAPE) + 0.3)
    model.eval()
    for bn in batchnorms(model):  # the statistics moved away from their initial 0 and 1
        assert bn.running_mean.abs().max() > 1e-2 and (bn.running_var - 1).abs().max() > 1e-2
    return model


def random_images(batch, seed):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((batch, *IMAGE_SHAPE)).astype(np.float32))


def torch_logits(model, x):
    with torch.no_grad():
        return model(x).numpy()


def relative_error(actual, expected):
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def example_input():
    return random_images(EXAMPLE_BATCH, seed=1)


@pytest.fixture(scope="module")
def calibration():
    return random_images(CALIBRATION_BATCH, seed=2).numpy()


@pytest.fixture(scope="module")
def test_input():
    return random_images(TEST_BATCH, seed=3)


def pa_convert(model, example_input, calibration, weight_bases, act_bases):
    return convert(model, example_input=example_input, calibration=calibration,
                   weight_bases=weight_bases, act_bases=act_bases).graph


def run_engine(graph, x):
    (logits,) = Session(graph).run(None, {graph.inputs[0].name: np.asarray(x)})
    return logits


@pytest.mark.slow
def test_float_conversion_equals_torch_on_another_batch_size(model, example_input, calibration, test_input):
    graph = convert(model, example_input=example_input, calibration=calibration, binarize=[]).graph
    assert not any(node.op in PA_OPS for node in graph.nodes)
    assert graph.inputs[0].shape == (None, *IMAGE_SHAPE)
    assert graph.metadata["converter"]["binarized"] == []
    expected = torch_logits(model, test_input)
    assert expected.shape == (TEST_BATCH, 10)
    assert_close(run_engine(graph, test_input), expected, FLOAT32_RTOL, "engine vs torch")
    reference = run_reference(graph, {graph.inputs[0].name: test_input.numpy()})
    assert_close(reference[graph.outputs[0]], expected, FLOAT32_RTOL, "reference vs torch")
    assert_close(run_engine(graph, test_input[:1]), expected[:1], FLOAT32_RTOL, "batch 1 vs torch")


@pytest.mark.slow
def test_default_pa_conversion_kernels_equal_their_references(model, example_input, calibration, test_input):
    converted = convert(model, example_input=example_input, calibration=calibration, weight_bases=4, act_bases=5)
    graph = converted.graph
    layers = [node for node in graph.nodes if node.op in ("Conv", "Gemm") + PA_OPS]
    # Default: every Conv/Gemm but the first and the last is binarized.
    assert [node.op for node in layers] == ["Conv", "PAConv", "PAConv", "PAConv", "Gemm"]
    assert graph.metadata["converter"]["binarized"] == [node.name for node in layers[1:-1]]
    assert [fit["layer"] for fit in converted.fits] == [node.name for node in layers[1:-1]]
    for node in layers[1:-1]:
        assert node.params["weight_planes"].shape[0] == 4 and node.params["act_steps"].shape == (5,)
    feeds = {graph.inputs[0].name: test_input.numpy()}
    values = assert_engine_matches_reference_per_op(graph, feeds)
    logits = run_engine(graph, test_input)
    assert logits.shape == (TEST_BATCH, 10) and np.all(np.isfinite(logits))
    np.testing.assert_array_equal(logits, values[graph.outputs[0]])


@pytest.mark.slow
def test_more_bases_approximate_torch_better(model, example_input, calibration, test_input):
    expected = torch_logits(model, test_input)
    coarse = run_engine(pa_convert(model, example_input, calibration, 1, 1), test_input)
    fine = run_engine(pa_convert(model, example_input, calibration, 8, 8), test_input)
    coarse_error, fine_error = relative_error(coarse, expected), relative_error(fine, expected)
    assert fine_error < coarse_error, f"PA(8,8) error {fine_error:.3g} >= PA(1,1) error {coarse_error:.3g}"


@pytest.mark.parametrize("example_input", [None, np.zeros((2, *IMAGE_SHAPE), np.float32)], ids=["missing", "numpy"])
def test_torch_module_needs_a_tensor_example_input(model, calibration, example_input):
    with pytest.raises(ConversionError) as error:
        convert(model, calibration=calibration, example_input=example_input)
    assert "example_input" in str(error.value) and "torch.Tensor" in str(error.value)
    assert not model.training


@pytest.mark.parametrize("training", [True, False])
def test_export_restores_the_training_flag_and_leaves_the_statistics(example_input, calibration, training):
    model = make_model(seed=4)
    model.train(training)
    state = {name: value.clone() for name, value in model.state_dict().items()}
    convert(model, example_input=example_input, calibration=calibration, binarize=[])
    assert all(module.training == training for module in model.modules())
    # Export runs in eval mode: a train-mode pass would have moved the BatchNorm statistics.
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), f"{name} changed during export"


def test_export_restores_mixed_training_flags(example_input, calibration):
    model = make_model(seed=5)
    model.train()
    model.stem[1].eval()  # a frozen BatchNorm, as in fine-tuning
    before = {name: module.training for name, module in model.named_modules()}
    convert(model, example_input=example_input, calibration=calibration, binarize=[])
    after = {name: module.training for name, module in model.named_modules()}
    assert after == before
