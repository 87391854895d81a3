"""The binary convolution kernel alone on ResNet-18's binary layer shapes, against the roofline loop.

For each shape (output channels, input size, kernel, stride; input channels = output channels,
halved for the stride-2 layers), the plan-only BinaryConv step of a random PAConv with ReLU reads
bit-planes packed beforehand (as a handed-off layer does) and writes float32. Timed as CPU time of the calling thread at 1
thread (time.thread_time: leaves out time spent waiting for a core on a shared machine): best
and median of --repeats runs, and binary MACs/s (M x N x MACs per second) as a share of the
roofline loop (`pabnn bench`'s micro-kernel on L1-resident data) measured in the same process.

    python benchmarks/pa_conv_layers.py [--bases 1,1] [--repeats 40]

To compare two checkouts, run it once from each (PYTHONPATH pointing at the other's package).
"""
import argparse
import os
import time

import numba
import numpy as np

from pabnn.converters.bench import roofline_binary_macs
from pabnn.engine.bits import pack_activations, pack_weight_planes
from pabnn.engine.graph import Node, PlanNode
from pabnn.engine.ops import get_op
from pabnn.engine.ops.binary_conv import BinaryConvConfig

SHAPES = [(64, 56, 3, 1), (128, 28, 3, 1), (256, 14, 3, 1), (512, 7, 3, 1), (256, 56, 3, 1), (128, 56, 1, 2),
          (512, 14, 3, 2)]


def layer(rng, out_channels, size, kernel, stride, weight_bases, act_bases):
    """(BinaryConv plan node reading planes, its packed input planes, binary MACs)."""
    in_channels = out_channels if stride == 1 else out_channels // 2
    pads = [kernel // 2] * 4
    thresholds = np.sort(rng.normal(size=(act_bases, in_channels)), axis=0).astype(np.float32)
    signs = rng.random((weight_bases, out_channels, in_channels, kernel, kernel)) < 0.5
    params = {
        "weight_planes": pack_weight_planes(signs),
        "weight_scales": rng.uniform(0.1, 1.0, size=(weight_bases, out_channels)).astype(np.float32),
        "weight_offset": rng.normal(size=out_channels).astype(np.float32),
        "act_thresholds": thresholds,
        "act_steps": rng.uniform(0.1, 1.0, size=act_bases).astype(np.float32),
        "act_lowest": np.zeros(1, np.float32),
        "bias": rng.normal(size=out_channels).astype(np.float32),
    }
    attrs = {"in_channels": in_channels, "strides": [stride] * 2, "pads": pads, "dilations": [1, 1],
             "activation": "relu"}
    layer_node = Node("PAConv", "layer", ["x"], ["y"], attrs, params)
    node = PlanNode("BinaryConv", "layer", ["x.planes"], ["y"], config=BinaryConvConfig(layer_node, tuple(pads)))
    x = rng.normal(size=(1, in_channels, size, size)).astype(np.float32)
    planes = pack_activations(x, thresholds, pads)
    out_size = (size + 2 * (kernel // 2) - kernel) // stride + 1
    macs = weight_bases * act_bases * out_size * out_size * out_channels * in_channels * kernel * kernel
    return node, planes, macs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bases", default="1,1", metavar="M,N")
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    weight_bases, act_bases = (int(value) for value in args.bases.split(","))
    numba.set_num_threads(1)
    roofline_macs, roofline = roofline_binary_macs()
    roofline_seconds = []
    for _ in range(10):
        start = time.thread_time()
        roofline()
        roofline_seconds.append(time.thread_time() - start)
    roofline_rate = roofline_macs / min(roofline_seconds)
    print(f"load average {os.getloadavg()[0]:.1f}; roofline loop {roofline_rate / 1e9:.0f} G binary MACs/s; "
          f"PA({weight_bases},{act_bases})")
    rng = np.random.default_rng(0)
    for out_channels, size, kernel, stride in SHAPES:
        node, planes, macs = layer(rng, out_channels, size, kernel, stride, weight_bases, act_bases)
        kernel_run = get_op("BinaryConv").make_kernel(node)
        kernel_run([planes])
        seconds = []
        for _ in range(args.repeats):
            start = time.thread_time()
            kernel_run([planes])
            seconds.append(time.thread_time() - start)
        best, median = min(seconds), float(np.median(seconds))
        print(f"{out_channels:4d} ch @{size:3d} {kernel}x{kernel}/{stride}: best {1e3 * best:7.3f} ms, median "
              f"{1e3 * median:7.3f} ms, {macs / best / 1e9:5.0f} G/s ({macs / best / roofline_rate:4.0%} of the loop)")


if __name__ == "__main__":
    main()
