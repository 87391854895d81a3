"""pabnn.converters.torch: the prepared module computes the engine's PA semantics, trains, and
exports without refitting.

Thresholds and float rounding: the engine keeps activations in float32 between layers while a
float32 torch module sums in another order, so a value within a few float32 ulps of an activation
threshold may land on the other side, and that flip changes later layers by a whole step.
End-to-end equality is therefore checked where it is exact by construction: the prepared
module in float64 against the float64 reference executor (a flip would need a value within
float64 rounding of a threshold), and, per layer, the prepared module's layer against the
engine's kernel on the SAME input tensor (identical threshold decisions, so only the combine
rounds: PA_COMBINE_RTOL vs the float64 torch layer, FLOAT32_RTOL vs the float32 one).
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from models import assert_engine_matches_reference_per_op
from tolerances import FLOAT32_RTOL, FLOAT64_RTOL, PA_COMBINE_RTOL, assert_close

torch = pytest.importorskip("torch")

from pabnn.converters import convert  # noqa: E402
from pabnn.converters.torch import PALayer, ThresholdCode, export, prepare, threshold_code_reference  # noqa: E402
from pabnn.engine import ConversionError, run_reference  # noqa: E402
from pabnn.engine.ops import get_op  # noqa: E402


class SmallNet(torch.nn.Module):
    """Conv-BN-ReLU, MaxPool, two 3x3 convs (one strided), an inner Linear and the classifier:
    with the default policy the two inner convs and the inner Linear are binarized."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                        torch.nn.ReLU(), torch.nn.MaxPool2d(2))
        self.body = torch.nn.Sequential(torch.nn.Conv2d(8, 70, 3, stride=2, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(70, 16, 3, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16 * 4 * 4, 24), torch.nn.ReLU(),
                                        torch.nn.Linear(24, 5))

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.uniform(0, 1, size=(48, 1, 16, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def module():
    torch.manual_seed(0)
    net = SmallNet()
    with torch.no_grad():  # non-trivial BatchNorm statistics, folded by the converter
        net.stem[1].running_mean.uniform_(-0.2, 0.2)
        net.stem[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


def _prepare(module, images, weight_bases=2, act_bases=3):
    return prepare(module, calibration=images[:32], example_input=torch.from_numpy(images[:1]),
                   weight_bases=weight_bases, act_bases=act_bases, progress=False)


def _train_a_little(prepared, images, steps=5):
    """A few Adam steps on random labels: enough to move every kind of parameter."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (images.shape[0],), generator=generator)
    optimizer = torch.optim.Adam(prepared.parameters(), lr=2e-2)
    prepared.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(prepared(torch.from_numpy(images)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return prepared.eval()


def _pa_layers(prepared):
    return {name: prepared.layers[key] for name, key in prepared.keys.items()
            if isinstance(prepared.layers[key], PALayer)}


def _check_layers_on_engine_inputs(prepared, graph, feeds):
    """Per PA layer: torch layer(engine's input of that layer) == engine kernel == reference."""
    values = assert_engine_matches_reference_per_op(graph, feeds)
    nodes = {node.name: node for node in graph.nodes}
    layers = _pa_layers(prepared)
    assert sorted(layers) == sorted(name for name, node in nodes.items() if node.op in ("PAConv", "PALinear"))
    for name, layer in layers.items():
        node = nodes[name]
        inputs = values[node.inputs[0]]
        engine = values[node.outputs[0]]
        with torch.no_grad():
            single = layer(torch.from_numpy(inputs)).numpy()
            double = layer.double()(torch.from_numpy(inputs).double()).numpy()
        layer.float()
        assert_close(double, engine, PA_COMBINE_RTOL, f"{name}: float64 torch layer vs engine kernel")
        assert_close(single, engine, FLOAT32_RTOL, f"{name}: float32 torch layer vs engine kernel")


def test_prepare_keeps_the_policy_and_reproduces_convert(module, images):
    prepared = _prepare(module, images)
    converted = convert(module, calibration=images[:32], example_input=torch.from_numpy(images[:1]),
                        weight_bases=2, act_bases=3, progress=False)
    exported = export(prepared)
    ops = [node.op for node in exported.graph.nodes]
    assert ops.count("PAConv") == 2 and ops.count("PALinear") == 1 and ops[0] == "Conv" and ops[-1] == "Gemm"
    for mine, theirs in zip(exported.graph.nodes, converted.graph.nodes):
        assert mine.name == theirs.name and sorted(mine.params) == sorted(theirs.params)
        for key in mine.params:
            np.testing.assert_array_equal(mine.params[key], theirs.params[key], err_msg=f"{mine.name} {key}")


def test_fine_tuned_module_is_reproduced_by_the_engine(module, images):
    prepared = _train_a_little(_prepare(module, images), images[:32])
    before = export(_prepare(module, images)).graph
    model = convert(prepared)  # = export(prepared), no refitting
    changed = [node.name for node, old in zip(model.graph.nodes, before.nodes)
               if node.op == "PAConv" and not np.array_equal(node.params["weight_planes"], old.params["weight_planes"])]
    assert changed, "training moved no weight across a threshold: the test would not see a stale export"
    feeds = {"input": images[32:]}
    _check_layers_on_engine_inputs(prepared, model.graph, feeds)
    with torch.no_grad():
        double = prepared.double()(torch.from_numpy(images[32:]).double()).numpy()
    prepared.float()
    reference = run_reference(model.graph, feeds)[model.graph.outputs[0]]
    assert_close(double, reference, PA_COMBINE_RTOL, "float64 prepared module vs reference executor")


def test_every_pa_parameter_gets_a_gradient(module, images):
    prepared = _prepare(module, images)
    prepared.train()
    loss = prepared(torch.from_numpy(images[:16])).square().mean()
    loss.backward()
    for name, layer in _pa_layers(prepared).items():
        for parameter in ("weight", "weight_scales", "weight_offset", "act_thresholds", "act_steps", "bias"):
            grad = getattr(layer, parameter).grad
            assert grad is not None and torch.count_nonzero(grad) > 0, f"{name}.{parameter} has no gradient"
        assert layer.act_lowest.requires_grad is False and layer.weight_thresholds.requires_grad is False


@pytest.mark.parametrize("shape", [(3, 5), (2, 7, 4, 3), (1, 70, 5, 5)])
@pytest.mark.parametrize("act_bases", [1, 2, 5])
@pytest.mark.parametrize("lowest", [0.0, -0.7])
def test_threshold_code_equals_its_reference(shape, act_bases, lowest):
    """Values and the gradients of x, thresholds and steps, in float64, on random inputs plus
    inputs exactly on a threshold and on both ends of the clipping range (the gradient of x
    passes there); one step is negative."""
    rng = np.random.default_rng(act_bases)
    channels = shape[1]
    steps = rng.uniform(0.2, 0.6, act_bases)
    steps[-1] *= -0.5 if act_bases > 1 else 1.0
    thresholds = np.sort(rng.uniform(lowest, lowest + 1.5, (act_bases, channels)), axis=0)
    x = rng.uniform(lowest - 0.5, lowest + 2.0, shape)
    flat = x.reshape(shape[0], channels, -1)
    flat[0, :, 0] = thresholds[0]
    flat[-1, :, -1] = lowest
    flat[-1, 0, 0] = lowest + steps.sum()
    upstream = torch.from_numpy(rng.normal(size=shape))
    results = []
    for function in (ThresholdCode.apply, threshold_code_reference):
        inputs = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (x, thresholds, steps)]
        code = function(*inputs, torch.tensor([lowest], dtype=torch.float64))
        (code * upstream).sum().backward()
        results.append([code.detach().numpy()] + [v.grad.numpy() for v in inputs])
    for name, fused, composed in zip(("Qa(x)", "d/dx", "d/dthresholds", "d/dsteps"), *results):
        assert np.count_nonzero(composed), f"{name}: the twin's value is all zero, the comparison proves nothing"
        assert_close(fused, composed, FLOAT64_RTOL, f"ThresholdCode {name} vs threshold_code_reference")


def test_parameter_groups_put_every_parameter_once_and_the_weight_levels_apart(module, images):
    prepared = _prepare(module, images)
    others, levels = prepared.parameter_groups(1e-3, weight_level_rate=0.25)
    assert (others["lr"], levels["lr"]) == (1e-3, 2.5e-4)
    grouped = [id(p) for p in others["params"] + levels["params"]]
    assert sorted(grouped) == sorted(id(p) for p in prepared.parameters())
    expected = [id(getattr(layer, name)) for layer in _pa_layers(prepared).values()
                for name in ("weight_scales", "weight_offset")]
    assert sorted(id(p) for p in levels["params"]) == sorted(expected) and expected
    for rates in ((0.0, 0.1), (1e-3, -1.0), (float("nan"), 0.1)):
        with pytest.raises(ValueError, match="positive rates"):
            prepared.parameter_groups(*rates)


def test_export_refuses_other_objects():
    with pytest.raises(ConversionError, match="expects a PreparedModel"):
        export(torch.nn.Linear(2, 2))


def test_layer_forward_equals_the_reference_on_exact_threshold_values(module, images):
    """Inputs exactly on a threshold take the upper level (x >= s), in torch as in the engine."""
    prepared = _prepare(module, images)
    graph = export(prepared).graph
    name, layer = next(iter(_pa_layers(prepared).items()))
    node = next(n for n in graph.nodes if n.name == name)
    thresholds = node.params["act_thresholds"]
    x = np.broadcast_to(thresholds[0][None, :, None, None], (2, thresholds.shape[1], 8, 8)).copy()
    with torch.no_grad():
        actual = layer.double()(torch.from_numpy(x).double()).numpy()
    layer.float()
    expected = get_op(node.op, node.name).reference(node, [x.astype(np.float64)])[0]
    assert_close(actual, expected, PA_COMBINE_RTOL, "inputs on the first threshold")


def test_grouped_and_depthwise_layers_are_prepared_and_reproduced_by_the_engine(images):
    """A grouped (groups=4) and a depthwise 3x3 conv, binarized (binarize_depthwise=True), keep
    their groups in the prepared module: each torch layer equals the engine's kernel on the same
    input after a little training."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 12, 3, padding=1, groups=4), torch.nn.ReLU(),
        torch.nn.Conv2d(12, 12, 3, stride=2, padding=1, groups=12), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(12 * 8 * 8, 5)).eval()
    prepared = prepare(net, calibration=images[:32], example_input=torch.from_numpy(images[:1]), weight_bases=2,
                       act_bases=3, progress=False, binarize_depthwise=True, min_fan_in=1)
    prepared = _train_a_little(prepared, images[:32])
    graph = export(prepared).graph
    groups = sorted(node.attrs.get("group", 1) for node in graph.nodes if node.op == "PAConv")
    assert groups == [4, 12]
    _check_layers_on_engine_inputs(prepared, graph, {"input": images[32:]})


class MeanPooledNet(torch.nn.Module):
    """A tensor mean as the global pooling: exported as ReduceMean."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
                                            torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def test_reduce_mean_pooling_is_prepared_and_reproduced(images):
    torch.manual_seed(1)
    net = MeanPooledNet().eval()
    prepared = _prepare(net, images)
    model = export(prepared)
    assert "ReduceMean" in [node.op for node in model.graph.nodes]
    feeds = {"input": images[32:]}
    with torch.no_grad():
        double = prepared.double()(torch.from_numpy(images[32:]).double()).numpy()
    reference = run_reference(model.graph, feeds)[model.graph.outputs[0]]
    assert_close(double, reference, PA_COMBINE_RTOL, "float64 prepared module vs reference executor")


def test_prepare_keeps_torch_thread_count():
    # In a new process: numba's OpenMP runtime resets the thread count when its first parallel
    # kernel starts, which happens inside prepare's calibration.
    script = textwrap.dedent("""
        import numpy as np, torch
        from torch import nn
        from pabnn.converters.torch import prepare
        torch.set_num_threads(1)
        net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                            nn.Conv2d(8, 4, 3, padding=1)).eval()
        images = np.random.default_rng(0).normal(size=(8, 1, 6, 6)).astype(np.float32)
        prepare(net, calibration=images, example_input=torch.from_numpy(images[:1]), weight_bases=1, act_bases=1)
        print(torch.get_num_threads())
    """)
    environment = dict(os.environ, NUMBA_NUM_THREADS="2")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "1"


def test_export_and_convert_unwrap_a_parallel_wrapper(module, images):
    """DistributedDataParallel and DataParallel hold the PreparedModel as .module: export and
    convert take the wrapper (DDP itself: tests/test_torch_ddp.py)."""
    prepared = _prepare(module, images)
    layer = next(iter(_pa_layers(prepared).values()))
    with torch.no_grad():
        layer.bias.add_(0.5)  # the exports must hold the module's current parameters
    expected = export(prepared).graph
    assert any(np.array_equal(node.params.get("bias"), layer.bias.detach().numpy()) for node in expected.nodes)
    for model in (export(torch.nn.DataParallel(prepared)), convert(torch.nn.DataParallel(prepared))):
        for mine, theirs in zip(model.graph.nodes, expected.nodes):
            for key in mine.params:
                np.testing.assert_array_equal(mine.params[key], theirs.params[key], err_msg=f"{mine.name} {key}")
