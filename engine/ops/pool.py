"""MaxPool, AveragePool and GlobalAveragePool over NCHW tensors.

MaxPool/AveragePool attrs: kernel_shape [2], strides [2], pads [top, left, bottom, right],
dilations [2], count_include_pad (AveragePool; 0 or 1). Padded positions never
win a max; for an average they count only when count_include_pad is 1. Output sizes round down
(ONNX ceil_mode 0; the converter rewrites ceil_mode 1 as extra bottom/right padding).
"""
import numpy as np
from numba import prange

from ..errors import GraphError
from ..jit import inline_jit, jit, parallel_jit
from . import _attrs
from .conv import window_view
from .registry import Cost, Op, register


def _geometry(node, input_shape):
    kernel = _attrs.int_list(node, "kernel_shape", 2, 1)
    strides = _attrs.int_list(node, "strides", 2, 1, default=[1, 1])
    pads = _attrs.int_list(node, "pads", 4, 0, default=[0, 0, 0, 0])
    dilations = _attrs.int_list(node, "dilations", 2, 1, default=[1, 1])
    spans = [d * (k - 1) + 1 for d, k in zip(dilations, kernel)]
    # A pad smaller than the dilated span leaves at least one real input in every window.
    if any(p >= span for p, span in zip(pads, spans + spans)):
        raise GraphError(f"node {node.name!r} ({node.op}): pads {pads} must be smaller than the "
                         f"dilated kernel span {spans}")
    out_h = _attrs.conv_output_size(node, input_shape[2], kernel[0], strides[0], pads[0], pads[2], dilations[0])
    out_w = _attrs.conv_output_size(node, input_shape[3], kernel[1], strides[1], pads[1], pads[3], dilations[1])
    return kernel, strides, pads, dilations, (out_h, out_w)


def _pool_infer_shapes(node, input_shapes):
    _attrs.expect_arity(node, 1)
    _attrs.expect_rank(node, 0, input_shapes[0], 4)
    _attrs.int_attr(node, "count_include_pad", 0, 0, 1)
    _, _, _, _, (out_h, out_w) = _geometry(node, input_shapes[0])
    return [(None, input_shapes[0][1], out_h, out_w)]


def _max_reference(node, inputs):
    (x,) = inputs
    kernel, strides, pads, dilations, _ = _geometry(node, x.shape)
    windows = window_view(x, kernel, strides, pads, dilations, pad_value=-np.inf)
    return [windows.max(axis=(2, 3))]


def _average_reference(node, inputs):
    (x,) = inputs
    kernel, strides, pads, dilations, _ = _geometry(node, x.shape)
    sums = window_view(x, kernel, strides, pads, dilations).sum(axis=(2, 3))
    if node.attrs.get("count_include_pad", 0):
        return [sums / (kernel[0] * kernel[1])]
    ones = np.ones((1, 1) + x.shape[2:])
    counts = window_view(ones, kernel, strides, pads, dilations).sum(axis=(2, 3))
    return [sums / counts]


def _make_pool_kernel(node):
    is_max = node.op == "MaxPool"
    include_pad = bool(node.attrs.get("count_include_pad", 0))

    def run(inputs, out=None):
        x = np.ascontiguousarray(inputs[0], dtype=np.float32)
        kernel, strides, pads, dilations, (out_h, out_w) = _geometry(node, x.shape)
        y = np.empty(x.shape[:2] + (out_h, out_w), dtype=np.float32) if out is None else out
        if is_max:
            _max_pool_kernel(x, kernel[0], kernel[1], strides[0], strides[1], pads[0], pads[1],
                             dilations[0], dilations[1], y)
        else:
            _pool_kernel(x, kernel[0], kernel[1], strides[0], strides[1], pads[0], pads[1],
                         dilations[0], dilations[1], is_max, include_pad, y)
        return [y]

    return run


@jit
def _valid_range(tap_offset, stride, size, out_size):
    """Output positions o with 0 <= o * stride + tap_offset < size, as (first, stop)."""
    first = 0
    while first < out_size and first * stride + tap_offset < 0:
        first += 1
    stop = first
    while stop < out_size and stop * stride + tap_offset < size:
        stop += 1
    return first, stop


