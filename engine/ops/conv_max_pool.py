"""ConvMaxPool (plan-only): a float Conv and the MaxPool that is its only reader, in one pass.

A Session's plan (engine/fusion.py: fuse_conv_max_pool) replaces a direct-kernel Conv (one group, a
kernel larger than 1x1, optionally with its ReLU, no residual) followed by a MaxPool of dilation 1,
such as ResNet's 7x7/2 stem and its 3x3/2 max-pool, by one node. Its kernel computes each conv
output row with the Conv's own micro-kernel (conv_direct.conv_block, the same sums as
conv_direct.direct_conv) into a ring of the pool's kh rows of one 8-channel block, and pools each
output row from there (pool.max_into, pool.max_pool_line, as MaxPool's kernel does): the same bits
as the two nodes, but the conv output (ResNet-18's is 3.2 MB per image at 224) is never written
out and read back.

When the pooled tensor goes to binary layers (engine/plan.py), the kernel also writes their first
reader's bit-planes (engine/bits.py: pack_row, as PackPlanes packs them), each work item its own
rows once all their channels are pooled, while they are still in cache.

config: a `ConvMaxPoolConfig`. Input: float32 [B, C, H, W]. Outputs: the MaxPool's float32 [B, O,
out_h, out_w], and with `planes` the bit-planes of that layout (uint64 [P, B, out_h + top + bottom,
out_w + left + right, words]; in the plan's shapes the planes keep the shape of the tensor they code).
Reference: the MaxPool's reference on the Conv's (and its planes packed from float32).
"""
from dataclasses import dataclass

import numba
import numpy as np
from numba import prange

from .. import bits
from ..errors import GraphError
from ..jit import parallel_jit
from . import conv, conv_direct, pool
from .registry import Cost, Op, kept, register


@dataclass(frozen=True, eq=False)
class ConvMaxPoolConfig:
    """conv: the stored Conv node (engine/graph.py: Node; its epilogue at most a ReLU); pool: the
    stored MaxPool node; planes: None, or the PlanesLayout (engine/bits.py) of the bit-planes the
    node also writes."""

    conv: object
    pool: object
    planes: object = None


def _infer_shapes(node, input_shapes):
    conv_shape = conv.infer_shapes(node.config.conv, input_shapes)
    shapes = pool._pool_infer_shapes(node.config.pool, conv_shape)
    layout = node.config.planes
    outputs = 1 if layout is None else 2
    if len(node.outputs) != outputs:
        raise GraphError(f"node {node.name!r} (ConvMaxPool): expects {outputs} output(s), found {len(node.outputs)}")
    if layout is not None and (layout.thresholds.shape[1] != shapes[0][1] or shapes[0][1] % layout.group):
        raise GraphError(f"node {node.name!r} (ConvMaxPool): the planes' thresholds {list(layout.thresholds.shape)} "
                         f"and group {layout.group} do not fit the {shapes[0][1]} output channels")
    return shapes * outputs


def _reference(node, inputs):
    y = pool._max_reference(node.config.pool, conv.reference(node.config.conv, inputs))[0]
    layout = node.config.planes
    return [y] if layout is None else [y, layout.pack_reference(y.astype(np.float32))]


