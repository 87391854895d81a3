"""The direct binary convolution kernel of PAConv (engine/ops/pa_conv.py) and of the plan-only
BinaryConv (engine/ops/binary_conv.py): AND-popcount over activation and weight bit-planes
(engine/bits.py layout), integer counts over the whole window, one float combine and epilogue per
output, and optionally the next binary layer's bit-planes written from that epilogue.

Its arguments come in groups, laid out as these named tuples: the geometry (`ConvShape`), the
prepared weights and combine coefficients (`PreparedWeights`, from pa_conv.prepare_weights), the
epilogue (`Epilogue`) and the planes it writes for a reader (`PlanesOutput`). The caller passes
them as plain tuples (`tuple(group)`): numba types a named tuple in Python, microseconds per call.
"""
from collections import namedtuple

import numpy as np
from numba import prange

from ..bits import pack_activations
from ..jit import jit, parallel_jit, popcount64
from ..popcount_block import DIRECT_CHANNELS, DIRECT_PIXELS, popcount_direct_block, popcount_direct_epilogue

TILE_PIXELS = 224  # output pixels of one work item when threads share a layer, about (whole rows; see work_split)
WORK_ITEMS = 8  # fewest work items a layer is split into when its channels allow (see work_split)
SINGLE_THREAD_PIXELS = 4096  # most output pixels of one work item when one thread runs a layer (see work_split)

# The geometry, all ints: kernel size, strides, dilations, where the conv's own padded input starts
# inside the planes (origin), group, output size and channels, and the work split (`work_split`).
ConvShape = namedtuple("ConvShape", "kh kw stride_h stride_w dilation_h dilation_w origin_top origin_left group "
                                    "out_h out_w out_channels rows_per_chunk blocks_per_split")
# words: `interleave_weight_planes`; m_planes: M; slot_channels int64 [padded channels]: the output
# channel of each slot (-1 for padding); constant, lowest_weight float64 [padded channels] and
# pair_scales float64 [M * P * padded channels] by slot (padding slots zero); steps float64 [P];
# channel_slots: slot s holds channel s for every channel (the padding slots after them), as the
# register epilogues need.
PreparedWeights = namedtuple("PreparedWeights", "words m_planes slot_channels constant lowest_weight pair_scales "
                                                "steps channel_slots")
# residual float32 [batch, O, out_h * out_w] when has_residual; the border correction of padding rule
# "zero_after_quantizer" when has_correction (pa_conv.edge_corrections).
Epilogue = namedtuple("Epilogue", "residual has_residual relu has_correction row_patterns column_patterns "
                                  "corrections")
# planes: [P', batch, padded height, padded width, words] (none: P' = 0), of `PlanesWriter.planes_shape`
# (the kernel writes every word: pad_words [P', words] on the border); thresholds float32 [N', O];
# binary: the reader's code is binary;
# top, left: the reader's pads; group_channels: channels per group of the reader's layout;
# write_float: y gets the float32 output as well. in_registers: the planes may be written by the
# micro-kernel's own epilogue (`popcount_direct_epilogue`; see `PlanesWriter`), from words (planes as
# uint16) and slot_thresholds (float32 [N' * padded channels], thresholds by slot, +inf on padding).
PlanesOutput = namedtuple("PlanesOutput", "planes pad_words thresholds binary top left group_channels write_float "
                                          "in_registers words slot_thresholds")


def no_planes_output():
    """The PlanesOutput of a kernel call that writes float32 only."""
    return PlanesOutput(np.zeros((0, 1, 1, 1, 1), dtype=np.uint64), np.zeros((1, 1), dtype=np.uint64),
                        np.zeros((1, 1), dtype=np.float32), False, 0, 0, 1, True, False, np.zeros(1, dtype=np.uint16),
                        np.zeros(1, dtype=np.float32))


def no_epilogue_inputs(relu):
    """The Epilogue of a call without residual or border correction."""
    return Epilogue(np.zeros((1, 1, 1), dtype=np.float32), False, relu, False, np.zeros(1, np.int64),
                    np.zeros(1, np.int64), np.zeros((1, 1, 1)))


