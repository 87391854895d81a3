"""Bit-packing of weights and activations into uint64 bit-planes.

Bit conventions (every kernel and every test relies on these; `tests/test_bits.py` checks them
by unpacking):

- Word size is 64 bits (`numpy.uint64`). Channels are packed along the word: channel `c` of a
  pixel is bit `c % 64` (least significant bit first) of word `c // 64`.
- Channels past the last real channel in the final word are 0, in weights and activations alike,
  so they never contribute to an AND-popcount.
- Activation plane `j` (a thermometer code): bit 1 means `x >= threshold[j, c]`, 0 otherwise.
  A NaN compares false, so NaN inputs become 0 bits in every plane (the lowest level).
- Binary activation code (`coding="binary"`; engine/ops/pa_conv.py, act_coding): with
  q = #{j : x >= threshold[j, c]} (the level index, 0..N), plane `b` holds bit `b` of q
  (`(q >> b) & 1`), for b = 0 .. B-1, B = `binary_planes(N)` = ceil(log2(N + 1)). The
  thresholds need not be sorted (q counts them). NaN gives q = 0, all bits 0.
- Weight plane `k`: bit 1 means the sign is +1 (`w >= threshold_k`), 0 means -1.
- Spatial padding is applied to the real-valued input before the quantizer: a padded position
  holds, in plane `j`, the bit of `pad_value >= threshold[j, c]` (`pad_value` is 0 unless a
  layer's padding rule says otherwise; it is compared as a float32, like the inputs).
- Grouped convolution (`group` g dividing C): each group's C/g channels start at a word
  boundary. Group `g` owns words `g * words_for(C/g)` to `(g + 1) * words_for(C/g) - 1`, and
  its channel `c` (0 <= c < C/g, input channel `g * C/g + c`) is bit `c % 64` of its word
  `c // 64`; bits past C/g in a group's last word are 0. With g = 1 this is the layout above.
  A weight plane of an output channel covers only its group's channels (`words_for(C/g)` words).

Layouts: activation planes are `[N, batch, padded_height, padded_width, group * words_for(C/group)]`,
weight planes are `[M, out_channels, kernel_height, kernel_width, words_for(C/group)]`.
"""
from dataclasses import dataclass

import numpy as np
from numba import prange

from .jit import inline_jit, jit, parallel_jit

WORD_BITS = 64


ACT_CODINGS = ("thermometer", "binary")


def binary_planes(n_thresholds):
    """B = ceil(log2(N + 1)): binary planes that hold a level index q in 0..N."""
    return int(n_thresholds).bit_length()


def activation_planes(n_thresholds, coding):
    """Bit-planes of an activation code with N thresholds: N (thermometer) or B (binary)."""
    return binary_planes(n_thresholds) if coding == "binary" else n_thresholds


def words_for(channels):
    """Number of uint64 words that hold `channels` bits."""
    return (channels + WORD_BITS - 1) // WORD_BITS


def pack_bits_last_axis(bits):
    """Pack a boolean array along its last axis into uint64 words, LSB first.

    bits: bool [..., C]  ->  uint64 [..., words_for(C)]
    """
    bits = np.asarray(bits, dtype=bool)
    channels = bits.shape[-1]
    padded = np.zeros(bits.shape[:-1] + (words_for(channels) * WORD_BITS,), dtype=bool)
    padded[..., :channels] = bits
    packed_bytes = np.packbits(padded, axis=-1, bitorder="little")
    return np.ascontiguousarray(packed_bytes).view("<u8").astype(np.uint64)


def unpack_bits_last_axis(words, channels):
    """Inverse of `pack_bits_last_axis`: uint64 [..., W] -> bool [..., channels]."""
    as_bytes = np.ascontiguousarray(words.astype("<u8")).view(np.uint8)
    bits = np.unpackbits(as_bytes, axis=-1, bitorder="little")
    return bits[..., :channels].astype(bool)


def pack_weight_planes(signs):
    """Pack weight signs into bit-planes.

    signs: bool [M, O, C, kh, kw], True for +1  ->  uint64 [M, O, kh, kw, words_for(C)]
    """
    return pack_bits_last_axis(np.moveaxis(np.asarray(signs, dtype=bool), 2, -1))


def unpack_weight_planes(planes, channels):
    """uint64 [M, O, kh, kw, words] -> bool [M, O, C, kh, kw] (True for +1)."""
    return np.moveaxis(unpack_bits_last_axis(planes, channels), -1, 2)


