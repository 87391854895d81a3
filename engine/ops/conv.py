"""Conv: full-precision 2-D convolution (NCHW), y = activation(conv(W, x) + b + residual).

attrs: strides [2], pads [top, left, bottom, right], dilations [2], group, and the fused epilogue
(engine/ops/_epilogue.py: activation, optional residual input).
params: weight float32 [O, C/group, kh, kw], bias float32 [O].
"""
from concurrent.futures import ThreadPoolExecutor
import math
import os

import numba
import numpy as np
from numba import prange

from ..errors import GraphError
from ..jit import jit, parallel_jit
from . import _attrs, _epilogue, conv_direct, conv_winograd
from .registry import Cost, Op, register


def conv_geometry(node, input_shape, kernel_hw):
    """(strides, pads, dilations, (out_h, out_w)) of a conv-like node, validated."""
    strides = _attrs.int_list(node, "strides", 2, 1, default=[1, 1])
    pads = _attrs.int_list(node, "pads", 4, 0, default=[0, 0, 0, 0])
    dilations = _attrs.int_list(node, "dilations", 2, 1, default=[1, 1])
    out_h = _attrs.conv_output_size(node, input_shape[2], kernel_hw[0], strides[0], pads[0], pads[2], dilations[0])
    out_w = _attrs.conv_output_size(node, input_shape[3], kernel_hw[1], strides[1], pads[1], pads[3], dilations[1])
    # The kernels work on a zero-padded copy of each sample (float32, or N bit-planes for PAConv).
    padded = input_shape[1] * (input_shape[2] + pads[0] + pads[2]) * (input_shape[3] + pads[1] + pads[3])
    if padded > _attrs.MAX_SAMPLE_ELEMENTS:
        raise GraphError(
            f"node {node.name!r} ({node.op}): the zero-padded input has {padded} elements per sample, above the "
            f"limit of {_attrs.MAX_SAMPLE_ELEMENTS}"
        )
    return strides, pads, dilations, (out_h, out_w)


