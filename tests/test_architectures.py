"""The architectures people binarize, built small in PyTorch, converted and checked end to end.

Each model has random weights and BatchNorm statistics from a few train-mode forward passes,
then runs in eval mode. For each:
- the float conversion (binarize=[]) equals torch within FLOAT32_RTOL;
- the PA(8,8) conversion (default layer policy: first and last layer and depthwise convs stay
  float, grouped convs are binarized) runs with every kernel equal to its reference, and is
  closer to torch than PA(1,1);
- with binarize_depthwise=True the grouped and depthwise convs of ResNeXt and MobileNetV2 become
  grouped PAConv layers whose kernels equal their references.
"""
import numpy as np
import pytest
import torch
from models import assert_engine_matches_reference_per_op
from tolerances import FLOAT32_RTOL, assert_close
from torch import nn

from pabnn.converters import convert, fold_batchnorm, import_onnx
from pabnn.converters.passes import choose_layers_to_binarize, is_depthwise
from pabnn.converters.torch_export import export_to_onnx

IMAGE = (3, 16, 16)


def conv_bn(in_channels, out_channels, kernel=3, stride=1, groups=1, activation=nn.ReLU):
    layers = [nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
              nn.BatchNorm2d(out_channels)]
    if activation is not None:
        layers.append(activation())
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1 -> 3x3 -> 1x1, expansion 4) with a 1x1 downsampling shortcut."""

    def __init__(self, in_channels, width, stride=1, groups=1):
        super().__init__()
        out_channels = 4 * width
        self.body = nn.Sequential(conv_bn(in_channels, width, 1), conv_bn(width, width, 3, stride, groups),
                                  conv_bn(width, out_channels, 1, activation=None))
        self.shortcut = nn.Identity() if stride == 1 and in_channels == out_channels else \
            conv_bn(in_channels, out_channels, 1, stride, activation=None)

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """Bottleneck ResNet; groups > 1 makes it a ResNeXt (grouped 3x3 convs)."""

    def __init__(self, groups=1, width=4):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.stages = nn.Sequential(Bottleneck(16, width, 1, groups), Bottleneck(4 * width, width, 1, groups),
                                    Bottleneck(4 * width, 2 * width, 2, groups))
        self.head = nn.Linear(8 * width, 10)

    def forward(self, x):
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.stages(self.stem(x)), 1), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project; residual when shapes allow.
    MobileNetV3 style: hard-swish and a squeeze-and-excitation gate with HardSigmoid."""

    def __init__(self, in_channels, out_channels, stride, expansion, v3=False):
        super().__init__()
        hidden = in_channels * expansion
        activation = nn.Hardswish if v3 else nn.ReLU6
        layers = [conv_bn(in_channels, hidden, 1, activation=activation),
                  conv_bn(hidden, hidden, 3, stride, groups=hidden, activation=activation)]
        if v3:
            layers.append(SqueezeExcitation(hidden))
        layers.append(conv_bn(hidden, out_channels, 1, activation=None))
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels, reduction=4):
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels // reduction, 1)
        self.expand = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x):
        scale = nn.functional.adaptive_avg_pool2d(x, 1)
        scale = nn.functional.hardsigmoid(self.expand(torch.relu(self.reduce(scale))))
        return x * scale


class MobileNet(nn.Module):
    def __init__(self, v3=False):
        super().__init__()
        activation = nn.Hardswish if v3 else nn.ReLU6
        self.features = nn.Sequential(
            conv_bn(3, 8, 3, 2, activation=activation),
            InvertedResidual(8, 8, 1, 2, v3), InvertedResidual(8, 12, 2, 3, v3), InvertedResidual(12, 12, 1, 3, v3),
            conv_bn(12, 32, 1, activation=activation))
        self.classifier = nn.Linear(32, 10)

    def forward(self, x):
        return self.classifier(self.features(x).mean(dim=(2, 3)))


class DenseBlock(nn.Module):
    def __init__(self, in_channels, growth, layers):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(in_channels + i * growth), nn.ReLU(),
                          nn.Conv2d(in_channels + i * growth, growth, 3, padding=1, bias=False))
            for i in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = torch.cat([x, layer(x)], dim=1)
        return x


class DenseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.block1 = DenseBlock(8, 4, 3)
        self.transition = nn.Sequential(nn.BatchNorm2d(20), nn.ReLU(), nn.Conv2d(20, 10, 1, bias=False),
                                        nn.AvgPool2d(2))
        self.block2 = DenseBlock(10, 4, 2)
        self.head = nn.Linear(18, 10)

    def forward(self, x):
        x = self.block2(self.transition(self.block1(self.stem(x))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(x), 1), 1))