class PlanesWriter:
    """What a binary conv needs to write its reader's bit-planes (a `PlanesLayout` of
    engine/bits.py over its output channels): the reader's thresholds, code, pads and group, and
    the words of a padded position (the bits of the reader's pad value, [P, words]).

    prepared: the conv's PreparedWeights. When each 16-slot block holds 16 consecutive channels
    from a multiple of 16 that the reader packs into one uint16 of a word (`channel_slots`, the
    reader's groups a multiple of 16 channels) and the code is the thermometer, the micro-kernel
    can compare and store the bits itself (`in_registers`)."""

    def __init__(self, layout, prepared):
        out_channels = layout.thresholds.shape[1]
        self.thresholds = np.ascontiguousarray(layout.thresholds, dtype=np.float32)
        self.pads = [int(p) for p in layout.pads]
        self.group_channels = out_channels // layout.group
        self.binary = layout.coding == "binary"
        slot_channels = prepared.slot_channels
        real = slot_channels >= 0
        self.in_registers = bool(not self.binary and self.group_channels % DIRECT_CHANNELS == 0
                                 and prepared.channel_slots)
        self.slot_thresholds = np.full((self.thresholds.shape[0], len(slot_channels)), np.inf, dtype=np.float32)
        self.slot_thresholds[:, real] = self.thresholds[:, slot_channels[real]]
        self.slot_thresholds = self.slot_thresholds.ravel()
        pad_value = np.float32(layout.pad_value)
        self.pad_words = pack_activations(np.full((1, out_channels, 1, 1), pad_value, dtype=np.float32),
                                          self.thresholds, (0, 0, 0, 0), pad_value, layout.group,
                                          layout.coding)[:, 0, 0, 0]

    def planes_shape(self, batch, height, width):
        """The shape of the planes it writes for an output of batch x height x width: [P, batch,
        padded height, padded width, words] (uint64)."""
        top, left, bottom, right = self.pads
        return self.pad_words.shape[0], batch, height + top + bottom, width + left + right, self.pad_words.shape[1]

    def output(self, planes, write_float):
        """The kernel's PlanesOutput writing into `planes` (np.empty of `planes_shape`: the kernel
        writes every word, the pad words on the border), as a plain tuple (the fields in order)."""
        return (planes, self.pad_words, self.thresholds, self.binary, self.pads[0], self.pads[1], self.group_channels,
                write_float, self.in_registers, planes.reshape(-1).view(np.uint16), self.slot_thresholds)


