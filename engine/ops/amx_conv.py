"""AmxConv (plan-only): a PAConv computed with AMX-INT8 tiles (engine/amx.py) on CPUs that have
them, with its epilogue (bias, residual, ReLU). Same inputs, outputs and values as the PAConv.

The PA combine (engine/ops/pa_conv.py) needs, per output, the counts
popcount(b_k & a_p) over the window for each weight plane k and activation plane p. With the
weight bits as bytes (0/1) and the activation planes as bytes, they are exact integer dot
products, which AMX computes 16 x 16 x 64 at a time:
- "thermometer" code: R = P rows per pixel, row p holding a_p (0/1) for every channel;
  count[k, p] = dot(b_k, a_p), act term sum_p e_p * sum(a_p);
- "binary" code: R = 1 row per pixel holding q (the level index, 0..N); dot(b_k, q) =
  sum_b 2^b count[k, b], so the combine takes 2 d_k e times it, and the act term e * sum(q).
The result is the PA combine of the same integers, in float64, rounded once to float32: equal to
the reference up to the float rounding of the combine (for the binary code, summed in another
order than BinaryConv's per-plane counts).

Layout of the codes (uint8 [batch, image stride], `Packing`): each image's [Hp, Wp, R', Cp] for
the input padded by the conv's pads (Hp x Wp), R' = R rounded up to a power of two (rows R..R'-1
of a pixel are never used), Cp = channels rounded up to 64, so one pixel's R' rows are 64-byte tile
rows at a stride of Cp bytes; then the slack the image's last block may read past it (its rows are
dropped, so neither the slack nor the bytes past the channels need any value: the weights there
are 0). They are packed from the float32 input (`_pack_codes_kernel`) or written by the AmxConv
before (its epilogue's `amx.code_row`, the border by `_fill_padding_codes`). The columns of the
GEMM are (32-channel pair of output channels, weight plane k), each a pair of 16-column B tiles; a
step of K is one tap (ky, kx) and 64 channels.

Rows of the GEMM, in blocks of 32 (the micro-kernel's two A tiles):
- stride 1: each image's rows are its padded positions read as one sequence (v = oy * Wp + ox,
  row v * R' + p: a uniform stride of Cp bytes, as if the output were Wp wide; the columns
  ox >= out_w are computed and dropped), so small maps fill the tiles (7 x 7: 63 of 64 rows);
  equal strides s with one row per pixel likewise (v at s * Cp bytes: input position s * v), where
  that drops fewer rows than the next way (7 x 7 outputs of a stride-2 conv: 7 of 16 rows kept);
- otherwise (R' <= 2): per output row, 32 pixels (R' = 1) or 16 pixels by 2 planes (R' = 2) a
  block, at a stride of stride_w * R' * Cp bytes.
`computable` says which PAConvs it can compute: one group, padding rule other than
"zero_after_quantizer" (whose border correction it does not do), R' <= 16, and R' <= 2 when
strided. A Session's plan (engine/plan.py) uses it where amx.available() and the Session allows,
for the layers `qualifies` names: those with a binary code of 2 or more planes, where it takes M
passes against the AND-popcount kernels' M x B. With the thermometer code both take M x N passes,
and the AND-popcount kernels (bit-planes handed from layer to layer, epilogues in registers) were
faster in ResNet-18 on a Xeon with AMX (docs/benchmarks.md).

config: AmxConvConfig (the PAConv node with its fused epilogue, the layouts and hand-offs the plan
chose). Inputs: [x float32 or its codes, optional residual float32]; outputs: [y], [y, the next
AmxConv's codes] or [those codes] (AmxConvConfig.outputs).
"""
from dataclasses import dataclass

import numba
import numpy as np
from numba import prange

from .. import amx
from ..bits import thresholds_passed_reference, unpack_weight_planes
from ..errors import GraphError
from ..jit import inline_jit, parallel_jit
from . import _epilogue, pa_conv
from .conv import conv_geometry
from .registry import Op, get_op, kept, register

CHANNEL_PAIR = amx.BLOCK_COLUMNS  # output channels of one pair of B tiles
MAX_ROWS = 16  # most rows per pixel (R')


def row_planes(layer):
    """(R, R'): rows per pixel the code needs, and the power of two the layout gives each pixel."""
    rows = 1 if pa_conv.act_coding(layer) == "binary" else layer.params["act_steps"].shape[0]
    padded = 1
    while padded < rows:
        padded *= 2
    return rows, padded


def computable(layer):
    """Whether AmxConv can compute PAConv `layer` (see the module docstring)."""
    if layer.op != "PAConv" or pa_conv.group_of(layer) != 1:
        return False
    if pa_conv.padding_rule(layer)[0] == "zero_after_quantizer":
        return False
    _, padded = row_planes(layer)
    strides = layer.attrs.get("strides", (1, 1))
    return padded <= MAX_ROWS and (tuple(strides) == (1, 1) or padded <= 2)


