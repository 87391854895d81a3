"""LRN: local response normalization across channels (AlexNet, GoogLeNet), as ONNX and Caffe define it.

    square_sum[n, c, ...] = sum over i in c - floor((size - 1) / 2) .. c + ceil((size - 1) / 2)
                            (channels outside 0..C-1 left out) of x[n, i, ...]^2
    y = x / (bias + alpha / size * square_sum) ** beta

attrs: size (int >= 1; an even size reaches one channel further up than down), alpha, beta, bias
(finite numbers). Input [batch, C, ...] of rank >= 3; the output has its shape. The kernel sums
the float32 squares in float64 and rounds once, at the end.
"""
import numpy as np
from numba import prange

from ..errors import GraphError
from ..jit import parallel_jit
from . import _attrs
from .registry import Cost, Op, register


def _settings(node):
    """(size, alpha, beta, bias) of an LRN node."""
    size = _attrs.int_attr(node, "size", None, 1)
    numbers = []
    for key, default in (("alpha", 1e-4), ("beta", 0.75), ("bias", 1.0)):
        value = node.attrs.get(key, default)
        if not _attrs.is_finite_number(value):
            raise GraphError(f"node {node.name!r} (LRN): attribute {key!r} must be a finite number, found {value!r}")
        numbers.append(float(value))
    return (size, *numbers)


def _infer_shapes(node, input_shapes):
    _attrs.expect_arity(node, 1)
    _settings(node)
    if len(input_shapes[0]) < 3:
        raise GraphError(f"node {node.name!r} (LRN): input 0 must be [batch, channels, ...] of rank >= 3, "
                         f"found shape {list(input_shapes[0])}")
    return [input_shapes[0]]


def _window(size):
    """Channels before and after c in the window of channel c."""
    before = (size - 1) // 2
    return before, size - 1 - before


def _reference(node, inputs):
    (x,) = inputs
    size, alpha, beta, bias = _settings(node)
    before, after = _window(size)
    channels = x.shape[1]
    padded = np.pad(np.square(x), [(0, 0), (before, after)] + [(0, 0)] * (x.ndim - 2))
    square_sum = sum(padded[:, i:i + channels] for i in range(size))
    return [x / (bias + alpha / size * square_sum) ** beta]


def _make_kernel(node):
    size, alpha, beta, bias = _settings(node)
    before, after = _window(size)

    def run(inputs):
        x = np.ascontiguousarray(inputs[0], dtype=np.float32)
        planes = x.reshape(x.shape[0], x.shape[1], -1)
        y = np.empty_like(planes)
        _lrn_kernel(planes, before, after, alpha / size, beta, bias, y)
        return [y.reshape(x.shape)]

    return run


@parallel_jit
def _lrn_kernel(x, before, after, alpha_over_size, beta, bias, y):
    """x, y: [batch, C, positions] float32. One (sample, channel) per parallel iteration; the
    squares of its window's channels are summed a whole row at a time (contiguous reads)."""
    batch, channels, positions = x.shape
    for plane in prange(batch * channels):
        n = plane // channels
        c = plane % channels
        total = np.zeros(positions)
        for i in range(max(0, c - before), min(channels - 1, c + after) + 1):
            for p in range(positions):
                value = np.float64(x[n, i, p])
                total[p] += value * value
        for p in range(positions):
            y[n, c, p] = np.float64(x[n, c, p]) / (bias + alpha_over_size * total[p]) ** beta


def _cost(node, input_shapes, output_shapes):
    # Per element: `size` squares and adds, then a multiply-add, a power and a divide.
    flops = _attrs.sample_elements(output_shapes[0]) * (2 * node.attrs["size"] + 4)
    return Cost(flops=flops, float_flops=flops)


register(Op("LRN", "local response normalization across channels (ONNX/Caffe LRN)", _infer_shapes, _reference,
            _make_kernel, _cost, attributes=("size", "alpha", "beta", "bias")))
