"""PA-aware fine-tuning in PyTorch: a trainable module that computes exactly the engine's PA
semantics, and its export to a .pab graph without refitting.

    prepared = prepare(module, weight_bases=2, act_bases=2, calibration=x, example_input=x[:1])
    ... train `prepared` with your own loop (it is a torch.nn.Module) ...
    model = export(prepared)          # or pabnn.converters.convert(prepared); model.save("m.pab")

`prepared.parameter_groups(rate)` gives the optimizer the weight levels at a hundredth of the rate
(see WEIGHT_LEVEL_RATE).

Distributed training: wrap the PreparedModel in torch.nn.parallel.DistributedDataParallel as any
module. All its state is in parameters and buffers (the weight thresholds and the lowest
activation levels are buffers), so DDP's broadcast at wrapping makes every rank start from rank
0's module even when the ranks calibrated on different data; `export` and `convert` take the
wrapper (examples/finetune_ddp.py, tests/test_torch_ddp.py).

`prepare` runs `convert` (the same import, BatchNorm folding, layer choice and calibration) and
mirrors the resulting graph node by node. Each PAConv/PALinear becomes a `PALayer`:

    forward   y = conv(Qw(W), Qa(pad0(x))) + b
              Qw(W)[o] = c[o] + sum_k d[k, o] sign(W[o] - t[o, k])      (sign(0) = +1)
              Qa(x)[c] = l0 + sum_j e[j] [x[c] >= s[j, c]]
    backward  straight-through: dQw/dW = 1; dQa/dx = 1 between l0 and l0 + sum_j e_j, else 0;
              ds[j, c] through the surrogate e_j sigmoid((x - s[j, c]) / tau_j), tau_j = e_j / 4.

Trainable: the latent weights W, the weight levels (d, c), the activation thresholds s and
steps e, the bias b, and the float layers' weights. Fixed: the weight thresholds t (the pieces of
Qw move because W moves) and the lowest activation level l0 (0 after a ReLU). Padding is applied
to the real-valued input before Qa, as in the engine (rule "zero_before_quantizer"), and the first
and last layers stay float exactly when `convert` keeps them float.

Only this module imports torch (an optional extra: pip install "pabnn[torch]").
"""
import re

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from pabnn.engine.bits import pack_weight_planes
from pabnn.engine.errors import ConversionError
from pabnn.engine.graph import Graph, Node

from .convert import ConvertedModel, convert

PA_OPS = ("PAConv", "PALinear")
# Adam moves every parameter by about its rate per step, whatever the scale of its gradient, and
# the weight levels d, c are an order of magnitude smaller than the thresholds, steps, biases and
# float weights (about 0.05 against 0.3-1 in the digits ResNet): at one common rate the first
# epoch scrambles the calibrated output scales. parameter_groups gives them this fraction of it
# (digits ResNet at PA(2,2), KL to float on held-back training digits after 30 epochs, one draw
# each: 1/100 did better than 1, 1/10 and 1/1000).
WEIGHT_LEVEL_RATE = 0.01
# Width of the sigmoid surrogate of a threshold step, as a fraction of that step.
SURROGATE_WIDTH = 0.25


def prepare(module, *, calibration, weight_bases=4, act_bases=5, example_input=None, **convert_options):
    """A `PreparedModel` initialised from `convert(module, ...)` (same arguments; module may also
    be an ONNX path or onnx.ModelProto). Its forward equals the converted model's output.

    torch's thread count is the same afterwards: numba's OpenMP runtime, which torch shares,
    resets the calling thread's count when the first parallel kernel of the process starts
    (during calibration), and training would then run with every core's threads."""
    threads = torch.get_num_threads()
    try:
        converted = convert(module, calibration=calibration, weight_bases=weight_bases, act_bases=act_bases,
                            example_input=example_input, **convert_options)
    finally:
        torch.set_num_threads(threads)
    return PreparedModel(converted)


def export(prepared):
    """The `ConvertedModel` of a (fine-tuned) `PreparedModel`: its parameters written into PA
    nodes as they are, without refitting (weight planes are sign(W - t) of the latent weights).
    A PreparedModel wrapped in DistributedDataParallel or DataParallel is exported as the module
    it wraps (under DDP every rank holds the same parameters: export on one of them)."""
    prepared = unwrap(prepared)
    if not isinstance(prepared, PreparedModel):
        raise ConversionError(f"export expects a PreparedModel from pabnn.converters.torch.prepare, "
                              f"found {type(prepared).__name__}")
    return prepared.export()


def unwrap(module):
    """The module inside a DistributedDataParallel or DataParallel wrapper; others as they are."""
    if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return module.module
    return module


