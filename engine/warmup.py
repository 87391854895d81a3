"""Compile every numba kernel ahead of use (`pabnn warmup`).

The kernels are compiled with `cache=True`, so once this has run, a new process loads machine
code from numba's on-disk cache instead of compiling. Running one tiny node of each op that
has a numba kernel is enough: the compiled signatures depend on dtypes and ranks, not shapes.
"""
import numpy as np

from . import amx
from .bits import pack_weight_planes
from .graph import Node, PlanNode
from .ops import get_op
from .ops.amx_conv import AmxConvConfig


def _tiny_pa_params(out_channels, in_channels, kernel):
    rng = np.random.default_rng(0)
    return {
        "weight_planes": pack_weight_planes(rng.random((1, out_channels, in_channels) + kernel) < 0.5),
        "weight_scales": np.ones((1, out_channels), np.float32),
        "weight_offset": np.zeros(out_channels, np.float32),
        "act_thresholds": np.zeros((1, in_channels), np.float32),
        "act_steps": np.ones(1, np.float32),
        "act_lowest": np.zeros(1, np.float32),
        "bias": np.zeros(out_channels, np.float32),
    }


def _tiny_int_params(out_channels, in_channels, kernel):
    return {
        "weight": np.ones((out_channels, in_channels) + kernel, np.int8),
        "weight_scale": np.ones(out_channels, np.float32),
        "input_scale": np.ones(1, np.float32),
        "bias": np.zeros(out_channels, np.float32),
    }


def warmup_nodes():
    """(node, input array) pairs that exercise every numba kernel once."""
    image = np.zeros((1, 3, 5, 5), np.float32)
    nodes = [
        (Node("PAConv", "pa_conv", ["x"], ["y"], {"in_channels": 3, "pads": [1, 1, 1, 1]},
              _tiny_pa_params(2, 3, (3, 3))), image),
        (Node("PALinear", "pa_linear", ["x"], ["y"], {"in_channels": 3}, _tiny_pa_params(2, 3, (1, 1))),
         np.zeros((1, 3), np.float32)),
        (Node("MaxPool", "max_pool", ["x"], ["y"], {"kernel_shape": [2, 2]}), image),
        (Node("AveragePool", "average_pool", ["x"], ["y"], {"kernel_shape": [2, 2]}), image),
        (Node("LRN", "lrn", ["x"], ["y"], {"size": 3}), image),
        # IntConv: a 3x3 runs the direct kernel, a 13x13 the DFNT one where the target has no
        # AVX-512 VNNI (int_conv.choose_kernel; with VNNI the direct kernel runs both).
        (Node("IntConv", "int_conv_direct", ["x"], ["y"], {"input_zero_point": 0, "pads": [1, 1, 1, 1]},
              _tiny_int_params(2, 3, (3, 3))), image),
        (Node("IntConv", "int_conv_dfnt", ["x"], ["y"], {"input_zero_point": 0, "pads": [6, 6, 6, 6]},
              _tiny_int_params(2, 3, (13, 13))), image),
    ]
    if amx.available():  # AmxConv (plan-only) where a Session would use it: a binary code of 3 levels
        params = _tiny_pa_params(2, 3, (3, 3))
        params.update(act_thresholds=np.zeros((2, 3), np.float32), act_steps=np.array([1, 2], np.float32))
        layer = Node("PAConv", "amx_conv", ["x"], ["y"], {"in_channels": 3, "pads": [1, 1, 1, 1],
                                                         "act_coding": "binary"}, params)
        nodes.append((PlanNode("AmxConv", "amx_conv", ["x"], ["y"], config=AmxConvConfig(layer)), image))
    return nodes


def warmup():
    """Run each warm-up node once; returns how many ran."""
    nodes = warmup_nodes()
    for node, x in nodes:
        get_op(node.op, node.name).make_kernel(node)([x])
    return len(nodes)