def window_view(x, kernel_hw, strides, pads, dilations, pad_value=0.0):
    """Strided view of all conv windows: x [B, C, H, W] -> [B, C, kh, kw, out_h, out_w] (no copy
    beyond the padding)."""
    top, left, bottom, right = pads
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=pad_value)
    kh, kw = kernel_hw
    out_h = (x.shape[2] - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    out_w = (x.shape[3] - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    sb, sc, sh, sw = x.strides
    return np.lib.stride_tricks.as_strided(
        x,
        shape=(x.shape[0], x.shape[1], kh, kw, out_h, out_w),
        strides=(sb, sc, sh * dilations[0], sw * dilations[1], sh * strides[0], sw * strides[1]),
        writeable=False,
    )


def _weights(node):
    weight = _attrs.param(node, "weight", np.float32, 4)
    bias = _attrs.param(node, "bias", np.float32, 1)
    _attrs.expect_shape(node, "bias", bias.shape, (weight.shape[0],))
    return weight, bias


def _group(node, in_channels, weight):
    group = node.attrs.get("group", 1)
    if not _attrs.is_int(group) or group < 1 or in_channels % group or weight.shape[0] % group:
        raise GraphError(
            f"node {node.name!r} ({node.op}): group must divide input channels {in_channels} and output "
            f"channels {weight.shape[0]}, found {group!r}"
        )
    _attrs.expect_shape(node, f"weight (for {in_channels} input channels, group {group})", weight.shape, (weight.shape[0], in_channels // group) + weight.shape[2:])
    return group


def infer_shapes(node, input_shapes):
    return [output_shape_with_epilogue(node, input_shapes, _weights(node)[0])]


def output_shape_with_epilogue(node, input_shapes, weight):
    """The output shape of a conv-like node with `weight` [O, C/group, kh, kw] on input 0 (group,
    geometry and the fused epilogue's inputs checked)."""
    _epilogue.check_arity(node)
    _attrs.expect_rank(node, 0, input_shapes[0], 4)
    _group(node, input_shapes[0][1], weight)
    _, _, _, (out_h, out_w) = conv_geometry(node, input_shapes[0], weight.shape[2:])
    output_shape = (None, weight.shape[0], out_h, out_w)
    _epilogue.check(node, input_shapes, output_shape)
    return output_shape


def reference(node, inputs):
    """Direct convolution in float64, one kernel tap at a time, then the epilogue."""
    x = inputs[0]
    weight, bias = (a.astype(np.float64) for a in _weights(node))
    group = node.attrs.get("group", 1)
    strides, pads, dilations, _ = conv_geometry(node, x.shape, weight.shape[2:])
    windows = window_view(x, weight.shape[2:], strides, pads, dilations)
    y = grouped_window_products(windows, weight, group, "bcijhw,ocij->bohw")
    return [_epilogue.apply(node, y + bias[None, :, None, None], inputs)]


def grouped_window_products(windows, weight, group, subscripts):
    """y [B, O, out_h, out_w]: for each group g, np.einsum(subscripts) of the windows of g's input
    channels ([B, C/group, kh, kw, out_h, out_w] of `windows`) with the weights of g's output
    channels (the "o" axis of `weight`), concatenated over the groups on axis 1."""
    weight_axis = subscripts.split(",")[1].index("o")
    per_group_in = windows.shape[1] // group
    per_group_out = weight.shape[weight_axis] // group
    outputs = []
    for g in range(group):
        w = np.take(weight, np.arange(g * per_group_out, (g + 1) * per_group_out), axis=weight_axis)
        outputs.append(np.einsum(subscripts, windows[:, g * per_group_in : (g + 1) * per_group_in], w))
    return np.concatenate(outputs, axis=1)


# im2col + GEMM runs over even chunks of output rows of one sample, at most about this many
# output positions each, and fewer when the chunk's im2col matrix would exceed IM2COL_CHUNK_BYTES
# (it then stays in L2 between its writing and the GEMM reading it), but not fewer than
# MIN_COLUMNS_PER_CHUNK (narrower GEMMs lose more to the BLAS packing the weights anew each call).
# The chunks are shared among numba.get_num_threads() Python threads (numpy releases the GIL in
# BLAS, the im2col kernel is nogil; the BLAS itself is held to one thread during a Session run).
# The chunks do not depend on the thread count, so neither do the results.
# A conv of fewer chunks than MIN_IM2COL_TASKS over the batch (a small map) is split further, into
# chunks of at least MIN_SPLIT_COLUMNS positions, so that threads share it: 3x3/2 128->256 @56 at
# 2 threads 6.0 -> 3.6 ms; below that width the narrower GEMMs cost more than a second thread gives
# (1x1 256->1024 @14 in 4 chunks: 1.20 -> 1.36 ms at 1 thread).
COLUMNS_PER_CHUNK = 8192
MIN_COLUMNS_PER_CHUNK = 1024
IM2COL_CHUNK_BYTES = 1 << 20
MIN_IM2COL_TASKS = 4
MIN_SPLIT_COLUMNS = 128

# 3x3, stride 1, dilation 1, one group, at least this many input channels: Winograd F(2x2, 3x3)
# (engine/ops/conv_winograd.py; 2.25x fewer multiplications). Below it the transforms cost more
# than the multiplications they save.
WINOGRAD_MIN_CHANNELS = 16
# Winograd chunks: whole tile rows, about this many tiles each (their transformed inputs and
# products, 16 x channels x tiles float32). Larger chunks make wider GEMMs ([O x C] @ [C x tiles]:
# 784 tiles ran 1.2x faster than 112), and two chunks keep two threads busy on a 56x56 output. As
# with im2col, the chunks do not depend on the thread count.
WINOGRAD_TILES_PER_CHUNK = 392
# A sample with fewer 2x2 output tiles than this runs im2col instead: the transformed weights are
# 16/9 the size of the plain ones and are read once per chunk, so on a small output (ResNet-18's
# 512-channel 7x7 layers: 16 tiles) streaming them costs more than the saved multiplications.
WINOGRAD_MIN_TILES = 32


def uses_winograd(node, weight):
    """Whether the float Conv `node` runs as Winograd F(2x2, 3x3)."""
    return (weight.shape[2:] == (3, 3) and node.attrs.get("group", 1) == 1
            and weight.shape[1] >= WINOGRAD_MIN_CHANNELS
            and list(node.attrs.get("strides", [1, 1])) == [1, 1]
            and list(node.attrs.get("dilations", [1, 1])) == [1, 1])


# Convs with one group, a kernel larger than 1x1 and at most this many taps per output
# (C * kh * kw) run as a direct convolution (engine/ops/conv_direct.py) instead of im2col + GEMM:
# on so short a K the GEMM's packing and the im2col copy weigh as much as the multiplications.
# Measured with benchmarks/float_conv.py at 1 thread (CPU time, docs/benchmarks.md): the direct
# kernel was 1.1-2.6x faster at K = 27, 100, 144, 147 (ResNet's 7x7/2 stem), 216 and 288,
# 0.97-1.12x at K = 576 and 0.9x at K = 1152. (1x1 convs: `uses_pointwise`.)
DIRECT_MAX_TAPS = 288
# A strided conv (no Winograd) runs the direct kernel up to this many taps: im2col copies its input
# twice (stride phases, then columns); 3x3/2 convs with K = 576 and 1152 ran 1.14-1.28x faster direct
# (benchmarks/float_conv.py, docs/benchmarks.md).
DIRECT_MAX_STRIDED_TAPS = 1152
# Pixels of a virtual row of the direct kernel on narrow outputs (see _make_direct_kernel): one
# micro-kernel call of conv_direct.MAX_VECTORS vectors.
VIRTUAL_ROW = 48


def uses_direct(node, weight):
    """Whether the float Conv `node` runs as the direct convolution of conv_direct.py: one group and
    a kernel larger than 1x1 with at most DIRECT_MAX_TAPS taps per output (DIRECT_MAX_STRIDED_TAPS
    at a stride above 1), or several groups (a depthwise conv) with at most DIRECT_MAX_TAPS per
    group. On narrow outputs (rows under conv_direct.LANES) a group-1 conv runs im2col, a grouped
    one the direct kernel on its rows laid end to end."""
    taps = int(np.prod(weight.shape[1:]))
    if node.attrs.get("group", 1) != 1:
        return taps <= DIRECT_MAX_TAPS
    strided = any(stride > 1 for stride in node.attrs.get("strides", [1, 1]))
    most = DIRECT_MAX_STRIDED_TAPS if strided else DIRECT_MAX_TAPS
    return weight.shape[2] * weight.shape[3] > 1 and taps <= most


def uses_pointwise(node, weight):
    """Whether the float Conv `node` is a 1x1 conv of one group, which runs as
    conv_direct.pointwise_conv at any stride, padding and number of input channels (measured with
    benchmarks/float_conv.py against the im2col + GEMM it replaced, docs/benchmarks.md)."""
    return node.attrs.get("group", 1) == 1 and weight.shape[2:] == (1, 1)


def make_kernel(node):
    weight, bias = _weights(node)
    if uses_winograd(node, weight):
        return _make_winograd_kernel(node, weight, bias)
    if uses_direct(node, weight) or uses_pointwise(node, weight):
        return _make_direct_kernel(node, weight, bias)
    return _make_im2col_kernel(node, weight, bias)


class DirectConv:
    """A float Conv on conv_direct's kernels: its packed weights and bias (a block reads 8 of them),
    whether the ReLU is fused into the kernel (no residual follows), and per input shape its
    geometry (`setup`, computed once: a Python loop over the taps)."""

    def __init__(self, node, weight, bias):
        self.node = node
        self.out_channels, _, self.kh, self.kw = weight.shape
        self.group = node.attrs.get("group", 1)
        self.packed = conv_direct.pack_weights(weight, self.group)
        self.padded_bias = np.zeros(self.out_channels + conv_direct.CHANNELS_PER_BLOCK, np.float32)
        self.padded_bias[:self.out_channels] = bias
        self.fused_relu = node.attrs.get("activation") == "relu" and len(node.inputs) == 1
        self.pointwise = (self.kh, self.kw) == (1, 1) and self.group == 1
        self.per_shape = {}  # input shape[1:] -> setup(shape)

    def setup(self, shape):
        """(strides, pads, dilations, out_h, out_w, columns of a stride phase, narrow, slack, tap
        offsets, in place) for inputs of this shape. Rows narrower than a vector: a group-1 conv
        runs im2col (offsets None); a grouped one computes the phases' rows laid end to end
        (`columns` pixels each, the last columns - out_w of them dropped) as rows of VIRTUAL_ROW
        pixels into a scratch, whose real columns are then copied out (per group, im2col is a GEMM
        of a few rows)."""
        if shape[1:] in self.per_shape:
            return self.per_shape[shape[1:]]
        kh, kw, group, pointwise = self.kh, self.kw, self.group, self.pointwise
        strides, pads, dilations, (out_h, out_w) = conv_geometry(self.node, shape, (kh, kw))
        narrow = out_w < conv_direct.LANES and not pointwise
        columns = out_w + dilations[1] * (kw - 1) // strides[1]
        rows = out_h + dilations[0] * (kh - 1) // strides[0]
        slack = conv_direct.LANES + (VIRTUAL_ROW + columns if narrow else 0)  # reads past the last real row
        offsets = None if narrow and group == 1 else conv_direct.tap_offsets(
            (strides[0], strides[1], shape[1], rows, columns), (kh, kw), strides, dilations)
        # A 1x1 conv at stride 1 without padding whose rows end on whole vectors reads x in place.
        in_place = pointwise and list(strides) == [1, 1] and not any(pads) and out_h * out_w % conv_direct.LANES == 0
        self.per_shape[shape[1:]] = strides, pads, dilations, out_h, out_w, columns, narrow, slack, offsets, in_place
        return self.per_shape[shape[1:]]

    def source(self, x):
        """(the 1-D float32 buffer the kernels read, floats per sample) of input x: its stride phases
        with the slack after them, or x itself where the conv reads it in place."""
        strides, pads, dilations, out_h, out_w, _, _, slack, _, in_place = self.setup(x.shape)
        if in_place:  # x is its own phase, and no vector reads past its end
            return np.ascontiguousarray(x, dtype=np.float32).reshape(-1), x[0].size
        phases = stride_phases(x, strides, pads, (self.kh, self.kw), dilations, (out_h, out_w), slack=slack)
        return phases.base, phases[0].size  # the 1-D buffer, with the slack after the phases


def _make_direct_kernel(node, weight, bias):
    """The Conv as conv_direct.direct_conv (or, 1x1, conv_direct.pointwise_conv) on each sample's
    stride phases; the residual and the activation after it (when there is a residual) in a pass
    over the output."""
    conv = DirectConv(node, weight, bias)
    out_channels, group, packed, padded_bias, fused_relu = (conv.out_channels, conv.group, conv.packed,
                                                            conv.padded_bias, conv.fused_relu)
    im2col = []  # the im2col kernel, once needed (two threads making it at once is harmless)

    def run(inputs, out=None):
        x = inputs[0]
        _, _, _, out_h, out_w, columns, narrow, _, offsets, _ = conv.setup(x.shape)
        if offsets is None:
            if not im2col:
                im2col.append(_make_im2col_kernel(node, weight, bias))
            return im2col[0](inputs, out=out)
        batch = x.shape[0]
        if out is None:
            out = np.empty((batch, out_channels, out_h, out_w), dtype=np.float32)
        flat, sample = conv.source(x)
        if conv.pointwise:  # phase (0, 0) holds each channel's output pixels end to end
            conv_direct.pointwise_conv(flat, sample, offsets, packed, padded_bias, out.reshape(-1), batch,
                                       out_channels, out_h * out_w, fused_relu)
        elif narrow:
            virtual_rows = -(-out_h * columns // VIRTUAL_ROW)
            scratch = np.empty((batch, out_channels, virtual_rows * VIRTUAL_ROW), np.float32)
            conv_direct.direct_conv(flat, sample, offsets, packed, padded_bias, scratch.reshape(-1), batch,
                                    out_channels, virtual_rows, VIRTUAL_ROW, VIRTUAL_ROW, fused_relu, group)
            out[:] = scratch[:, :, :out_h * columns].reshape(batch, out_channels, out_h, columns)[..., :out_w]
        else:
            conv_direct.direct_conv(flat, sample, offsets, packed, padded_bias, out.reshape(-1), batch, out_channels,
                                    out_h, out_w, columns, fused_relu, group)
        if not fused_relu:
            _epilogue.apply(node, out, inputs)
        return [out]

    return run


def _make_im2col_kernel(node, weight, bias):
    """The Conv as im2col + GEMM over chunks of output rows of each sample."""
    group = node.attrs.get("group", 1)
    out_channels, per_group_in, kh, kw = weight.shape
    per_group_out = out_channels // group
    per_group_taps = per_group_in * kh * kw
    # [group, per_group_out, per_group_in*kh*kw]: the matrix side of im2col + GEMM. With one group
    # the bias rides in the GEMM: a last column of the matrix times a last im2col row of ones
    # (a separate pass adding it took a sixth of the 7x7 stem conv's time).
    matrices = np.ascontiguousarray(weight.reshape(group, per_group_out, per_group_taps))
    bias_in_gemm = group == 1
    if bias_in_gemm:
        matrices = np.concatenate([matrices, bias.reshape(1, out_channels, 1)], axis=2)
    column_bias = bias[:, None]

    def run(inputs, out=None):
        x = inputs[0]
        strides, pads, dilations, (out_h, out_w) = conv_geometry(node, x.shape, (kh, kw))
        phases = stride_phases(x, strides, pads, (kh, kw), dilations, (out_h, out_w))
        batch = x.shape[0]
        if out is None:
            out = np.empty((batch, out_channels, out_h, out_w), dtype=np.float32)
        y = out.reshape(batch, out_channels, out_h * out_w)
        residual = inputs[1].reshape(y.shape) if len(inputs) == 2 else None
        fitting = IM2COL_CHUNK_BYTES // (4 * group * per_group_in * kh * kw)
        chunk_columns = min(COLUMNS_PER_CHUNK, max(MIN_COLUMNS_PER_CHUNK, fitting))
        chunks = max(1, -(-out_h * out_w // chunk_columns))
        if batch * chunks < MIN_IM2COL_TASKS:  # a small conv still gives the threads several chunks
            chunks = max(chunks, min(out_h, -(-MIN_IM2COL_TASKS // batch), out_h * out_w // MIN_SPLIT_COLUMNS))
        rows = -(-out_h // chunks)  # rows per chunk, the chunks as even as rows allow

        def chunk(task):
            b, first_row, stop_row = task
            columns = slice(first_row * out_w, stop_row * out_w)
            # im2col: [C * kh * kw (+ 1), chunk columns], one contiguous run per tap, channel and row.
            taps = np.empty((group * per_group_taps + bias_in_gemm, (stop_row - first_row) * out_w), dtype=np.float32)
            _im2col(phases[b], kh, kw, strides[0], strides[1], dilations[0], dilations[1], first_row, stop_row,
                    out_w, taps)
            if bias_in_gemm:
                taps[-1] = 1.0
            for g in range(group):
                window_columns = taps[g * per_group_taps:(g + 1) * per_group_taps + bias_in_gemm]
                np.matmul(matrices[g], window_columns, out=y[b, g * per_group_out:(g + 1) * per_group_out, columns])
            # The bias (several groups) and the epilogue while the chunk is in cache.
            values = y[b, :, columns]
            if not bias_in_gemm:
                values += column_bias
            _epilogue.apply_residual(node, values, None if residual is None else residual[b, :, columns])

        tasks = [(b, first, min(first + rows, out_h)) for b in range(batch) for first in range(0, out_h, rows)]
        _run_tasks(chunk, tasks)
        return [out]

    return run


def _make_winograd_kernel(node, weight, bias):
    """The Conv as Winograd F(2x2, 3x3) over chunks of tile rows of each sample (conv_winograd.py),
    or as im2col (made on first use) when a sample has fewer than WINOGRAD_MIN_TILES tiles."""
    out_channels, in_channels = weight.shape[:2]
    transformed = conv_winograd.transform_weights(weight)  # [16, O, C]
    im2col = []  # the im2col kernel, once needed (two threads making it at once is harmless)

    def run(inputs, out=None):
        x = inputs[0]
        _, pads, _, (out_h, out_w) = conv_geometry(node, x.shape, (3, 3))
        tile_rows, tile_columns = conv_winograd.tile_counts((out_h, out_w))
        if tile_rows * tile_columns < WINOGRAD_MIN_TILES:
            if not im2col:
                im2col.append(_make_im2col_kernel(node, weight, bias))
            return im2col[0](inputs, out=out)
        batch = x.shape[0]
        if out is None:
            out = np.empty((batch, out_channels, out_h, out_w), dtype=np.float32)
        residual = inputs[1] if len(inputs) == 2 else None
        padded = [conv_winograd.padded_sample(x[b], pads, (tile_rows, tile_columns)) for b in range(batch)]
        rows = max(1, WINOGRAD_TILES_PER_CHUNK // tile_columns)

        def chunk(task):
            b, first, stop = task
            tiles = (stop - first) * tile_columns
            v = conv_winograd.tile_planes(in_channels, tiles)
            conv_winograd.input_tiles(padded[b], first, stop, v)
            m = np.matmul(transformed, v, out=conv_winograd.tile_planes(out_channels, tiles))
            conv_winograd.output_tiles(m, bias, first, stop, tile_columns, out[b])
            lines = slice(2 * first, min(2 * stop, out_h))
            _epilogue.apply_residual(node, out[b, :, lines], None if residual is None else residual[b, :, lines])

        _run_tasks(chunk, [(b, first, min(first + rows, tile_rows)) for b in range(batch)
                           for first in range(0, tile_rows, rows)])
        return [out]

    return run


@jit
def _im2col(phases, kh, kw, stride_h, stride_w, dilation_h, dilation_w, first_row, stop_row, out_w, taps):
    """taps[(c * kh + ky) * kw + kx, (oy - first_row) * out_w + ox] = x_padded[c, oy * sh + ky * dh,
    ox * sw + kx * dw] for the output rows first_row <= oy < stop_row, read from the stride phases
    of one sample (`stride_phases`: phases [sh, sw, C, rows, columns]), where every tap of a row is
    a contiguous run. Rows of `taps` past C * kh * kw are left as they are."""
    channels = phases.shape[2]
    for c in range(channels):
        for ky in range(kh):
            row_phase = (ky * dilation_h) % stride_h
            row_shift = (ky * dilation_h) // stride_h
            for kx in range(kw):
                column_phase = (kx * dilation_w) % stride_w
                column_shift = (kx * dilation_w) // stride_w
                target = taps[(c * kh + ky) * kw + kx]
                source = phases[row_phase, column_phase, c]
                for oy in range(first_row, stop_row):
                    run = source[oy + row_shift, column_shift:column_shift + out_w]
                    start = (oy - first_row) * out_w
                    for ox in range(out_w):
                        target[start + ox] = run[ox]


def stride_phases(x, strides, pads, kernel_hw, dilations, out_hw, slack=0):
    """The zero-padded input split by stride phase, float32 [B, sh, sw, C, rows, columns]:

        phases[b, p, q, c, i, j] = x_padded[b, c, i * sh + p, j * sw + q]   (0 in the padding)

    with rows = out_h + dh * (kh - 1) // sh and columns = out_w + dw * (kw - 1) // sw, so that
    tap (ky, kx) of every output row is a contiguous run: x_padded[b, c, oy * sh + ky * dh,
    ox * sw + kx * dw] = phases[b, ky * dh % sh, kx * dw % sw, c, oy + ky * dh // sh,
    ox + kx * dw // sw]. (numpy copies a strided 6-D window view into im2col columns 1.2-1.8x
    slower than these contiguous runs.) With `slack`, the array is a view of the start of a 1-D
    zero buffer (its `base`) that holds `slack` more floats after it, for kernels that read whole
    vectors past the last run."""
    batch, channels, height, width = x.shape
    (sh, sw), (top, left) = strides, pads[:2]
    rows = out_hw[0] + dilations[0] * (kernel_hw[0] - 1) // sh
    columns = out_hw[1] + dilations[1] * (kernel_hw[1] - 1) // sw
    shape = (batch, sh, sw, channels, rows, columns)
    size = math.prod(shape)  # (np.prod costs microseconds a call)
    phases = np.zeros(size + slack, dtype=np.float32)[:size].reshape(shape)
    # Only the phases some tap reads are filled (a 1x1 conv at stride 2 reads one of four); the
    # others stay zero, pages the kernel never touches.
    read_rows = np.zeros(sh, dtype=np.bool_)
    read_columns = np.zeros(sw, dtype=np.bool_)
    for ky in range(kernel_hw[0]):
        read_rows[ky * dilations[0] % sh] = True
    for kx in range(kernel_hw[1]):
        read_columns[kx * dilations[1] % sw] = True
    _fill_phases(np.ascontiguousarray(x, dtype=np.float32), top, left, read_rows, read_columns, phases)
    return phases


@parallel_jit
def _fill_phases(x, top, left, read_rows, read_columns, phases):
    """phases[b, p, q, c, i, j] = x[b, c, i * sh + p - top, j * sw + q - left] where that lies inside x,
    for the row phases p and column phases q marked in read_rows / read_columns (the rest of
    `phases` is left as it is: zero). One phase row (b, p, c, i) per parallel iteration; at stride 2
    each input row is split into its two column phases by one loop of pairs, which LLVM vectorizes
    with shuffles (numpy's strided copies took 2-3x longer for ResNet's stem)."""
    batch, sh, sw, channels, rows, columns = phases.shape
    height, width = x.shape[2], x.shape[3]
    # Column phase q's first j inside x and where it reads from.
    first_j = np.empty(sw, dtype=np.int64)
    first_x = np.empty(sw, dtype=np.int64)
    count_j = np.empty(sw, dtype=np.int64)
    for q in range(sw):
        first_j[q] = (left - q + sw - 1) // sw
        first_x[q] = first_j[q] * sw + q - left
        count_j[q] = max(0, min(columns - first_j[q], -(-(width - first_x[q]) // sw)))
    for task in prange(batch * sh * channels * rows):
        i = task % rows
        c = (task // rows) % channels
        p = (task // (rows * channels)) % sh
        b = task // (rows * channels * sh)
        iy = i * sh + p - top
        if not read_rows[p] or iy < 0 or iy >= height:
            continue
        source = x[b, c, iy]
        if sw == 2 and read_columns[0] and read_columns[1]:
            # x's columns 0, 1 (the first of each phase) start the pairs: phase qa takes the even
            # ones, qb the odd ones.
            qa = 0 if first_x[0] == 0 else 1
            qb = 1 - qa
            first, second = phases[b, p, qa, c, i, first_j[qa]:], phases[b, p, qb, c, i, first_j[qb]:]
            pairs = min(count_j[qa], count_j[qb])
            for j in range(pairs):
                first[j] = source[2 * j]
                second[j] = source[2 * j + 1]
            for j in range(pairs, count_j[qa]):
                first[j] = source[2 * j]
            for j in range(pairs, count_j[qb]):
                second[j] = source[2 * j + 1]
            continue
        for q in range(sw):
            if read_columns[q]:
                target = phases[b, p, q, c, i, first_j[q]:]
                for j in range(count_j[q]):
                    target[j] = source[first_x[q] + j * sw]


_EXECUTORS = {}  # thread count -> ThreadPoolExecutor, made on first use
# A forked child inherits the executors but not their worker threads: it makes its own.
os.register_at_fork(after_in_child=_EXECUTORS.clear)


def _run_tasks(function, tasks):
    """function(task) for every task, on numba.get_num_threads() Python threads (inline for one)."""
    threads = min(numba.get_num_threads(), len(tasks))
    if threads <= 1:
        for task in tasks:
            function(task)
        return
    if threads not in _EXECUTORS:
        _EXECUTORS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="pabnn-conv")
    for _ in _EXECUTORS[threads].map(function, tasks):
        pass


def cost(node, input_shapes, output_shapes):
    weight = node.params["weight"]
    macs = int(np.prod(output_shapes[0][1:])) * int(np.prod(weight.shape[1:]))
    flops = 2 * macs + int(np.prod(output_shapes[0][1:]))
    return Cost(flops=flops, float_flops=flops, float32_params=weight.size + node.params["bias"].size)


def padded_input_and_columns_bytes(node, input_shapes, output_shapes, kernel_hw):
    """A bound on the scratch of a conv-like kernel, bytes per sample: its zero-padded input and its
    im2col matrix (input channels x kernel taps x output pixels), both float32 (PAConv's bit-planes
    and the integer kernels' buffers take less)."""
    _, channels, height, width = input_shapes[0]
    top, left, bottom, right = node.attrs.get("pads", (0, 0, 0, 0))
    _, _, out_height, out_width = output_shapes[0]
    return 4 * channels * ((height + top + bottom) * (width + left + right)
                           + int(np.prod(kernel_hw)) * out_height * out_width)


def _scratch_bytes(node, input_shapes, output_shapes):
    return padded_input_and_columns_bytes(node, input_shapes, output_shapes, node.params["weight"].shape[2:4])


register(Op("Conv", "float 2-D convolution (groups, stride, dilation, pads)", infer_shapes, reference, make_kernel, cost,
            output_buffer=True, uses_blas=True, scratch_bytes=_scratch_bytes, attributes=("strides", "pads", "dilations", "group", "activation"),
            parameters=("weight", "bias")))