class PreparedModel(nn.Module):
    """A pabnn Graph as a trainable torch module (see the module docstring).

    forward(x) takes the graph's single input [batch, ...] and returns its first output.
    """

    is_pabnn_prepared = True

    def __init__(self, converted):
        super().__init__()
        graph = converted.graph
        if len(graph.inputs) != 1:
            raise ConversionError(f"prepare supports single-input models, found inputs "
                                  f"{[i.name for i in graph.inputs]}")
        self.input_name = graph.inputs[0].name
        self.output_names = list(graph.outputs)
        self.graph_inputs = graph.inputs
        self.metadata = dict(graph.metadata)
        self.nodes = [Node(n.op, n.name, list(n.inputs), list(n.outputs), dict(n.attrs), {}) for n in graph.nodes]
        self.layers = nn.ModuleDict()
        self.keys = {}
        for node in graph.nodes:
            layer = _make_layer(node, converted.latent_weights.get(node.name))
            if layer is not None:
                key = _module_key(node.name, self.layers)
                self.keys[node.name] = key
                self.layers[key] = layer

    def forward(self, x):
        values = {self.input_name: x}
        for node in self.nodes:
            inputs = [values[name] for name in node.inputs]
            layer = self.layers[self.keys[node.name]] if node.name in self.keys else None
            values[node.outputs[0]] = _apply(node, layer, inputs)
        return values[self.output_names[0]]

    def parameter_groups(self, learning_rate, weight_level_rate=WEIGHT_LEVEL_RATE):
        """Parameter groups for a torch optimizer: the PA layers' weight levels (weight_scales,
        weight_offset) at learning_rate * weight_level_rate, every other parameter at learning_rate.

            optimizer = torch.optim.Adam(prepared.parameter_groups(1e-3))
        """
        if not learning_rate > 0 or not weight_level_rate > 0:
            raise ValueError(f"parameter_groups expects positive rates, found learning_rate={learning_rate!r}, "
                             f"weight_level_rate={weight_level_rate!r}")
        levels, others = [], []
        for layer in self.layers.values():
            for name, parameter in layer.named_parameters():
                is_level = isinstance(layer, PALayer) and name in ("weight_scales", "weight_offset")
                (levels if is_level else others).append(parameter)
        return [{"params": others, "lr": learning_rate},
                {"params": levels, "lr": learning_rate * weight_level_rate}]

    def export(self):
        """ConvertedModel with this module's current parameters (float32), no refitting."""
        nodes = []
        for node in self.nodes:
            layer = self.layers[self.keys[node.name]] if node.name in self.keys else None
            params = layer.export_params() if layer is not None else {}
            nodes.append(Node(node.op, node.name, list(node.inputs), list(node.outputs), dict(node.attrs), params))
        metadata = dict(self.metadata, fine_tuned=True)
        graph = Graph(self.graph_inputs, list(self.output_names), nodes, metadata)
        graph.infer_shapes()
        return ConvertedModel(graph, list(self.metadata.get("fits", [])))


class PALayer(nn.Module):
    """One PAConv (or PALinear, as a 1x1 conv) with the forward/backward of the module docstring."""

    def __init__(self, node, latent):
        super().__init__()
        p = node.params
        if node.attrs.get("act_coding", "thermometer") != "thermometer":
            raise ConversionError(f"node {node.name!r}: fine-tuning supports the thermometer activation code only, "
                                  f"found act_coding {node.attrs['act_coding']!r}")
        self.op = node.op
        self.strides = node.attrs.get("strides", [1, 1])
        self.pads = node.attrs.get("pads", [0, 0, 0, 0])
        self.dilations = node.attrs.get("dilations", [1, 1])
        self.group = node.attrs.get("group", 1)
        weight = np.asarray(latent["weight"], dtype=np.float32)
        self.weight = nn.Parameter(torch.from_numpy(weight.copy()))
        self.register_buffer("weight_thresholds", torch.from_numpy(np.asarray(latent["thresholds"], np.float64).copy()))
        self.weight_scales = nn.Parameter(torch.from_numpy(p["weight_scales"].copy()))
        self.weight_offset = nn.Parameter(torch.from_numpy(p["weight_offset"].copy()))
        self.act_thresholds = nn.Parameter(torch.from_numpy(p["act_thresholds"].copy()))
        self.act_steps = nn.Parameter(torch.from_numpy(p["act_steps"].copy()))
        self.register_buffer("act_lowest", torch.from_numpy(p["act_lowest"].copy()))
        self.bias = nn.Parameter(torch.from_numpy(p["bias"].copy()))
        signs = self._signs().numpy()
        if not np.array_equal(pack_weight_planes(signs), p["weight_planes"]):
            raise ConversionError(f"node {node.name!r}: the latent weights do not reproduce its weight planes")

    def _signs(self):
        """sign(W - t_k) as bool [M, O, C, kh, kw] (True = +1), compared in float64."""
        weight = self.weight.detach().double()
        thresholds = self.weight_thresholds.T.reshape(self.weight_thresholds.shape[1], -1, 1, 1, 1)
        return weight.unsqueeze(0) >= thresholds

    def quantized_weight(self):
        """Qw(W) [O, C, kh, kw] with the straight-through gradient dQw/dW = 1."""
        signs = torch.where(self._signs(), 1.0, -1.0).to(self.weight.dtype)
        hard = self.weight_offset[:, None, None, None] + torch.einsum("mo,mocij->ocij", self.weight_scales, signs)
        return hard + (self.weight - self.weight.detach())

    def quantized_input(self, x):
        """Qa(x) with the straight-through and surrogate gradients of the module docstring."""
        return ThresholdCode.apply(x, self.act_thresholds.to(x.dtype), self.act_steps.to(x.dtype),
                                   self.act_lowest.to(x.dtype))

    def forward(self, x):
        linear = self.op == "PALinear"
        if linear:
            x = x[:, :, None, None]
        top, left, bottom, right = self.pads
        padded = functional.pad(x, (left, right, top, bottom))
        y = functional.conv2d(self.quantized_input(padded), self.quantized_weight().to(x.dtype),
                              self.bias.to(x.dtype), stride=tuple(self.strides), dilation=tuple(self.dilations),
                              groups=self.group)
        return y[:, :, 0, 0] if linear else y

    def export_params(self):
        return {
            "weight_planes": pack_weight_planes(self._signs().numpy()),
            "weight_scales": _float32(self.weight_scales),
            "weight_offset": _float32(self.weight_offset),
            "act_thresholds": _float32(self.act_thresholds),
            "act_steps": _float32(self.act_steps),
            "act_lowest": _float32(self.act_lowest),
            "bias": _float32(self.bias),
        }


