"""BinaryConv (plan-only): the binary convolution of a PAConv over its input's bit-planes, with its
epilogue, and optionally the bit-planes of the binary layers its output goes to.

A Session's plan (engine/plan.py) lowers each PAConv into a PackPlanes step (or planes a
BinaryConv before it wrote) and a BinaryConv step; the kernel is engine/ops/_binary_conv_kernel.py,
run through pa_conv.binary_conv_runner.

config (BinaryConvConfig):
- layer: the PAConv node it computes, in its stored form with the epilogue fused in
  (engine/fusion.py: attribute activation, a residual second input);
- planes_pads: the pads of the planes it reads (packed by pa_conv.input_layout(layer) but padded
  as much as or more than the layer on every side: planes shared with a reader that pads more; it
  reads its own padded input from inside them);
- output_layout: None, or the PlanesLayout (engine/bits.py) of the readers its output goes to:
  it then writes their planes, exactly what packing its float32 output would give;
- writes_float: with output_layout, whether it writes the float32 output as well (other nodes read
  it: a residual Add fused into a later conv, a float op, a reader that packs otherwise).
Inputs: [planes, optional residual float32]. Outputs: [float32 y], [planes] or [y, planes]; a
planes tensor keeps, in the plan's shapes, the shape of the float tensor it codes.
"""
from dataclasses import dataclass, replace

import numpy as np

from ..bits import PlanesLayout, unpack_activations
from ..errors import GraphError
from . import _epilogue
from .conv import conv_geometry
from .pa_conv import binary_conv_runner, edge_corrections, group_of, padded_conv_reference, padding_rule
from .registry import Op, get_op, register


@dataclass(frozen=True, eq=False)
class BinaryConvConfig:
    layer: object  # the PAConv Node
    planes_pads: tuple
    output_layout: PlanesLayout = None
    writes_float: bool = True

    def outputs(self):
        """How many outputs the step has: 2 when it writes float32 and planes, else 1."""
        return 2 if self.output_layout is not None and self.writes_float else 1


def _infer_shapes(node, input_shapes):
    config = node.config
    layer = config.layer
    if len(node.inputs) != len(layer.inputs) or len(node.outputs) != config.outputs():
        raise GraphError(f"node {node.name!r} (BinaryConv): expects {len(layer.inputs)} input(s) and "
                         f"{config.outputs()} output(s), found {len(node.inputs)} and {len(node.outputs)}")
    (output_shape,) = get_op(layer.op, layer.name).infer_shapes(layer, input_shapes)
    own_pads = layer.attrs.get("pads", (0, 0, 0, 0))
    if len(config.planes_pads) != 4 or any(planes < own for planes, own in zip(config.planes_pads, own_pads)):
        raise GraphError(f"node {node.name!r} (BinaryConv): planes padded by {list(config.planes_pads)} cannot hold "
                         f"the layer's own pads {list(own_pads)}")
    layout = config.output_layout
    if layout is not None and (layout.thresholds.shape[1] != output_shape[1] or output_shape[1] % layout.group):
        raise GraphError(f"node {node.name!r} (BinaryConv): the output layout's thresholds "
                         f"{list(layout.thresholds.shape)} and group {layout.group} do not fit the "
                         f"{output_shape[1]} output channels")
    return [output_shape] * config.outputs()


def _reference(node, inputs):
    """The activation levels decoded from the planes (float64), the layer's own padded window of
    them, a float64 convolution with Qw(W), the bias, the border correction of padding rule
    "zero_after_quantizer", the epilogue; the reader's planes packed from float32(y)."""
    config = node.config
    layer = config.layer
    planes = inputs[0]
    in_channels = layer.attrs["in_channels"]
    bits = unpack_activations(planes, in_channels, group_of(layer))  # [P, B, Hp, Wp, C]
    steps = layer.params["act_steps"].astype(np.float64)
    levels = float(layer.params["act_lowest"][0]) + np.tensordot(steps, bits.astype(np.float64), axes=1)
    levels = np.moveaxis(levels, -1, 1)  # [B, C, Hp, Wp]
    top, left, bottom, right = config.planes_pads
    own_top, own_left, own_bottom, own_right = layer.attrs.get("pads", (0, 0, 0, 0))
    height, width = levels.shape[2] - top - bottom, levels.shape[3] - left - right
    window = levels[:, :, top - own_top:top + height + own_bottom, left - own_left:left + width + own_right]
    y = padded_conv_reference(layer, window) + layer.params["bias"].astype(np.float64)[None, :, None, None]
    rule, _ = padding_rule(layer)
    _, pads, _, _ = conv_geometry(layer, (1, in_channels, height, width), layer.params["weight_planes"].shape[2:4])
    if rule == "zero_after_quantizer" and any(pads):
        correction = edge_corrections(layer, (height, width))
        if correction is not None:
            row_patterns, column_patterns, corrections = correction
            y += np.moveaxis(corrections[row_patterns][:, :, column_patterns], 0, 1)[None]
    y = _epilogue.apply(layer, y, inputs)
    if config.output_layout is None:
        return [y]
    planes_out = config.output_layout.pack_reference(y.astype(np.float32))
    return [y, planes_out] if config.writes_float else [planes_out]


def _make_kernel(node):
    config = node.config
    return binary_conv_runner(config.layer, config.planes_pads, config.output_layout, config.writes_float)


def _cost(node, input_shapes, output_shapes):
    """The layer's cost without its quantizer (PackPlanes counts it, or the producer's epilogue)."""
    layer = node.config.layer
    cost = get_op(layer.op, layer.name).cost(layer, input_shapes, output_shapes[:1])
    quantizer = layer.params["act_thresholds"].shape[0] * int(np.prod(input_shapes[0][1:]))
    return replace(cost, flops=cost.flops - quantizer)


def _output_memory(node):
    config = node.config
    if config.output_layout is None:
        return ("buffer",)
    return ("buffer", "own") if config.writes_float else ("own",)


register(Op("BinaryConv", "binary convolution over bit-planes with its epilogue (plan-only)", _infer_shapes,
            _reference, _make_kernel, _cost, output_buffer=True, plan_only=True, output_memory=_output_memory,
            keeps_state=True))