def channel_shuffle(x, groups):
    batch, channels, height, width = x.size()
    x = x.view(batch, groups, channels // groups, height, width).transpose(1, 2).contiguous()
    return x.view(batch, channels, height, width)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit: split channels, transform one half, concatenate, shuffle."""

    def __init__(self, channels):
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(conv_bn(half, half, 1), conv_bn(half, half, 3, groups=half, activation=None),
                                    conv_bn(half, half, 1))

    def forward(self, x):
        left, right = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([left, self.branch(right)], dim=1), 2)


class ShuffleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 16, 3, 2), nn.MaxPool2d(3, 2, 1))
        self.units = nn.Sequential(ShuffleUnit(16), ShuffleUnit(16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.units(self.stem(x))
        return self.head(x.view(x.size(0), -1, x.size(2) * x.size(3)).mean(dim=2))


class VGG(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 8), conv_bn(8, 8), nn.MaxPool2d(2),
                                      conv_bn(8, 16), conv_bn(16, 16), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Dropout(0.5),
                                        nn.Linear(32, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


ARCHITECTURES = {
    "resnet-bottleneck": lambda: ResNet(),
    "resnext": lambda: ResNet(groups=2, width=8),
    "mobilenet-v2": lambda: MobileNet(),
    "mobilenet-v3": lambda: MobileNet(v3=True),
    "densenet": DenseNet,
    "shufflenet-v2": ShuffleNet,
    "vgg": VGG,
}


def build(name):
    """The model with random weights and BatchNorm statistics from a few train-mode passes, in eval mode."""
    torch.manual_seed(0)
    model = ARCHITECTURES[name]()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, *IMAGE))
    return model.eval()


def _data(seed, batch):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((batch, *IMAGE)).astype(np.float32))


def _torch_output(model, x):
    with torch.no_grad():
        return model(x).numpy()


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_float_conversion_equals_torch(name):
    model = build(name)
    calibration, test_input = _data(1, 8), _data(2, 5)
    converted = convert(model, example_input=calibration[:2], calibration=calibration.numpy(), binarize=[])
    (output,) = converted.session().run(None, {converted.graph.inputs[0].name: test_input.numpy()})
    assert_close(output, _torch_output(model, test_input), FLOAT32_RTOL, f"{name} float conversion vs torch")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_pa_conversion_kernels_equal_references_and_approach_torch(name):
    model = build(name)
    calibration, test_input = _data(3, 32), _data(4, 6)
    expected = _torch_output(model, test_input)
    errors = {}
    for bases in (1, 8):
        converted = convert(model, example_input=calibration[:2], calibration=calibration.numpy(),
                            weight_bases=bases, act_bases=bases, min_fan_in=1)
        assert any(node.op == "PAConv" for node in converted.graph.nodes), f"{name}: nothing was binarized"
        feeds = {converted.graph.inputs[0].name: test_input.numpy()}
        values = assert_engine_matches_reference_per_op(converted.graph, feeds)
        output = values[converted.graph.outputs[0]]
        errors[bases] = float(np.abs(output - expected).mean())
    assert errors[8] < errors[1], f"{name}: PA(8,8) error {errors[8]:.4g} is not below PA(1,1)'s {errors[1]:.4g}"


def _grouped_convs(graph):
    """{name: (group, depthwise)} of the grouped Conv nodes of a float graph."""
    return {node.name: (node.attrs["group"], is_depthwise(node)) for node in graph.nodes
            if node.op == "Conv" and node.attrs.get("group", 1) > 1}


@pytest.mark.parametrize("name,depthwise", [("resnext", False), ("mobilenet-v2", True), ("shufflenet-v2", True)])
def test_default_policy_binarizes_grouped_convs_and_keeps_depthwise_float(name, depthwise):
    graph = fold_batchnorm(import_onnx(export_to_onnx(build(name), _data(1, 2))))
    grouped = _grouped_convs(graph)
    assert grouped and all(flag == depthwise for _, flag in grouped.values()), grouped
    chosen = set(choose_layers_to_binarize(graph, min_fan_in=1))
    with_depthwise = set(choose_layers_to_binarize(graph, binarize_depthwise=True, min_fan_in=1))
    if depthwise:
        assert not chosen & set(grouped) and set(grouped) <= with_depthwise
    else:
        assert set(grouped) <= chosen and chosen == with_depthwise
    assert chosen <= with_depthwise


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnext", "mobilenet-v2"])
def test_grouped_and_depthwise_pa_conversion_kernels_equal_references(name):
    model = build(name)
    calibration, test_input = _data(5, 32), _data(6, 4)
    converted = convert(model, example_input=calibration[:2], calibration=calibration.numpy(), weight_bases=8,
                        act_bases=8, binarize_depthwise=True, min_fan_in=1)
    grouped = _grouped_convs(converted.float_graph)
    binary = {node.name: node for node in converted.graph.nodes if node.op == "PAConv"}
    assert grouped and set(grouped) <= set(binary), f"{name}: grouped convs {sorted(grouped)} not all binarized"
    for layer, (group, _) in grouped.items():
        assert binary[layer].attrs["group"] == group
    feeds = {converted.graph.inputs[0].name: test_input.numpy()}
    assert_engine_matches_reference_per_op(converted.graph, feeds)