@parallel_jit
def conv_max_pool_kernel(source, sample, offsets, weights, bias, conv_h, conv_w, columns, relu, pool_kh, pool_kw,
                         pool_stride_h, pool_stride_w, pool_top, pool_left, rows_per_item, y, planes, planes_top,
                         planes_left, thresholds, binary, channel_words, channel_shifts, pad_words):
    """y[b, o, py, px] = max over the pool window (rows py * pool_stride_h - pool_top + ky, columns
    px * pool_stride_w - pool_left + kx, those inside the conv output) of conv(b, o, row, column),
    the conv output of conv_direct.direct_conv (same arguments: source, sample, offsets, weights,
    bias, columns, relu; one group). Work items: `rows_per_item` output rows of one sample, one per
    parallel iteration; each walks the 8-channel blocks, computing each conv row its rows need once
    per block into a ring of pool_kh rows (the first conv row of an item may repeat the last of the
    item before). y: float32 [B, O, out_h, out_w]. When `planes` holds planes (P > 0; else [0, 1, 1,
    1, 1]), each item then packs its rows of y into them (`bits.pack_row` with the tables of
    `bits.pack_tables`; planes_top/left: their pads), the first and last items of a sample also
    the pad rows above and below."""
    lanes, block_channels = conv_direct.LANES, conv_direct.CHANNELS_PER_BLOCK
    batch, out_channels, out_h, out_w = y.shape
    taps = offsets.shape[0]
    blocks = -(-out_channels // block_channels)
    row_vectors = -(-conv_w // lanes)
    calls = -(-row_vectors // conv_direct.MAX_VECTORS)  # the row's vectors split as direct_conv splits them
    ring_width = row_vectors * lanes
    line_width, phase_width, copied = pool.max_pool_line_buffers(out_w, pool_kw, pool_stride_w, 1, pool_left, conv_w)
    items_per_image = -(-out_h // rows_per_item)
    for item in prange(batch * items_per_image):
        b = item // items_per_image
        first_row = (item % items_per_image) * rows_per_item
        last_row = min(out_h, first_row + rows_per_item)
        ring = np.empty(pool_kh * block_channels * ring_width, np.float32)  # [conv row % pool_kh, channel, x]
        line = np.full(line_width, -np.inf, dtype=np.float32)  # [pool_left, pool_left + copied) per row
        inside = line[pool_left:pool_left + copied]
        phases = np.empty((pool_stride_w, phase_width), dtype=np.float32)
        for block in range(blocks):
            first_channel = block * block_channels
            channels = min(block_channels, out_channels - first_channel)
            computed = 0  # conv rows below this one are in the ring (or no longer needed)
            for py in range(first_row, last_row):
                start = max(0, py * pool_stride_h - pool_top)
                stop = min(conv_h, py * pool_stride_h - pool_top + pool_kh)
                for row in range(max(computed, start), stop):
                    slot = (row % pool_kh) * block_channels * ring_width
                    for call in range(calls):
                        first_vector = (row_vectors * call) // calls
                        vectors = (row_vectors * (call + 1)) // calls - first_vector
                        first_pixel = first_vector * lanes
                        last_lanes = min(lanes, conv_w - (first_vector + vectors - 1) * lanes)
                        conv_direct.conv_block(source, b * sample + row * columns + first_pixel, offsets, taps,
                                               weights, block * block_channels * taps, bias, first_channel, ring,
                                               slot + first_pixel, ring_width, vectors, last_lanes, channels, relu)
                computed = max(computed, stop)
                for r in range(channels):
                    for row in range(start, stop):
                        ring_row = ring[((row % pool_kh) * block_channels + r) * ring_width:]
                        pool.max_into(inside, ring_row, copied, row == start)
                    pool.max_pool_line(line, pool_kw, pool_stride_w, 1, phases, y[b, first_channel + r, py])
        if planes.shape[0] > 0:
            first_padded = first_row + planes_top if first_row > 0 else 0
            last_padded = last_row + planes_top if last_row < out_h else planes.shape[2]
            for padded_row in range(first_padded, last_padded):
                bits.pack_row(y, b, padded_row, planes_top, planes_left, thresholds, binary, channel_words,
                              channel_shifts, pad_words, planes)


def _make_kernel(node):
    conv_node, pool_node = node.config.conv, node.config.pool
    weight, bias = conv._weights(conv_node)
    direct = conv.DirectConv(conv_node, weight, bias)
    separate = []  # the two nodes' own kernels, for shapes the direct kernel does not take
    layout = node.config.planes
    no_planes = (np.zeros((0, 1, 1, 1, 1), np.uint64), 0, 0, np.zeros((1, 1), np.float32), False,
                 np.zeros(1, np.int64), np.zeros(1, np.uint64), np.zeros((1, 1), np.uint64))
    if layout is not None:
        thresholds = np.ascontiguousarray(layout.thresholds, dtype=np.float32)
        binary = layout.coding == "binary"
        n_planes = bits.activation_planes(thresholds.shape[0], layout.coding)
        words = layout.group * bits.words_for(thresholds.shape[1] // layout.group)
        tables = bits.pack_tables(thresholds, np.float32(layout.pad_value), layout.group, binary, n_planes, words)
        top, left, bottom, right = (int(p) for p in layout.pads)
    pool_geometry = {}  # conv output shape -> the pool's validated geometry (once per input shape)

    def run(inputs, out=None, state=None):
        # state: a Session's dict for this step (registry.Op.keeps_state): the planes go into the
        # same array every run.
        x = inputs[0]
        _, _, _, conv_h, conv_w, columns, narrow, _, offsets, _ = direct.setup(x.shape)
        if narrow:  # rows narrower than a vector: the Conv runs im2col
            if not separate:
                separate.extend((conv.make_kernel(conv_node), pool._make_pool_kernel(pool_node)))
            (y,) = separate[1](separate[0](inputs), out=out)
            return [y] if layout is None else [y, layout.pack(y)]
        if (conv_h, conv_w) not in pool_geometry:
            pool_geometry[conv_h, conv_w] = pool._geometry(pool_node, (x.shape[0], weight.shape[0], conv_h, conv_w))
        kernel, strides, pads, _, (out_h, out_w) = pool_geometry[conv_h, conv_w]
        batch = x.shape[0]
        y = np.empty((batch, weight.shape[0], out_h, out_w), np.float32) if out is None else out
        # One item per image at one thread (no conv row computed twice); else about two per thread.
        chunks = min(out_h, -(-2 * numba.get_num_threads() // batch)) if numba.get_num_threads() > 1 else 1
        flat, sample = direct.source(x)
        planes_output = no_planes
        if layout is not None:
            planes_shape = (n_planes, batch, out_h + top + bottom, out_w + left + right, words)
            planes = kept(state, "planes", planes_shape, lambda: np.empty(planes_shape, np.uint64))
            planes_output = (planes, top, left, thresholds, binary) + tables
        conv_max_pool_kernel(flat, sample, offsets, direct.packed, direct.padded_bias, conv_h, conv_w, columns,
                             direct.fused_relu, kernel[0], kernel[1], strides[0], strides[1], pads[0], pads[1],
                             -(-out_h // chunks), y, *planes_output)
        return [y] if layout is None else [y, planes_output[0]]

    return run


def _cost(node, input_shapes, output_shapes):
    conv_shape = conv.infer_shapes(node.config.conv, input_shapes)
    conv_cost = conv.cost(node.config.conv, input_shapes, [conv_shape])
    pool_cost = pool._pool_cost(node.config.pool, [conv_shape], output_shapes)
    return Cost(flops=conv_cost.flops + pool_cost.flops, float_flops=conv_cost.float_flops + pool_cost.float_flops,
                float32_params=conv_cost.float32_params)


def _scratch_bytes(node, input_shapes, output_shapes):
    conv_node = node.config.conv
    conv_shape = conv.infer_shapes(conv_node, input_shapes)
    return conv.padded_input_and_columns_bytes(conv_node, input_shapes, [conv_shape], conv_node.params["weight"].shape[2:4])


register(Op("ConvMaxPool", "a float Conv and its MaxPool in one pass (plan-only)", _infer_shapes, _reference,
            _make_kernel, _cost, output_buffer=True, uses_blas=True, plan_only=True, scratch_bytes=_scratch_bytes,
            output_memory=lambda node: ("buffer",) + ("own",) * (len(node.outputs) - 1), keeps_state=True))