def qualifies(layer):
    """Whether a Session runs PAConv `layer` as an AmxConv: AmxConv computes it and takes fewer passes
    than the AND-popcount kernels (a binary code of 2 or more planes; see the module docstring)."""
    return (computable(layer) and pa_conv.act_coding(layer) == "binary"
            and layer.params["act_steps"].shape[0] >= 2)


@dataclass(frozen=True, eq=False)
class AmxConvConfig:
    """layer: the PAConv node. input_last, residual_last, output_last: whether its input, its residual
    and its output are held channels-last ([B, H, W, C] in the buffer of the [B, C, H, W] tensor the
    plan's shapes name), between AmxConv steps only. input_hw: (H, W) of its input when it reads the
    codes an AmxConv before it wrote (the [B, image stride] uint8 of `Packing`), else None.
    codes_for: the PAConv node of the AmxConv step its output's codes are written for (beside the
    float32 output when writes_float), or None. The plan makes these (engine/plan.py: use_amx_convs)."""
    layer: object
    input_last: bool = False
    residual_last: bool = False
    output_last: bool = False
    input_hw: tuple = None
    codes_for: object = None
    writes_float: bool = True

    def outputs(self):
        """How many outputs the step has: 2 when it writes float32 and codes, else 1."""
        return 2 if self.codes_for is not None and self.writes_float else 1