class ThresholdCode(torch.autograd.Function):
    """Qa(x)[b, c, ...] = l0 + sum_j e[j] [x >= s[j, c]] in one pass, with the gradients of the
    module docstring written out (the composition of torch ops that defines them stores a
    full-size tensor per op and step; this stores x alone):

        dQa/dx      = 1 where min(l0, top) <= x <= max(l0, top), top = l0 + sum_j e[j]; else 0
        dQa/ds[j,c] = -e[j] sigmoid'(z) / tau_j,  z = (x - s[j, c]) / tau_j,  tau_j = 0.25 |e[j]|
        dQa/de[j]   = [x >= s[j, c]]

    x: [batch, C, ...]; thresholds s: [N, C]; steps e: [N]; lowest l0: [1], all of x's dtype.
    """

    @staticmethod
    def forward(ctx, x, thresholds, steps, lowest):
        ctx.save_for_backward(x, thresholds, steps, lowest)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        code = torch.full_like(x, float(lowest[0]))
        for j in range(steps.shape[0]):
            code.add_((x >= thresholds[j].reshape(shape)).to(x.dtype), alpha=float(steps[j]))
        return code

    @staticmethod
    def backward(ctx, grad):
        x, thresholds, steps, lowest = ctx.saved_tensors
        shape = (1, -1) + (1,) * (x.ndim - 2)
        reduce_axes = (0,) + tuple(range(2, x.ndim))
        low, top = float(lowest[0]), float(lowest[0]) + float(steps.sum())
        inside = (x >= min(low, top)) & (x <= max(low, top))
        grad_x = grad * inside.to(grad.dtype)
        grad_thresholds = torch.empty_like(thresholds)
        grad_steps = torch.empty_like(steps)
        for j in range(steps.shape[0]):
            width = SURROGATE_WIDTH * max(abs(float(steps[j])), 1e-6)
            slope = torch.sigmoid((x - thresholds[j].reshape(shape)) / width)
            slope = slope * (1 - slope)
            grad_thresholds[j] = -(grad * slope).sum(dim=reduce_axes) * (float(steps[j]) / width)
            grad_steps[j] = (grad * (x >= thresholds[j].reshape(shape)).to(grad.dtype)).sum()
        return grad_x, grad_thresholds, grad_steps, None