@jit
def _block_offset(first_channel, group_channels):
    """Where the uint16 of channels first_channel .. first_channel + 15 lies in a pixel's words of
    a planes layout with groups of `group_channels` channels (engine/bits.py; first_channel and
    group_channels multiples of 16)."""
    within = first_channel % group_channels
    group_words = (group_channels + 63) // 64
    return ((first_channel // group_channels) * group_words + (within >> 6)) * 4 + ((within & 63) >> 4)


@parallel_jit
def binary_conv_kernel(planes, activations, shape, prepared, epilogue, planes_output, y):
    """A direct convolution: one work item per (chunk of `rows_per_chunk` output rows of one
    image, range of `blocks_per_split` 16-channel blocks) per parallel iteration.

    The activation planes are read in place (`activations` is `planes` flattened, padded by at
    least the conv's pads; the conv's own padded input starts at row origin_top, column
    origin_left of them, 0 when padded exactly by its pads): each output
    pixel's window starts at bases[pixel] and word t of a window (tap ky, kx, channel word w of
    its group) lies offsets[t] further, so stride, dilation and tiles that cross rows need no
    copy. For each tile of 8 pixels x 16 output slots (one group's block, see `output_slots`) the
    micro-kernel (engine/popcount_block.py: popcount_direct_block) counts over the whole window
    in int64 registers and adds pair_scales[k, j] * counts into `partial` ([slot, pixel],
    transposed in registers) over every (k, j), k outer and j inner: the same order for every
    thread count, and the work split depends on the shapes only. The epilogue adds constant +
    lowest_weight * act_term of the group (+ the border correction of "zero_after_quantizer" when
    `has_correction`, see `edge_corrections`; + residual, ReLU) in float64 and rounds once to
    float32. Where slot s is channel s and there is no border correction, the micro-kernel's last
    (k, j) call does the epilogue itself, in registers (`popcount_direct_epilogue`: the float32
    output, and thermometer planes whose groups are multiples of 16 channels); otherwise it runs
    over `partial` after all blocks, the same operations in the same order.
    slot_channels: int64 [padded channels], the output channel of each slot (-1 for padding);
    constant, lowest_weight: float64 [padded channels] by slot; pair_scales: float64
    [M * N * padded channels], padding slots zero; weights: `interleave_weight_planes`.
    residual: float32 [batch, O, out_h * out_w] (rows flattened) when `has_residual`.
    The output [batch, O, out_h * out_w] (rows flattened) goes to y as float32, or, when planes_out
    has planes ([P', batch, padded height, padded width, words]; the kernel writes every word, the
    reader's pad words on the border), as the bits of float32(y) >= planes_thresholds[j, o] (or, with
    `planes_binary`, bit j of the
    count of planes_thresholds[:, o] passed) at (oy + planes_top, ox + planes_left), in the layout
    of engine/bits.py with groups of planes_group_channels channels (y unused unless `write_float`:
    then y gets the float32 output as well, the same values the planes compare). Splitting the
    channels over work items (blocks_per_split < all blocks) needs group 1 and, when writing
    planes, planes_group_channels a multiple of 64, so that items write disjoint words."""
    kh, kw, stride_h, stride_w, dilation_h, dilation_w, origin_top, origin_left, group, out_h, out_w, \
        out_channels, rows_per_chunk, blocks_per_split = shape
    weights, m_planes, slot_channels, constant, lowest_weight, pair_scales, steps, channel_slots = prepared
    residual, has_residual, relu, has_correction, row_patterns, column_patterns, corrections = epilogue
    planes_out, pad_words, planes_thresholds, planes_binary, planes_top, planes_left, planes_group_channels, \
        write_float, in_registers, planes_words, slot_thresholds = planes_output
    n_planes, batch, padded_height, padded_width, n_words = planes.shape
    plane_size = batch * padded_height * padded_width * n_words
    row_size = padded_width * n_words
    write_planes = planes_out.shape[0] > 0
    out_words = planes_out.shape[4]
    # The epilogue in the micro-kernel's last call (popcount_direct_epilogue): slot s is channel s,
    # and a reader's planes are thermometer planes that take 16-bit parts.
    registers_epilogue = channel_slots and not has_correction and (not write_planes or (in_registers
                                                                                         and not planes_binary))
    out_height, out_width = planes_out.shape[2], planes_out.shape[3]
    out_plane_words = planes_out.shape[1] * out_height * out_width * out_words * 4  # uint16 per plane
    planes_group_words = (planes_group_channels + 63) // 64
    zero = np.uint64(0)
    padded_channels = constant.shape[0]
    group_words = n_words // group
    taps = kh * kw * group_words
    offsets = np.empty(taps, dtype=np.int64)
    for ky in range(kh):
        for kx in range(kw):
            for w in range(group_words):
                offsets[(ky * kw + kx) * group_words + w] = ky * dilation_h * row_size + kx * dilation_w * n_words + w
    blocks = padded_channels // DIRECT_CHANNELS
    group_blocks = blocks // group
    group_out = out_channels // group
    chunks_per_image = -(-out_h // rows_per_chunk)
    splits = -(-blocks // blocks_per_split)
    for item in prange(batch * chunks_per_image * splits):
        split = item % splits
        chunk = item // splits
        b = chunk // chunks_per_image
        first_row = (chunk % chunks_per_image) * rows_per_chunk
        rows = min(rows_per_chunk, out_h - first_row)
        n_pixels = rows * out_w
        n_tiles = -(-n_pixels // DIRECT_PIXELS)
        first_block = split * blocks_per_split
        last_block = min(blocks, first_block + blocks_per_split)
        first_slot = first_block * DIRECT_CHANNELS
        channels = (last_block - first_block) * DIRECT_CHANNELS
        bases = np.empty(n_tiles * DIRECT_PIXELS, dtype=np.int64)
        for r in range(rows):
            row_base = (b * padded_height + (first_row + r) * stride_h + origin_top) * row_size
            for ox in range(out_w):
                bases[r * out_w + ox] = row_base + (origin_left + ox * stride_w) * n_words
        for pixel in range(n_pixels, n_tiles * DIRECT_PIXELS):
            bases[pixel] = bases[n_pixels - 1]  # the last tile's padding: results never used
        # position_ones[j, g, y, x]: popcount of the words of group g of plane j at padded position
        # (top_row + y, x), for the rows this item's windows read (computed here rather than in a
        # parallel loop of its own: one parallel region per layer; items that split the channels of
        # the same rows each count them, a few hundred popcounts beside the conv's); a window's
        # count is the sum over its kh x kw positions, its kw columns first, then its kh rows.
        # The positions of those rows are contiguous in the planes, so with one word per position
        # the counts are one loop that vectorizes.
        top_row = first_row * stride_h + origin_top
        read_rows = (rows - 1) * stride_h + (kh - 1) * dilation_h + 1
        positions = read_rows * padded_width
        position_ones = np.empty((n_planes, group, read_rows, padded_width), dtype=np.int32)
        for j in range(n_planes):
            first_word = ((j * batch + b) * padded_height + top_row) * row_size
            for g in range(group):
                ones = position_ones[j, g].reshape(positions)
                if n_words == 1:
                    words = activations[first_word:first_word + positions]
                    for q in range(positions):
                        ones[q] = np.int32(popcount64(words[q]))
                    continue
                for q in range(positions):
                    total = zero  # uint64, as popcount64 returns (an int 0 would unify to float64)
                    start = first_word + q * n_words + g * group_words
                    for w in range(start, start + group_words):
                        total += popcount64(activations[w])
                    ones[q] = np.int32(total)
        # act_terms[g, pixel] = sum_j steps[j] * popcount of the pixel's window in plane j, group g
        # (whole tiles: the last tile's padding pixels read zeros).
        act_terms = np.zeros((group, n_tiles * DIRECT_PIXELS))
        column_sums = np.empty((read_rows, out_w), dtype=np.int32)  # a row's kw positions of each window
        window_ones = np.empty(n_pixels, dtype=np.int32)
        for j in range(n_planes):
            for g in range(group):
                column_sums[:] = 0
                for row in range(read_rows):
                    sums = column_sums[row]
                    for kx in range(kw):
                        tap = position_ones[j, g, row, origin_left + kx * dilation_w:]
                        if stride_w == 1:  # contiguous: the loop vectorizes
                            for ox in range(out_w):
                                sums[ox] += tap[ox]
                        else:
                            for ox in range(out_w):
                                sums[ox] += tap[ox * stride_w]
                window_ones[:] = 0
                for r in range(rows):
                    counts = window_ones[r * out_w:(r + 1) * out_w]
                    for ky in range(kh):
                        sums = column_sums[r * stride_h + ky * dilation_h]
                        for ox in range(out_w):
                            counts[ox] += sums[ox]
                for pixel in range(n_pixels):
                    act_terms[g, pixel] += steps[j] * window_ones[pixel]
        stride = n_tiles * DIRECT_PIXELS
        # This item's words of the reader's planes: the whole words of its channels when they are split.
        first_word, last_word = 0, out_words
        if splits > 1:
            first_word = first_slot // 64
            last_word = min(out_words, -(-min(out_channels, first_slot + channels) // 64))
        if write_planes:
            # The pad words on the border around this item's rows (the pad rows above the image's
            # first row and below its last go to the items that hold those rows). Inside, the
            # general epilogue below writes whole words; the micro-kernel writes 16-bit parts, all
            # of a word's when the reader's groups are whole words, else the others must be 0.
            zero_inside = registers_epilogue and planes_group_channels % 64 != 0
            row_start = first_row + planes_top if first_row > 0 else 0
            row_stop = first_row + rows + planes_top if first_row + rows < out_h else out_height
            for j in range(planes_out.shape[0]):
                for py in range(row_start, row_stop):
                    row_words = planes_out[j, b, py]
                    inside_row = planes_top <= py < planes_top + out_h
                    for px in range(out_width):
                        inside = inside_row and planes_left <= px < planes_left + out_w
                        if inside and not zero_inside:
                            continue
                        for w in range(first_word, last_word):
                            row_words[px, w] = zero if inside else pad_words[j, w]
        if registers_epilogue:
            # Each pixel's uint16 index of word 0 of plane 0 in the reader's planes.
            word_bases = np.zeros(stride if write_planes else DIRECT_PIXELS, dtype=np.int64)
            if write_planes:
                for r in range(rows):
                    row_start = ((b * out_height + first_row + r + planes_top) * out_width + planes_left) \
                        * out_words
                    for ox in range(out_w):
                        word_bases[r * out_w + ox] = (row_start + ox * out_words) * 4
            tile_partial = np.empty(DIRECT_CHANNELS * DIRECT_PIXELS)  # a tile's sums over the earlier pairs
            act_flat = act_terms.reshape(-1)
            y_flat = y.reshape(-1)
            source = residual.reshape(-1) if has_residual else y_flat  # never read without a residual
            image_size = out_h * out_w
            for block in range(first_block, last_block):
                shift = (block // group_blocks) * group_words
                first_channel = block * DIRECT_CHANNELS  # slot = channel (channel_slots)
                block_offset = _block_offset(first_channel, planes_group_channels)
                valid_channels = min(DIRECT_CHANNELS, out_channels - first_channel)
                for tile in range(n_tiles):
                    y_start = (b * out_channels + first_channel) * image_size + first_row * out_w + tile * DIRECT_PIXELS
                    valid_pixels = min(DIRECT_PIXELS, n_pixels - tile * DIRECT_PIXELS)
                    for k in range(m_planes):
                        weight_start = (k * blocks + block) * taps * DIRECT_CHANNELS
                        for j in range(n_planes):
                            # Plain values only in this call: numba rejects a call of this many
                            # arguments with control flow (`and`, `min`) inside it.
                            accumulate = k + j > 0
                            finish = k == m_planes - 1 and j == n_planes - 1
                            popcount_direct_epilogue(
                                activations, bases, tile * DIRECT_PIXELS, j * plane_size + shift, offsets, taps,
                                weights, weight_start, pair_scales,
                                (k * n_planes + j) * padded_channels + block * DIRECT_CHANNELS, tile_partial,
                                accumulate, finish, constant, lowest_weight, first_channel, act_flat,
                                (block // group_blocks) * stride + tile * DIRECT_PIXELS, relu, source, has_residual,
                                y_start, image_size, 1, y_flat, write_float, y_start, image_size, 1, valid_channels,
                                valid_pixels, slot_thresholds, padded_channels, planes_out.shape[0], planes_words,
                                word_bases, out_plane_words, block_offset)
            continue
        # partial [slot, pixel] holds sum_kj pair_scales * popcounts: the first (k, j) pair
        # stores, the others add. Block outer, pixels inner: one block's weights stay in L1.
        partial = np.empty(channels * stride)
        for block in range(first_block, last_block):
            shift = (block // group_blocks) * group_words
            for tile in range(n_tiles):
                for k in range(m_planes):
                    weight_start = (k * blocks + block) * taps * DIRECT_CHANNELS
                    for j in range(n_planes):
                        popcount_direct_block(activations, bases, tile * DIRECT_PIXELS, j * plane_size + shift,
                                              offsets, taps, weights, weight_start, pair_scales,
                                              (k * n_planes + j) * padded_channels + block * DIRECT_CHANNELS,
                                              partial, (block - first_block) * DIRECT_CHANNELS * stride
                                              + tile * DIRECT_PIXELS, stride, k + j > 0)
        # Epilogue, one output channel at a time over the chunk's pixels, which are contiguous in
        # y and residual too (whole rows): simple loops over 1-D slices, they vectorize.
        values = np.empty(n_pixels)
        float_scratch = np.empty(n_pixels, dtype=np.float32)  # the float32 stores of a planes-only output
        row_words = np.zeros((planes_out.shape[0], out_words, n_pixels), dtype=np.uint64)
        levels = np.zeros(n_pixels, dtype=np.int64)  # the binary code's count of thresholds passed
        first = first_row * out_w
        for slot in range(first_slot, first_slot + channels):
            o = slot_channels[slot]
            if o < 0:
                continue
            act_term = act_terms[o // group_out]
            start = (slot - first_slot) * stride
            slot_partial = partial[start:start + n_pixels]
            if not has_correction and not (write_planes and planes_binary):
                # The common float32 output, and a thermometer hand-off, in one pass per case (the
                # same operations in the same order as the general path below, so the same bits);
                # a hand-off then sets each plane's bits from the stored values, in loops that
                # vectorize.
                target = y[b, o, first:first + n_pixels] if write_float or not write_planes else float_scratch
                base, weight = constant[slot], lowest_weight[slot]
                if has_residual:
                    shortcut = residual[b, o, first:first + n_pixels]
                    if relu:
                        for q in range(n_pixels):
                            target[q] = max(base + weight * act_term[q] + slot_partial[q] + shortcut[q], 0.0)
                    else:
                        for q in range(n_pixels):
                            target[q] = base + weight * act_term[q] + slot_partial[q] + shortcut[q]
                elif relu:
                    for q in range(n_pixels):
                        target[q] = max(base + weight * act_term[q] + slot_partial[q], 0.0)
                else:
                    for q in range(n_pixels):
                        target[q] = base + weight * act_term[q] + slot_partial[q]
                if write_planes:
                    within = o % planes_group_channels
                    word = (o // planes_group_channels) * planes_group_words + (within >> 6)
                    bit = np.uint64(1) << np.uint64(within & 63)
                    for j in range(planes_out.shape[0]):
                        threshold = planes_thresholds[j, o]
                        words = row_words[j, word]
                        for q in range(n_pixels):
                            words[q] = words[q] | (bit if target[q] >= threshold else zero)
                continue
            for q in range(n_pixels):
                values[q] = constant[slot] + lowest_weight[slot] * act_term[q] + slot_partial[q]
            if has_correction:
                for q in range(n_pixels):
                    values[q] += corrections[row_patterns[first_row + q // out_w], o, column_patterns[q % out_w]]
            if has_residual:
                shortcut = residual[b, o, first:first + n_pixels]
                for q in range(n_pixels):
                    values[q] += shortcut[q]
            if relu:
                for q in range(n_pixels):
                    values[q] = max(values[q], 0.0)
            if write_float:
                target = y[b, o, first:first + n_pixels]
                for q in range(n_pixels):
                    target[q] = values[q]
            if write_planes:
                # As engine/bits.py packs: the float32 value against the threshold, OR-ed into
                # [plane, word, pixel] rows (they vectorize), transposed out after the last channel.
                within = o % planes_group_channels
                word = (o // planes_group_channels) * planes_group_words + (within >> 6)
                bit = np.uint64(1) << np.uint64(within & 63)
                if planes_binary:
                    levels[:] = 0
                    for j in range(planes_thresholds.shape[0]):
                        threshold = planes_thresholds[j, o]
                        for q in range(n_pixels):
                            levels[q] += 1 if np.float32(values[q]) >= threshold else 0
                    for j in range(planes_out.shape[0]):
                        words = row_words[j, word]
                        for q in range(n_pixels):
                            words[q] = words[q] | (bit if (levels[q] >> j) & 1 else zero)
                    continue
                for j in range(planes_out.shape[0]):
                    threshold = planes_thresholds[j, o]
                    words = row_words[j, word]
                    for q in range(n_pixels):
                        words[q] = words[q] | (bit if np.float32(values[q]) >= threshold else zero)
                continue
        if write_planes:
            # Only this item's words: with split channels they are whole 64-channel words.
            for j in range(planes_out.shape[0]):
                for r in range(rows):
                    for ox in range(out_w):
                        for w in range(first_word, last_word):
                            planes_out[j, b, first_row + r + planes_top, planes_left + ox, w] = \
                                row_words[j, w, r * out_w + ox]


def work_split(batch, out_h, out_w, blocks, group, split_channels, threads):
    """(rows_per_chunk, blocks_per_split) of `binary_conv_kernel`'s work items, from the shapes and
    the thread count. Results never depend on the split: each output's arithmetic is the same in
    any item (tests compare thread counts bit for bit).

    Several threads: chunks of whole output rows with about TILE_PIXELS pixels (the 8-pixel tiles
    run across the rows of a chunk: a 14x14 map takes 25 tiles where tiles of single rows would
    take 28), as many chunks as that takes with the rows spread evenly over them (28 rows: 4
    chunks of 7, not 8, 8, 8 and 4, which leaves one of two threads idle for the last), and when
    that leaves fewer than WORK_ITEMS items and fewer than two per thread, the output channels
    split into ranges of whole 64-channel words (group 1, and `split_channels`): items for the
    threads to balance. (Each item counts its rows' ones again: ResNet-18's 28x28 layers in 4 row
    chunks at 2 threads ran 4-7% faster without the split, its 14x14 and 7x7 ones, one chunk,
    35-40% slower.)
    One thread: chunks of at most SINGLE_THREAD_PIXELS pixels (the rows spread evenly over them)
    and no channel split, since each item sets up its rows once (window starts, the counts of the
    activation rows it reads) for all its blocks: ResNet-18's binary layers at 224 take one item
    each instead of 8 to 14."""
    most_rows = SINGLE_THREAD_PIXELS // out_w if threads == 1 else -(-TILE_PIXELS // out_w)
    image_chunks = -(-out_h // max(1, most_rows))
    rows_per_chunk = -(-out_h // image_chunks)
    chunks = batch * image_chunks
    if threads == 1 or group != 1 or not split_channels or chunks >= min(WORK_ITEMS, 2 * threads):
        return rows_per_chunk, blocks
    word_blocks = 64 // DIRECT_CHANNELS  # blocks of one 64-channel word
    per_split = -(-blocks // -(-WORK_ITEMS // chunks))
    return rows_per_chunk, -(-per_split // word_blocks) * word_blocks
