"""PackPlanes (plan-only): the activation bit-planes of a float32 tensor, as the binary layers
that read it need them (engine/bits.py: pack_activations, a PlanesLayout).

A Session's plan (engine/plan.py) puts one before the BinaryConv steps that read a float32
tensor; the readers that pack alike (same thresholds, code and group, pads that fit) share it.

config: a PlanesLayout. Input: float32 [B, C, H, W]. Output: uint64 [P, B, H + top + bottom,
W + left + right, words]; in the plan's shapes the planes tensor keeps the shape of the tensor it
codes.
"""
import numpy as np

from ..errors import GraphError
from . import _attrs
from .registry import Cost, Op, register


def _infer_shapes(node, input_shapes):
    _attrs.expect_arity(node, 1)
    _attrs.expect_rank(node, 0, input_shapes[0], 4)
    layout = node.config
    channels = input_shapes[0][1]
    if layout.thresholds.shape[1] != channels or channels % layout.group:
        raise GraphError(f"node {node.name!r} (PackPlanes): the layout's thresholds {list(layout.thresholds.shape)} "
                         f"and group {layout.group} do not fit the input's {channels} channels")
    return [input_shapes[0]]


def _reference(node, inputs):
    return [node.config.pack_reference(inputs[0])]


def _make_kernel(node):
    layout = node.config

    def run(inputs):
        return [layout.pack(np.ascontiguousarray(inputs[0], dtype=np.float32))]

    return run


def _cost(node, input_shapes, output_shapes):
    # one comparison per input element and threshold
    return Cost(flops=node.config.thresholds.shape[0] * int(np.prod(input_shapes[0][1:])))


register(Op("PackPlanes", "activation bit-planes of a float32 tensor (plan-only)", _infer_shapes, _reference,
            _make_kernel, _cost, plan_only=True, output_memory=lambda node: ("own",)))