def threshold_code_reference(x, thresholds, steps, lowest):
    """The reference of ThresholdCode: the same Qa and gradients as a composition of
    differentiable torch ops (slower, and it keeps a full-size tensor per op for the backward)."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    hard = lowest.reshape((1,) * x.ndim).expand_as(x).clone()
    soft = torch.zeros_like(x)
    for j in range(steps.shape[0]):
        threshold = thresholds[j].reshape(shape)
        hard = hard + steps[j] * (x >= threshold).to(x.dtype)
        width = SURROGATE_WIDTH * steps[j].detach().abs().clamp_min(1e-6)
        soft = soft + steps[j].detach() * torch.sigmoid((x.detach() - threshold) / width)
    low, top = float(lowest[0]), float(lowest[0]) + float(steps.detach().sum())
    clipped = x.clamp(min(low, top), max(low, top))
    return hard + (clipped - clipped.detach()) + (soft - soft.detach())


class FloatLayer(nn.Module):
    """The trainable parameters of a float node (Conv, Gemm, ChannelAffine): exported as float32."""

    def __init__(self, node):
        super().__init__()
        self.names = sorted(node.params)
        for name in self.names:
            self.register_parameter(name, nn.Parameter(torch.from_numpy(np.array(node.params[name], np.float32))))

    def export_params(self):
        return {name: _float32(getattr(self, name)) for name in self.names}


def _make_layer(node, latent):
    if node.op in PA_OPS:
        rule = node.attrs.get("padding_rule", "zero_before_quantizer")
        if latent is None or rule != "zero_before_quantizer":
            raise ConversionError(f"node {node.name!r}: only layers that convert() binarized can be fine-tuned; this "
                                  f"one was imported already binary (padding rule {rule!r}): keep_float it or "
                                  "fine-tune the source model")
        return PALayer(node, latent)
    if node.op in _FLOAT_OPS:
        return FloatLayer(node) if node.params else None
    raise ConversionError(f"node {node.name!r}: op {node.op!r} has no torch form for fine-tuning; "
                          f"supported: {sorted(PA_OPS + tuple(_FLOAT_OPS))}")


def _apply(node, layer, inputs):
    if node.op in PA_OPS:
        return layer(inputs[0])
    return _FLOAT_OPS[node.op](node, layer, inputs)


def _conv(node, layer, inputs):
    x = inputs[0]
    top, left, bottom, right = node.attrs.get("pads", [0, 0, 0, 0])
    return functional.conv2d(functional.pad(x, (left, right, top, bottom)), layer.weight.to(x.dtype),
                             layer.bias.to(x.dtype), stride=tuple(node.attrs.get("strides", [1, 1])),
                             dilation=tuple(node.attrs.get("dilations", [1, 1])), groups=node.attrs.get("group", 1))


def _gemm(node, layer, inputs):
    return functional.linear(inputs[0], layer.weight.to(inputs[0].dtype), layer.bias.to(inputs[0].dtype))


def _channel_affine(node, layer, inputs):
    x = inputs[0]
    extra = (1,) * (x.ndim - 2)
    return x * layer.scale.to(x.dtype).reshape((1, -1) + extra) + layer.shift.to(x.dtype).reshape((1, -1) + extra)


def _pool(node, layer, inputs):
    x = inputs[0]
    top, left, bottom, right = node.attrs.get("pads", [0, 0, 0, 0])
    kernel = tuple(node.attrs["kernel_shape"])
    strides = tuple(node.attrs.get("strides", [1, 1]))
    if node.attrs.get("dilations", [1, 1]) != [1, 1]:
        raise ConversionError(f"node {node.name!r}: dilated pooling has no torch form for fine-tuning")
    if node.op == "MaxPool":
        return functional.max_pool2d(functional.pad(x, (left, right, top, bottom), value=-torch.inf), kernel, strides)
    padded = functional.pad(x, (left, right, top, bottom))
    if node.attrs.get("count_include_pad", 0) or not any((top, left, bottom, right)):
        return functional.avg_pool2d(padded, kernel, strides)
    counts = functional.avg_pool2d(functional.pad(torch.ones_like(x[:1, :1]), (left, right, top, bottom)), kernel,
                                   strides)
    return functional.avg_pool2d(padded, kernel, strides) / counts


def _reshape(node, layer, inputs):
    return inputs[0].reshape((inputs[0].shape[0],) + tuple(node.attrs["shape"]))


_FLOAT_OPS = {
    "Conv": _conv,
    "Gemm": _gemm,
    "ChannelAffine": _channel_affine,
    "Relu": lambda node, layer, inputs: functional.relu(inputs[0]),
    "Add": lambda node, layer, inputs: inputs[0] + inputs[1],
    "Flatten": lambda node, layer, inputs: inputs[0].flatten(1),
    "Reshape": _reshape,
    "GlobalAveragePool": lambda node, layer, inputs: inputs[0].mean(dim=(2, 3), keepdim=True),
    "ReduceMean": lambda node, layer, inputs: inputs[0].mean(dim=tuple(node.attrs["axes"]),
                                                             keepdim=bool(node.attrs.get("keepdims", 1))),
    "MaxPool": _pool,
    "AveragePool": _pool,
    "Softmax": lambda node, layer, inputs: torch.softmax(inputs[0], dim=node.attrs.get("axis", -1)),
}


def _float32(tensor):
    return np.ascontiguousarray(tensor.detach().cpu().numpy().astype(np.float32))


def _module_key(name, existing):
    key = re.sub(r"\W", "_", name).strip("_") or "node"
    while key in existing:
        key += "_"
    return key