@jit
def _split_phases(plane, stride, phased):
    """phased[p, iy, i] = plane[iy, i * stride + p]: each stride phase of the columns contiguous."""
    height, width = plane.shape
    for iy in range(height):
        for p in range(stride):
            for i in range((width - p + stride - 1) // stride):
                phased[p, iy, i] = plane[iy, i * stride + p]


@inline_jit
def max_into(target, source, count, first):
    """target[i] = source[i] for i < count when `first`, else the larger of the two, a NaN of either
    winning and staying (numpy's max): the select keeps `value` when it is NaN."""
    if first:
        for i in range(count):
            target[i] = source[i]
        return
    for i in range(count):
        value = source[i]
        keep = target[i]
        target[i] = value if (value > keep) | (value != value) else keep


@inline_jit
def max_pool_line(line, kw, stride_w, dilation_w, phases, target):
    """target[ox] = max over kx < kw of line[ox * stride_w + kx * dilation_w] (as `max_into`, kx in
    order) for ox < target's size, over contiguous runs (strided reads do not vectorize): the line
    split by stride phase into phases [stride_w, phase_width] (phases[r, i] = line[i * stride_w + r];
    for stride 2 one loop of pairs, which LLVM vectorizes with shuffles), tap kx then reading phase
    (kx * dilation_w) % stride_w from index (kx * dilation_w) // stride_w on."""
    phase_width = phases.shape[1]
    out_w = target.shape[0]
    if stride_w == 2:
        even, odd = phases[0], phases[1]
        for i in range(phase_width):
            even[i] = line[2 * i]
            odd[i] = line[2 * i + 1]
    else:
        for r in range(stride_w):
            for i in range(phase_width):
                phases[r, i] = line[i * stride_w + r]
    for kx in range(kw):
        offset = kx * dilation_w
        max_into(target, phases[offset % stride_w, offset // stride_w:], out_w, kx == 0)


@jit
def max_pool_line_buffers(out_w, kw, stride_w, dilation_w, left, width):
    """(line width rounded up to whole stride phases, phase width, columns copied into the line)
    of `max_pool_line` for an input row of `width` with `left` padding columns: the line holds
    -inf outside [left, left + copied)."""
    line_width = (out_w - 1) * stride_w + 1 + (kw - 1) * dilation_w
    phase_width = -(-line_width // stride_w)
    return phase_width * stride_w, phase_width, max(0, min(width, line_width - left))


@parallel_jit
def _max_pool_kernel(x, kh, kw, stride_h, stride_w, top, left, dilation_h, dilation_w, y):
    """Max pooling as two 1-D passes per (sample, channel) plane (one plane per parallel iteration):
    for each output row, the maximum over the kernel's rows of the input (rows outside the input
    skipped; the pads are smaller than the dilated span, so one row is always inside) into a line
    that is -inf in the padding (`max_into`), then the output row as the maximum over the kernel's
    columns of that line (`max_pool_line`)."""
    batch, channels, height, width = x.shape
    out_h, out_w = y.shape[2], y.shape[3]
    line_width, phase_width, copied = max_pool_line_buffers(out_w, kw, stride_w, dilation_w, left, width)
    for plane in prange(batch * channels):
        b = plane // channels
        c = plane % channels
        # [left, left + copied) changes per row; the rest stays -inf.
        line = np.full(line_width, -np.inf, dtype=np.float32)
        inside = line[left:left + copied]
        phases = np.empty((stride_w, phase_width), dtype=np.float32)
        for oy in range(out_h):
            first = True
            for ky in range(kh):
                iy = oy * stride_h + ky * dilation_h - top
                if 0 <= iy < height:
                    max_into(inside, x[b, c, iy], copied, first)
                    first = False
            max_pool_line(line, kw, stride_w, dilation_w, phases, y[b, c, oy])


@parallel_jit
def _pool_kernel(x, kh, kw, stride_h, stride_w, top, left, dilation_h, dilation_w, is_max, include_pad, y):
    """One (sample, channel) plane per parallel iteration, one kernel tap at a time over the
    range of outputs where that tap lands inside the input (no per-element bounds tests).

    The plane's columns are first split by stride phase (engine: `_split_phases`), so every tap
    reads a contiguous run: column ox * stride_w + offset is phase offset % stride_w, index
    ox + offset // stride_w. Max keeps float32 and a branch-free select (so the loop vectorizes) in
    which a NaN wins and stays, as in numpy's max. Average sums in float64
    and divides by the taps inside the input (separable: rows x columns) unless include_pad."""
    batch, channels, height, width = x.shape
    out_h, out_w = y.shape[2], y.shape[3]
    row_counts = np.zeros(out_h)
    column_counts = np.zeros(out_w)
    for ky in range(kh):
        first, stop = _valid_range(ky * dilation_h - top, stride_h, height, out_h)
        row_counts[first:stop] += 1.0
    for kx in range(kw):
        first, stop = _valid_range(kx * dilation_w - left, stride_w, width, out_w)
        column_counts[first:stop] += 1.0
    phase_width = -(-width // stride_w)
    for plane in prange(batch * channels):
        b = plane // channels
        c = plane % channels
        phased = np.zeros((stride_w, height, phase_width), dtype=np.float32)
        _split_phases(x[b, c], stride_w, phased)
        maximum = np.full((out_h, out_w), -np.inf, dtype=np.float32)
        total = np.zeros((out_h, out_w))
        for ky in range(kh):
            row_offset = ky * dilation_h - top
            first_y, stop_y = _valid_range(row_offset, stride_h, height, out_h)
            for kx in range(kw):
                column_offset = kx * dilation_w - left
                first_x, stop_x = _valid_range(column_offset, stride_w, width, out_w)
                phase = column_offset % stride_w
                shift = column_offset // stride_w
                # One view per tap (not per output row: each view costs reference counting),
                # indexed from 0 so that numba needs no negative-index wraparound and vectorizes.
                first_row = first_y * stride_h + row_offset
                source = phased[phase, first_row:first_row + (stop_y - first_y - 1) * stride_h + 1:stride_h,
                                first_x + shift:stop_x + shift]
                if not is_max:
                    target = total[first_y:stop_y, first_x:stop_x]
                    for r in range(stop_y - first_y):
                        for i in range(stop_x - first_x):
                            target[r, i] += source[r, i]
                    continue
                target = maximum[first_y:stop_y, first_x:stop_x]
                for r in range(stop_y - first_y):
                    for i in range(stop_x - first_x):
                        value = source[r, i]
                        keep = target[r, i]
                        target[r, i] = value if (value > keep) | (value != value) else keep
        for oy in range(out_h):
            for ox in range(out_w):
                if is_max:
                    y[b, c, oy, ox] = maximum[oy, ox]
                elif include_pad:
                    y[b, c, oy, ox] = total[oy, ox] / (kh * kw)
                else:
                    y[b, c, oy, ox] = total[oy, ox] / (row_counts[oy] * column_counts[ox])


def _pool_cost(node, input_shapes, output_shapes):
    kernel = node.attrs["kernel_shape"]
    flops = int(np.prod(output_shapes[0][1:])) * kernel[0] * kernel[1]
    return Cost(flops=flops, float_flops=flops)


def _global_infer_shapes(node, input_shapes):
    _attrs.expect_arity(node, 1)
    _attrs.expect_rank(node, 0, input_shapes[0], 4)
    return [(None, input_shapes[0][1], 1, 1)]


def _global_reference(node, inputs):
    return [inputs[0].mean(axis=(2, 3), keepdims=True)]


def _global_make_kernel(node):
    def run(inputs):
        x = np.ascontiguousarray(inputs[0], dtype=np.float32)
        batch, channels = x.shape[:2]
        out = np.empty((batch, channels, 1, 1), dtype=np.float32)
        _global_mean_kernel(x.reshape(batch * channels, -1), out.reshape(-1))
        return [out]

    return run


@jit
def _global_mean_kernel(x, out):
    """out[i] = float32(sum of x[i] in float64 / its length): each channel's mean, accumulated in
    float64 so the result does not depend on the spatial size's rounding (numpy's float64 mean of
    a float32 array casts on the fly: 77 us on ResNet-18's 512 x 7 x 7, a serial sum here 15 us).
    The sum runs in eight float64 partial sums (element k into sum k % 8; the tail into the
    first), added pairwise: independent chains that LLVM vectorizes, 2.4-2.8x faster than one
    serial sum on MobileNet-sized maps."""
    count = x.shape[1]
    whole = count - count % 8
    for i in range(x.shape[0]):
        row = x[i]
        s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
        for k in range(0, whole, 8):
            s0 += row[k]
            s1 += row[k + 1]
            s2 += row[k + 2]
            s3 += row[k + 3]
            s4 += row[k + 4]
            s5 += row[k + 5]
            s6 += row[k + 6]
            s7 += row[k + 7]
        for k in range(whole, count):
            s0 += row[k]
        out[i] = np.float32((((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))) / count)


def _global_cost(node, input_shapes, output_shapes):
    flops = int(np.prod(input_shapes[0][1:]))
    return Cost(flops=flops, float_flops=flops)


register(Op("MaxPool", "2-D max pooling", _pool_infer_shapes, _max_reference, _make_pool_kernel, _pool_cost,
            output_buffer=True, attributes=("kernel_shape", "strides", "pads", "dilations")))
register(Op("AveragePool", "2-D average pooling", _pool_infer_shapes, _average_reference, _make_pool_kernel, _pool_cost,
            output_buffer=True, attributes=("kernel_shape", "strides", "pads", "dilations", "count_include_pad")))
register(Op("GlobalAveragePool", "mean over H and W", _global_infer_shapes, _global_reference, _global_make_kernel, _global_cost))