def pack_weight_tiles(weight_planes, in_channels):
    """(tile_bits uint64 [pairs * M, kh * kw * chunks, 2, 16], ones int8 [kh * kw * chunks, 2, 16, 16, 4]):
    the weight bits (1 for +1) of the micro-kernel's B tiles, one uint64 per 64-byte tile row, and
    the tile pair of the window sums.

    In tile pair (pair, k), step t = (ky, kx, chunk of 64 channels), tile h of the pair, row r: bit
    4 j + i (byte 4 j + i of the row once expanded by amx.expand_rows) is b_k[o = 32 pair + 16 h + j,
    c = 64 chunk + 4 r + i, ky, kx] (0 past the channels and output channels). The weights stay bits
    (8x less memory traffic than bytes: ResNet-18's last layers stream theirs from memory each run)
    and each work item expands a pair's tiles into its cache. `ones` holds 1 in column 0 of tile 0 for
    every channel (its counts are the window sums of the codes), 0 elsewhere."""
    m_planes, out_channels, kh, kw, _ = weight_planes.shape
    bits = unpack_weight_planes(weight_planes, in_channels)  # [M, O, C, kh, kw]
    pairs = -(-out_channels // CHANNEL_PAIR)
    chunks = -(-in_channels // amx.ROW_BYTES)
    padded = np.zeros((m_planes, pairs * CHANNEL_PAIR, chunks * amx.ROW_BYTES, kh, kw), dtype=bool)
    padded[:, :out_channels, :in_channels] = bits
    # [M, pair, h, j, chunk, r, i, ky, kx] -> [pair, M, ky, kx, chunk, h, r, j, i]
    rows = padded.reshape(m_planes, pairs, 2, 16, chunks, 16, 4, kh, kw).transpose(1, 0, 7, 8, 4, 2, 5, 3, 6)
    tile_bits = np.packbits(np.ascontiguousarray(rows).reshape(-1, 64), axis=-1, bitorder="little").view(np.uint64)
    ones = np.zeros((kh, kw, chunks, 2, 16, 16, 4), dtype=np.int8)
    channel_ones = np.zeros(chunks * amx.ROW_BYTES, dtype=np.int8)
    channel_ones[:in_channels] = 1
    ones[:, :, :, 0, :, 0, :] = channel_ones.reshape(chunks, 16, 4)
    aligned_ones = amx.aligned_empty(ones.size, np.int8)
    aligned_ones[:] = ones.reshape(-1)
    return np.ascontiguousarray(tile_bits.reshape(-1)), aligned_ones


def pack_codes_reference(x, thresholds, coding, pads, pad_value, padded_rows, padded_channels):
    """uint8 [B, Hp, Wp, R', Cp] codes of float32 x [B, C, H, W] (module docstring), plain numpy;
    rows R..R'-1 are 0 here (the kernel leaves them unwritten)."""
    passed = np.moveaxis(thresholds_passed_reference(np.asarray(x, dtype=np.float32), thresholds, pads, pad_value),
                         0, -2)  # [B, Hp, Wp, N, C]
    rows = passed.sum(axis=-2, keepdims=True) if coding == "binary" else passed
    codes = np.zeros(passed.shape[:3] + (padded_rows, padded_channels), dtype=np.uint8)
    codes[..., :rows.shape[-2], :x.shape[1]] = rows
    return codes


@inline_jit
def _code_bytes(codes, at, values, source, thresholds, threshold_at, count, binary, n_thresholds):
    """codes[at + c] = values[source + c] >= thresholds[threshold_at + c] (binary: the count of the
    n_thresholds rows of thresholds, each `count` apart, that values[source + c] passes) for c <
    count.

    The offsets are uint64: numba wraps a signed index that LLVM cannot prove non-negative on every
    access, which keeps these loops from vectorizing (about ten times slower), and a slice per pixel
    costs reference counting."""
    if binary:
        for c in range(count):
            codes[at + c] = 0
        for j in range(n_thresholds):
            row = threshold_at + j * count
            for c in range(count):
                codes[at + c] += values[source + c] >= thresholds[row + c]
    else:
        for c in range(count):
            codes[at + c] = values[source + c] >= thresholds[threshold_at + c]


@parallel_jit
def _pack_codes_kernel(x, thresholds, binary, top, left, codes, padded_width, padded_rows, padded_channels, rows):
    """The inside of codes [B, image stride] (each image's [Hp, Wp, R', Cp] first) from channels-last
    x [B, H, W, C]: at (y + top, x + left), rows 0..R-1 from the thresholds [N, C] (binary: the count
    of thresholds passed), bytes past C 0. `_fill_padding_codes` writes the padded positions."""
    batch, height, width, channels = x.shape
    values = x.reshape(-1)
    flat_thresholds = thresholds.reshape(-1)
    n_thresholds = np.uint64(thresholds.shape[0])
    count = np.uint64(channels)
    pixel_bytes = padded_rows * padded_channels
    image_stride = codes.shape[1]
    flat_codes = codes.reshape(-1)
    for item in prange(batch * height):
        b = item // height
        y = item % height
        for column in range(width):
            start = b * image_stride + ((y + top) * padded_width + column + left) * pixel_bytes
            source = np.uint64(((b * height + y) * width + column) * channels)
            for r in range(rows):
                at = np.uint64(start + r * padded_channels)
                _code_bytes(flat_codes, at, values, source, flat_thresholds, np.uint64(r) * count, count, binary,
                            n_thresholds)
                for c in range(channels, padded_channels):
                    flat_codes[start + r * padded_channels + c] = 0


@parallel_jit
def _fill_padding_codes(codes, pad_codes, top, left, height, width, padded_height, padded_width, rows):
    """pad_codes [R', Cp] into every padded position (outside the height x width inside starting at
    top, left) of each image of codes [B, image stride] (an AmxConv writes the inside)."""
    padded_channels = pad_codes.shape[1]
    pixel_bytes = pad_codes.shape[0] * padded_channels
    flat_pad = pad_codes.reshape(-1)
    flat_codes = codes.reshape(-1)
    batch, image_stride = codes.shape
    for item in prange(batch * padded_height):
        b = item // padded_height
        y = item % padded_height - top
        for column in range(padded_width):
            if 0 <= y < height and left <= column < left + width:
                continue
            start = b * image_stride + ((y + top) * padded_width + column) * pixel_bytes
            for i in range(rows * padded_channels):
                flat_codes[start + i] = flat_pad[i]


@parallel_jit
def _channel_major_copy(y, out):
    """out[b, c, row, column] = y[b, row, column, c] (channels-last y [B, H, W, C] into out [B, C, H,
    W]): contiguous writes, reads a channel apart (numpy's copy of the transposed view took 7x as
    long on a 256-channel 56 x 56 map)."""
    batch, height, width, channels = y.shape
    source = y.reshape(-1)
    target = out.reshape(-1)
    count = np.uint64(width)
    step = np.uint64(channels)
    for item in prange(batch * height):
        b = item // height
        row = item % height
        for c in range(channels):
            at = np.uint64(((b * channels + c) * height + row) * width)
            start = np.uint64(item * width * channels + c)
            for column in range(count):
                target[at + column] = source[start + column * step]


@inline_jit
def _cache_line_aligned(buffer, size):
    """The `size` elements of 1-D `buffer` (at least 64 bytes longer) from its first 64-byte
    boundary: tile rows load and store at cache-line boundaries (about three times faster)."""
    skip = (-buffer.ctypes.data) % 64 // buffer.itemsize
    return buffer[skip:skip + size]


@parallel_jit
def amx_conv_kernel(codes, rows, out_pixels, offsets, block_starts, a_stride, block_pixels, block_slots, block_rows,
                    blocks_per_item, pairs_per_item, tile_bits, ones, m_planes, out_channels, constant, lowest_weight,
                    row_pair_scales, row_steps, residual, has_residual, relu, y, handoff):
    """y (float32) of the codes (module docstring): per work item (image, `blocks_per_item` blocks of
    32 rows, `pairs_per_item` channel pairs), for each (channel pair, weight plane) the pair's weight
    tiles expanded from their bits into the item's cache, then the counts of each block from
    amx_block, combined in float64. The window sums of the codes (the act term) come from one more
    pair of tiles, `ones`. Items write disjoint pixels or channels.

    rows: R, the code rows of a pixel; out_pixels: out_h * out_w; offsets int64 [steps]: the byte offset
    of each step (tap, channel chunk) from a row's start; block_starts int64 [blocks, 2]: where the
    block's two A tiles start in an image's codes; block_pixels int64 [blocks, 32]: the output pixels
    of the block (oy * out_w + ox, -1 for none); block_slots int64 [blocks]: 1 + its last slot
    holding a pixel; block_rows int64 [blocks, 32, R]: the block row of each pixel's row r (0 for
    none); tile_bits, ones: `pack_weight_tiles`; constant, lowest_weight float64 [pairs * 32];
    row_pair_scales float64 [M, R, pairs * 32]; row_steps float64 [R]; y and the residual (when
    has_residual) channels-last [B, out_h * out_w, O]; codes [B, image stride] (uint8).
    handoff: (next_codes [B, its image stride] uint8, writes_codes, thresholds float32 [N' * pairs * 32]
    (the reader's, +inf past O), N', binary, slot_offsets int64 [blocks, 32], padded_channels,
    writes_float): with writes_codes, each output pixel's codes for the next AmxConv (amx.code_row) at
    slot_offsets[block, slot] in its image (the pixel's padded position in the reader's layout); y
    is written too when writes_float (else it is scratch)."""
    next_codes, writes_codes, next_thresholds, next_count, next_binary, slot_offsets, next_channels, \
        writes_float = handoff
    flat_codes = codes.reshape(-1)
    flat_next = next_codes.reshape(-1)
    next_stride = next_codes.shape[1]
    batch = codes.shape[0]
    k_steps = offsets.shape[0]
    n_blocks = block_starts.shape[0]
    columns = amx.BLOCK_COLUMNS
    pairs = constant.shape[0] // columns
    image_stride = codes.shape[1]
    size = amx.BLOCK_ROWS
    pair_items = -(-pairs // pairs_per_item)
    items_per_image = -(-n_blocks // blocks_per_item) * pair_items
    padded_out = constant.shape[0]
    flat_scales = row_pair_scales.reshape(-1)
    flat_y = y.reshape(-1)
    flat_residual = residual.reshape(-1)
    for item in prange(batch * items_per_image):
        b = item // items_per_image
        first_block = (item % items_per_image) // pair_items * blocks_per_item
        first_pair = (item % pair_items) * pairs_per_item
        n_item_blocks = min(blocks_per_item, n_blocks - first_block)
        image = b * image_stride
        scratch = np.empty(columns, dtype=np.float32)  # y of one pixel's pair when only codes go out
        counts = _cache_line_aligned(np.empty(size * columns + 16, dtype=np.int32), size * columns)
        partial = np.empty((n_item_blocks, size, columns))
        act_terms = np.zeros((n_item_blocks, size))
        flat_partial = partial.reshape(-1)
        tiles = _cache_line_aligned(np.empty(k_steps * amx.STEP_BYTES + 64, dtype=np.int8), k_steps * amx.STEP_BYTES)
        amx.amx_start()
        for i in range(n_item_blocks):
            block = first_block + i
            amx.amx_block(flat_codes, offsets, k_steps, image + block_starts[block, 0],
                          image + block_starts[block, 1], a_stride, ones, 0, counts)
            for s in range(block_slots[block]):
                for r in range(rows):
                    act_terms[i, s] += row_steps[r] * counts[block_rows[block, s, r] * columns]
        # The last (plane, row) pair of counts goes straight into the epilogue (finish_row); the others
        # are summed in `partial` first.
        summed = m_planes * rows > 1
        for pair in range(first_pair, min(pairs, first_pair + pairs_per_item)):
            first = pair * columns
            last = min(columns, out_channels - first)
            partial[:] = 0.0
            for k in range(m_planes):
                amx.expand_rows(tile_bits, (pair * m_planes + k) * k_steps * 2 * amx.ROWS, k_steps * 2 * amx.ROWS,
                                tiles)
                for i in range(n_item_blocks):
                    block = first_block + i
                    amx.amx_block(flat_codes, offsets, k_steps, image + block_starts[block, 0],
                                  image + block_starts[block, 1], a_stride, tiles, 0, counts)
                    for r in range(rows):
                        scales_start = (k * rows + r) * padded_out + first
                        if k == m_planes - 1 and r == rows - 1:
                            for s in range(block_slots[block]):
                                pixel = block_pixels[block, s]
                                if pixel < 0:
                                    continue
                                at = (b * out_pixels + pixel) * out_channels + first
                                # Two calls rather than a chosen (array, start) pair: a tuple holding an
                                # array costs reference counting per pixel.
                                if writes_float:
                                    amx.finish_row(flat_partial, (i * size + s) * columns, summed, flat_scales,
                                                   scales_start, counts, block_rows[block, s, r] * columns, constant,
                                                   lowest_weight, first, act_terms[i, s], flat_residual, at,
                                                   has_residual, relu, flat_y, at, last)
                                else:
                                    amx.finish_row(flat_partial, (i * size + s) * columns, summed, flat_scales,
                                                   scales_start, counts, block_rows[block, s, r] * columns, constant,
                                                   lowest_weight, first, act_terms[i, s], flat_residual, at,
                                                   has_residual, relu, scratch, 0, last)
                                if writes_codes:
                                    amx.code_row(flat_y if writes_float else scratch, at if writes_float else 0,
                                                 next_thresholds, first, next_count, constant.shape[0], next_binary,
                                                 flat_next, b * next_stride + slot_offsets[block, s] + first,
                                                 next_channels, last)
                        else:
                            for s in range(block_slots[block]):
                                amx.add_scaled_row(flat_partial, (i * size + s) * columns, flat_scales, scales_start,
                                                   counts, block_rows[block, s, r] * columns)
        amx.amx_end()


def _blocks(padded_width, out_h, out_w, strides, rows, padded_rows, padded_channels):
    """(block_starts [blocks, 2], a_stride, block_pixels [blocks, 32], block_rows [blocks, 32, R]) of
    one image (module docstring)."""
    size = amx.BLOCK_ROWS
    stride_h, stride_w = strides
    starts, pixels, block_rows = [], [], []
    # One sequence of rows per image (v = oy * Wp + ox at v * stride pixels: rows ox >= out_w dropped)
    # where strides are equal and a pixel has one row or the stride is 1; for strides above 1 only
    # where it drops fewer rows than blocks per output row do (small maps: 7 of 16 against 7 of 32).
    per_row = -(-out_w // size) * size
    linear = stride_h == stride_w and (stride_w == 1 or (padded_rows == 1 and padded_width < per_row))
    if linear and out_h * padded_width * padded_rows > 0:
        step = stride_w * padded_channels
        sequence = out_h * padded_width * padded_rows
        per_block = size // padded_rows
        for first in range(0, sequence, size):
            starts.append((first * step, (first + amx.ROWS) * step))
            block = np.full(size, -1, dtype=np.int64)
            where = np.zeros((size, rows), dtype=np.int64)
            for s in range(per_block):
                v = first // padded_rows + s
                oy, ox = divmod(v, padded_width)
                if oy < out_h and ox < out_w:
                    block[s] = oy * out_w + ox
                    where[s] = s * padded_rows + np.arange(rows)
            pixels.append(block)
            block_rows.append(where)
        return np.array(starts, dtype=np.int64), step, np.array(pixels), np.array(block_rows)
    pixel_bytes = padded_rows * padded_channels
    per_block = size // padded_rows
    for oy in range(out_h):
        for ox0 in range(0, out_w, per_block):
            start = (oy * stride_h * padded_width + ox0 * stride_w) * pixel_bytes
            second = start + (padded_channels if padded_rows == 2 else amx.ROWS * stride_w * pixel_bytes)
            starts.append((start, second))
            block = np.full(size, -1, dtype=np.int64)
            where = np.zeros((size, rows), dtype=np.int64)
            for s in range(min(per_block, out_w - ox0)):
                block[s] = oy * out_w + ox0 + s
                where[s] = [s + amx.ROWS * r for r in range(rows)] if padded_rows == 2 else s
            pixels.append(block)
            block_rows.append(where)
    return (np.array(starts, dtype=np.int64), stride_w * pixel_bytes, np.array(pixels), np.array(block_rows))


MIN_SPLIT_STEPS = 16  # fewest steps (taps x 64-channel chunks) of a conv whose items may split channel pairs
ITEM_BYTES = 512 << 10  # codes and partial sums of one work item's blocks: within the L2 cache


class Packing:
    """How AmxConv codes the input of PAConv `layer` (module docstring): its thresholds and code, the
    rows per pixel, the padded channels, its pads and the codes of a padded position; and, per input
    shape, the kernel's geometry and the codes' image stride (the image's bytes and the slack its
    last block may read past it, to a cache line)."""

    def __init__(self, layer):
        p = pa_conv._params(layer)
        self.layer = layer
        self.in_channels = layer.attrs["in_channels"]
        self.rows, self.padded_rows = row_planes(layer)
        self.padded_channels = -(-self.in_channels // amx.ROW_BYTES) * amx.ROW_BYTES
        self.coding = pa_conv.act_coding(layer)
        self.thresholds = np.ascontiguousarray(p["act_thresholds"], dtype=np.float32)
        self.kernel_hw = p["weight_planes"].shape[2:4]
        _, self.pad_value = pa_conv.padding_rule(layer)
        self.pad_codes = pack_codes_reference(np.full((1, self.in_channels, 1, 1), self.pad_value, np.float32),
                                              self.thresholds, self.coding, (0, 0, 0, 0), 0.0, self.padded_rows,
                                              self.padded_channels)[0, 0, 0]

    def geometry(self, shape):
        """(padded height and width, pads, offsets, block starts, a_stride, block pixels, block slots,
        block rows, image stride, output shape) for an input of `shape` [B, C, H, W] (amx_conv_kernel's
        arguments)."""
        if len(shape) != 4 or shape[1] != self.in_channels:
            raise GraphError(f"node {self.layer.name!r} (AmxConv): expects an input [batch, {self.in_channels}, "
                             f"height, width], found {list(shape)}")
        kh, kw = self.kernel_hw
        strides, pads, dilations, (out_h, out_w) = conv_geometry(self.layer, shape, self.kernel_hw)
        padded_height = shape[2] + pads[0] + pads[2]
        padded_width = shape[3] + pads[1] + pads[3]
        pixel_bytes = self.padded_rows * self.padded_channels
        chunks = self.padded_channels // amx.ROW_BYTES
        offsets = np.array([((ky * dilations[0]) * padded_width + kx * dilations[1]) * pixel_bytes + chunk * amx.ROW_BYTES
                            for ky in range(kh) for kx in range(kw) for chunk in range(chunks)], dtype=np.int64)
        starts, a_stride, pixels, rows = _blocks(padded_width, out_h, out_w, strides, self.rows, self.padded_rows,
                                                 self.padded_channels)
        image_bytes = padded_height * padded_width * pixel_bytes
        # The last block may read past its image (rows dropped): each image gets that much slack.
        reach = int(starts.max()) + (amx.ROWS - 1) * a_stride + int(offsets.max()) + amx.ROW_BYTES
        image_stride = -(-max(image_bytes, reach) // amx.ROW_BYTES) * amx.ROW_BYTES
        slots = np.array([1 + max(np.flatnonzero(block >= 0), default=-1) for block in pixels], dtype=np.int64)
        return ((padded_height, padded_width), pads, offsets, starts, a_stride, pixels, slots, rows, image_stride,
                (shape[0], self.layer.params["weight_planes"].shape[1], out_h, out_w))

    def empty_codes(self, batch, image_stride, inside_hw, pads):
        """Codes [batch, image_stride] (64-byte aligned) for an input of inside_hw padded by `pads`,
        their padded positions written (pad_codes); the inside is left to the packing or to the
        AmxConv that hands them on."""
        height, width = inside_hw
        codes = amx.aligned_empty(batch * image_stride, np.uint8).reshape(batch, image_stride)
        _fill_padding_codes(codes, self.pad_codes, pads[0], pads[1], height, width, height + pads[0] + pads[2],
                            width + pads[1] + pads[3], self.rows)
        return codes


class AmxConvRunner:
    """The kernel of one AmxConv (an AmxConvConfig): weight tiles and combine coefficients made
    once, the geometry per input shape and thread count."""

    def __init__(self, config):
        if not amx.available():
            raise GraphError(f"node {config.layer.name!r} (AmxConv): AMX-INT8 tiles are not available here")
        layer = config.layer
        p = pa_conv._params(layer)
        self.config = config
        self.layer = layer
        self.packing = Packing(layer)
        self.rows = self.packing.rows
        self.coding = self.packing.coding
        self.m_planes, self.out_channels, _, _, _ = p["weight_planes"].shape
        self.tile_bits, self.ones = pack_weight_tiles(p["weight_planes"], self.packing.in_channels)
        constant, lowest_weight, pair_scales, steps = pa_conv.combine_coefficients(p, self.packing.in_channels)
        if self.coding == "binary":  # one row of q: 2 d_k e, and e
            pair_scales, steps = pair_scales[:, :1], steps[:1]
        self.pairs = -(-self.out_channels // CHANNEL_PAIR)  # pairs of B tiles over the output channels
        padded_out = self.pairs * CHANNEL_PAIR
        self.constant = np.zeros(padded_out)
        self.constant[:self.out_channels] = constant
        self.lowest_weight = np.zeros(padded_out)
        self.lowest_weight[:self.out_channels] = lowest_weight
        self.row_pair_scales = np.zeros((self.m_planes, self.rows, padded_out))
        self.row_pair_scales[..., :self.out_channels] = pair_scales
        self.row_steps = np.ascontiguousarray(steps, dtype=np.float64)
        self.relu = layer.attrs.get("activation") == "relu"
        self.next = None
        if config.codes_for is not None:
            self.next = Packing(config.codes_for)
            # The reader's thresholds by output channel, +inf on the padding channels (never passed).
            self.next_thresholds = np.full((self.next.thresholds.shape[0], padded_out), np.inf, dtype=np.float32)
            self.next_thresholds[:, :self.out_channels] = self.next.thresholds
            self.next_thresholds = self.next_thresholds.reshape(-1)
        # The kernel's arguments when there is no residual, or no codes to hand on (made once).
        self._no_residual = np.zeros((1, 1, 1), dtype=np.float32)
        self._no_handoff = (np.zeros((1, amx.ROW_BYTES), dtype=np.uint8), False, np.zeros(1, np.float32), 0, False,
                            np.zeros((1, 1), np.int64), 1, True)
        self._per_shape = {}

    def setup(self, shape, threads):
        """What depends on the input shape and thread count only (validated by Packing.geometry)."""
        _, pads, offsets, starts, a_stride, pixels, slots, rows, image_stride, output_shape = \
            self.packing.geometry(shape)
        # Blocks per work item: as many as keep their codes and partial sums in L2 (the weight tiles
        # of a (pair, plane) are then expanded once per item), and at least one item per thread.
        block_bytes = amx.BLOCK_ROWS * (len(offsets) * amx.ROW_BYTES + 8 * CHANNEL_PAIR)
        per_item = max(1, min(ITEM_BYTES // block_bytes, -(-len(starts) * shape[0] // threads)))
        # Then the blocks spread evenly over as many items as the next multiple of the thread count
        # (ResNet-18's 28x28 maps: 27 blocks in items of 11 gave one of two threads 16 of them).
        items = -(-shape[0] * -(-len(starts) // per_item) // threads) * threads
        per_item = -(-len(starts) // -(-items // shape[0]))
        # Where an image's blocks are fewer than two per thread (a 7x7 map: 2 blocks) and the images
        # fewer than the threads, the items split the channel pairs instead, so each expands the
        # weight tiles of its own pairs only (in ResNet-18's 512-channel 3x3 layers the expansion
        # was 38% of the time at 1 thread; for its 1x1 downsampling convs, with 4 steps, splitting
        # the pairs was slower).
        pairs_per_item = self.pairs
        few_blocks = len(starts) < 2 * threads and shape[0] < threads
        if few_blocks and self.pairs > 1 and len(offsets) >= MIN_SPLIT_STEPS:
            per_item = len(starts)
            pairs_per_item = -(-self.pairs // -(-threads // shape[0]))
        next_geometry = slot_offsets = None
        if self.next is not None:
            next_shape = (shape[0],) + tuple(output_shape[1:])
            next_geometry = self.next.geometry(next_shape)
            (_, next_width), next_pads, *_ = next_geometry
            out_w = output_shape[3]
            # Where each block slot's pixel lies in an image of the reader's codes (no division per pixel).
            position = (pixels // out_w + next_pads[0]) * next_width + pixels % out_w + next_pads[1]
            slot_offsets = np.where(pixels >= 0, position * self.next.padded_rows * self.next.padded_channels, 0)
        return (pads, offsets, starts, a_stride, pixels, slots, rows, (per_item, pairs_per_item), image_stride,
                output_shape, next_geometry, slot_offsets)  # (blocks, pairs) per work item

    @staticmethod
    def _codes(packing, batch, image_stride, inside_hw, pads, state, key):
        """packing.empty_codes(...), or with a Session's `state` (registry.Op.keeps_state) the array
        it made for the last run of these arguments: its padded positions are written once, the
        inside again by every run."""
        return kept(state, key, (batch, image_stride, inside_hw, tuple(pads)),
                    lambda: packing.empty_codes(batch, image_stride, inside_hw, pads))

    def _pack(self, x, pads, image_stride, state=None):
        """The codes [B, image_stride] of float32 x [B, C, H, W] (channels-last in memory with
        config.input_last, else transposed first)."""
        packing = self.packing
        batch, channels, height, width = x.shape
        pixels = x.reshape(batch, height, width, channels) if self.config.input_last \
            else np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        codes = self._codes(packing, batch, image_stride, (height, width), pads, state, "input codes")
        _pack_codes_kernel(pixels, packing.thresholds, packing.coding == "binary", pads[0], pads[1], codes,
                           width + pads[1] + pads[3], packing.padded_rows, packing.padded_channels, packing.rows)
        return codes

    def __call__(self, inputs, out=None, state=None):
        """Outputs of inputs [x or codes, optional residual] (AmxConvConfig.outputs); the kernel works
        channels-last, so a channel-major input, residual or output (config) is transposed on the way
        (the inputs by numpy's copy, the output by `_channel_major_copy`). state: None, or a Session's
        dict for this step (registry.Op.keeps_state): the codes it packs or hands on go into the same
        arrays every run."""
        config = self.config
        if config.input_hw is not None:
            codes = inputs[0]
            shape = (codes.shape[0], self.packing.in_channels) + tuple(config.input_hw)
        else:
            x = np.ascontiguousarray(inputs[0], dtype=np.float32)
            shape = x.shape
        key = (shape, numba.get_num_threads())
        if key not in self._per_shape:
            self._per_shape[key] = self.setup(*key)
        pads, offsets, starts, a_stride, pixels, slots, rows, item_split, image_stride, output_shape, next_geometry, \
            slot_offsets = self._per_shape[key]
        if config.input_hw is None:
            codes = self._pack(x, pads, image_stride, state)
        elif codes.shape[1] != image_stride:
            raise GraphError(f"node {self.layer.name!r} (AmxConv): codes of {codes.shape[1]} bytes per image, "
                             f"expected {image_stride}")
        batch, out_channels, out_h, out_w = output_shape
        last_shape = (batch, out_h * out_w, out_channels)
        if len(inputs) == 2:
            residual = np.ascontiguousarray(inputs[1], dtype=np.float32)
            if not config.residual_last:
                residual = np.ascontiguousarray(residual.transpose(0, 2, 3, 1))
            residual = residual.reshape(last_shape)
        else:
            residual = self._no_residual
        if config.output_last and out is not None and out.flags.c_contiguous:
            y = out
        else:
            y = np.empty(output_shape if config.writes_float else (1, 1, 1, 1), dtype=np.float32)
        handoff = self._no_handoff
        next_codes = None
        if self.next is not None:
            next_packing = self.next
            _, next_pads, *_, next_stride, _ = next_geometry
            next_codes = self._codes(next_packing, batch, next_stride, (out_h, out_w), next_pads, state,
                                     "output codes")
            handoff = (next_codes, True, self.next_thresholds, next_packing.thresholds.shape[0],
                       next_packing.coding == "binary", slot_offsets, next_packing.padded_channels,
                       config.writes_float)
        amx_conv_kernel(codes, self.rows, out_h * out_w, offsets, starts, a_stride, pixels, slots, rows, *item_split,
                        self.tile_bits, self.ones, self.m_planes, self.out_channels, self.constant,
                        self.lowest_weight, self.row_pair_scales, self.row_steps, residual, len(inputs) == 2,
                        self.relu, y.reshape(last_shape if config.writes_float else (1, 1, 1)), handoff)
        if not config.writes_float:
            return [next_codes]
        if not config.output_last:
            target = out if out is not None and out.flags.c_contiguous else np.empty(output_shape, np.float32)
            _channel_major_copy(y.reshape(batch, out_h, out_w, out_channels), target)
            y = target
        if out is not None and y is not out:
            out[...] = y
            y = out
        return [y] if next_codes is None else [y, next_codes]


def _layer_op(node):
    return get_op(node.config.layer.op, node.name)


def _infer_shapes(node, input_shapes):
    config = node.config
    if len(node.inputs) != len(config.layer.inputs) or len(node.outputs) != config.outputs():
        raise GraphError(f"node {node.name!r} (AmxConv): expects {len(config.layer.inputs)} input(s) and "
                         f"{config.outputs()} output(s), found {len(node.inputs)} and {len(node.outputs)}")
    (output_shape,) = _layer_op(node).infer_shapes(config.layer, input_shapes)
    return [output_shape] * config.outputs()  # codes keep, in the plan's shapes, the shape of the tensor they code


def decode_codes(codes, packing, height, width):
    """float64 [B, C, Hp, Wp]: the activation levels of codes [B, image stride] (Packing's layout) of
    an input of height x width padded by the layer's pads."""
    layer = packing.layer
    p = layer.params
    _, pads, _, _ = conv_geometry(layer, (1, packing.in_channels, height, width), packing.kernel_hw)
    padded_height, padded_width = height + pads[0] + pads[2], width + pads[1] + pads[3]
    image_bytes = padded_height * padded_width * packing.padded_rows * packing.padded_channels
    rows = codes[:, :image_bytes].reshape(codes.shape[0], padded_height, padded_width, packing.padded_rows,
                                          packing.padded_channels)[..., :packing.rows, :packing.in_channels]
    steps = p["act_steps"].astype(np.float64)
    if packing.coding == "binary":
        levels = float(steps[0]) * rows[..., 0, :]
    else:
        levels = np.tensordot(rows.astype(np.float64), steps, axes=([3], [0]))
    return np.moveaxis(float(p["act_lowest"][0]) + levels, -1, 1)


def _reference(node, inputs):
    """PAConv's reference; from decoded codes when it reads codes; the reader's codes of float32(y)
    (pack_codes_reference, zero past each image) when it writes them."""
    config = node.config
    layer = config.layer
    if config.input_hw is not None:
        levels = decode_codes(inputs[0], Packing(layer), *config.input_hw)
        y = pa_conv.padded_conv_reference(layer, levels) + layer.params["bias"].astype(np.float64)[None, :, None, None]
        (y,) = [_epilogue.apply(layer, y, inputs)]
    else:
        (y,) = _layer_op(node).reference(layer, inputs)
    if config.codes_for is None:
        return [y]
    reader = Packing(config.codes_for)
    *_, image_stride, _ = reader.geometry(y.shape)
    _, pads, _, _ = conv_geometry(config.codes_for, y.shape, reader.kernel_hw)
    coded = pack_codes_reference(y.astype(np.float32), reader.thresholds, reader.coding, pads, reader.pad_value,
                                 reader.padded_rows, reader.padded_channels).reshape(y.shape[0], -1)
    codes = np.zeros((y.shape[0], image_stride), dtype=np.uint8)
    codes[:, :coded.shape[1]] = coded
    return [y, codes] if config.writes_float else [codes]


def _make_kernel(node):
    return AmxConvRunner(node.config)


def _cost(node, input_shapes, output_shapes):
    return _layer_op(node).cost(node.config.layer, input_shapes, output_shapes)


def _scratch_bytes(node, input_shapes, output_shapes):
    """The codes of one sample's input (its image stride)."""
    *_, image_stride, _ = Packing(node.config.layer).geometry((1,) + tuple(input_shapes[0][1:]))
    return image_stride


def _output_memory(node):
    config = node.config
    if config.codes_for is None:
        return ("buffer",)
    return ("buffer", "own") if config.writes_float else ("own",)


register(Op("AmxConv", "PAConv on AMX-INT8 tiles, with its epilogue (plan-only)", _infer_shapes, _reference,
            _make_kernel, _cost, output_buffer=True, plan_only=True, output_memory=_output_memory, keeps_state=True,
            scratch_bytes=_scratch_bytes))