def unpack_activations(planes, channels, group=1):
    """Inverse of the packing of activations: uint64 [P, B, H, W, group * words_for(C/group)]
    -> bool [P, B, H, W, C] (channel c of group g at position g * C/group + c)."""
    group_words = planes.shape[-1] // group
    return np.concatenate([unpack_bits_last_axis(planes[..., g * group_words:(g + 1) * group_words], channels // group)
                           for g in range(group)], axis=-1)


@dataclass(frozen=True, eq=False)
class PlanesLayout:
    """The activation bit-planes of one tensor, as `pack_activations` makes them with these
    arguments: thresholds float32 [N, C], coding (one of ACT_CODINGS), pads (top, left, bottom,
    right), pad_value (used as float32), group. A Session's plan (engine/plan.py) says with it which
    planes a PackPlanes step writes and a BinaryConv step reads or writes."""

    thresholds: np.ndarray
    coding: str
    pads: tuple
    pad_value: float
    group: int

    def same_bits(self, other):
        """Whether `other` packs every position inside the padding to the same bits (same thresholds,
        code and group; the pads and pad value may differ)."""
        return (self.coding == other.coding and self.group == other.group
                and self.thresholds.shape == other.thresholds.shape
                and np.array_equal(self.thresholds, other.thresholds))

    def pack(self, x):
        """The planes of float32 [B, C, H, W] `x` (numba kernel)."""
        return pack_activations(x, self.thresholds, self.pads, self.pad_value, self.group, self.coding)

    def pack_reference(self, x):
        """The planes of `x` (plain numpy twin of `pack`)."""
        return pack_activations_reference(x, self.thresholds, self.pads, self.pad_value, self.group, self.coding)


def thresholds_passed_reference(x, thresholds, pads, pad_value=0.0):
    """bool [N, B, Hp, Wp, C]: x >= thresholds[j, c] at every position of x [B, C, H, W] padded by
    `pads` (top, left, bottom, right) with `pad_value` (as float32), channels last; the comparison
    every activation code starts from (the bit-planes here, AmxConv's byte codes)."""
    top, left, bottom, right = pads
    padded = np.pad(np.asarray(x), ((0, 0), (0, 0), (top, bottom), (left, right)),
                    constant_values=np.float32(pad_value))
    return np.moveaxis(padded, 1, -1)[None] >= thresholds[:, None, None, None, :]


def pack_activations_reference(x, thresholds, pads, pad_value=0.0, group=1, coding="thermometer"):
    """Activation bit-planes of `x` (thermometer or binary code, see the module docstring),
    padded with the bits of `pad_value` (plain numpy twin of the kernel), each of the `group`
    channel groups starting at a word boundary.

    x: float [B, C, H, W]; thresholds: float32 [N, C]; pads: (top, left, bottom, right);
    pad_value: a number, rounded to float32; group: divides C; coding: one of ACT_CODINGS
    ->  uint64 [P, B, H + top + bottom, W + left + right, group * words_for(C / group)],
        P = activation_planes(N, coding)
    """
    bits = thresholds_passed_reference(x, thresholds, pads, pad_value)
    if coding == "binary":
        level = bits.sum(axis=0)  # q, the level index
        bits = np.stack([(level >> b) & 1 for b in range(binary_planes(thresholds.shape[0]))]).astype(bool)
    grouped = pack_bits_last_axis(bits.reshape(bits.shape[:-1] + (group, -1)))  # [..., group, words]
    return np.ascontiguousarray(grouped.reshape(grouped.shape[:-2] + (-1,)))


def pack_activations(x, thresholds, pads, pad_value=0.0, group=1, coding="thermometer"):
    """Activation bit-planes of `x` (numba kernel; same contract as `pack_activations_reference`).

    x: float32 [B, C, H, W] C-contiguous; thresholds: float32 [N, C]; pads: 4 ints; pad_value: a
    number, rounded to float32; group: a positive int dividing C; coding: one of ACT_CODINGS.
    """
    if coding not in ACT_CODINGS:
        raise ValueError(f"coding must be one of {ACT_CODINGS}, found {coding!r}")
    top, left, bottom, right = (int(p) for p in pads)
    batch, channels, height, width = x.shape
    if group < 1 or channels % group:
        raise ValueError(f"group must be a positive divisor of the {channels} channels, found {group}")
    group_words = words_for(channels // group)
    planes = np.empty(
        (activation_planes(thresholds.shape[0], coding), batch, height + top + bottom, width + left + right,
         group * group_words),
        dtype=np.uint64,
    )
    _pack_activations_kernel(x, thresholds, np.float32(pad_value), top, left, group, coding == "binary", planes)
    return planes


@jit
def pack_tables(thresholds, pad_value, group, binary, n_planes, n_words):
    """(channel_words int64 [C], channel_shifts uint64 [C], pad_words uint64 [P, words]) of a
    planes layout: channel c of group c // (C/group) goes to word channel_words[c] at bit
    channel_shifts[c] (the grouped layout of the module docstring); pad_words holds the bits of
    float32 `pad_value` (with `binary`, plane b gets bit b of the count of thresholds passed)."""
    channels = thresholds.shape[1]
    group_channels = channels // group
    group_words = n_words // group
    channel_words = np.empty(channels, dtype=np.int64)
    channel_shifts = np.empty(channels, dtype=np.uint64)
    for c in range(channels):
        within = c % group_channels
        channel_words[c] = (c // group_channels) * group_words + (within >> 6)
        channel_shifts[c] = np.uint64(within & 63)
    pad_words = np.zeros((n_planes, n_words), dtype=np.uint64)
    for c in range(channels):
        level = 0
        for j in range(thresholds.shape[0]):
            if pad_value >= thresholds[j, c]:
                level += 1
        for j in range(n_planes):
            on = (level >> j) & 1 if binary else pad_value >= thresholds[j, c]
            if on:
                pad_words[j, channel_words[c]] |= np.uint64(1) << channel_shifts[c]
    return channel_words, channel_shifts, pad_words


@inline_jit
def pack_row(x, b, py, top, left, thresholds, binary, channel_words, channel_shifts, pad_words, planes):
    """Padded row py of sample b of `planes` ([P, B, padded height, padded width, words], every word
    written) from x [B, C, H, W] float32 with the tables of `pack_tables`: border pixels get the pad
    words; inside, each channel's row of x is read contiguously and its bit is ORed into every
    plane's words."""
    n_planes, _, _, padded_width, n_words = planes.shape
    channels, height, width = x.shape[1], x.shape[2], x.shape[3]
    iy = py - top
    inside_row = 0 <= iy < height
    for j in range(n_planes):
        for px in range(padded_width):
            inside = inside_row and left <= px < left + width
            for w in range(n_words):
                # np.uint64(0), not 0: numba would unify int64 and uint64 to float64.
                planes[j, b, py, px, w] = np.uint64(0) if inside else pad_words[j, w]
    if not inside_row:
        return
    # Words are built in a [plane, word, pixel] buffer so that the inner loop runs along a
    # contiguous row of x and a contiguous row of words (it vectorizes), then transposed out.
    # The inner loop is a select of the channel's bit value and an OR over 1-D rows (1.6x
    # faster than shifting the comparison's 0/1 by the channel's bit, which numba leaves scalar).
    words = np.zeros((n_planes, n_words, width), dtype=np.uint64)
    zero = np.uint64(0)
    levels = np.empty(width, dtype=np.int64)
    for c in range(channels):
        word = channel_words[c]
        bit = np.uint64(1) << channel_shifts[c]
        source = x[b, c, iy]
        if binary:
            levels[:] = 0
            for j in range(thresholds.shape[0]):
                threshold = thresholds[j, c]
                for ix in range(width):
                    levels[ix] += 1 if source[ix] >= threshold else 0
            for j in range(n_planes):
                target = words[j, word]
                for ix in range(width):
                    target[ix] = target[ix] | (bit if (levels[ix] >> j) & 1 else zero)
            continue
        for j in range(n_planes):
            threshold = thresholds[j, c]
            target = words[j, word]
            for ix in range(width):
                target[ix] = target[ix] | (bit if source[ix] >= threshold else zero)
    for j in range(n_planes):
        for ix in range(width):
            for w in range(n_words):
                planes[j, b, py, left + ix, w] = words[j, w, ix]


@parallel_jit
def _pack_activations_kernel(x, thresholds, pad_value, top, left, group, binary, planes):
    """One padded row per parallel iteration (`pack_row`, with the tables of `pack_tables`)."""
    n_planes, batch, padded_height, _, n_words = planes.shape
    channel_words, channel_shifts, pad_words = pack_tables(thresholds, pad_value, group, binary, n_planes, n_words)
    for row in prange(batch * padded_height):
        pack_row(x, row // padded_height, row % padded_height, top, left, thresholds, binary, channel_words,
                 channel_shifts, pad_words, planes)
