"""Exact integer convolution by a 2-D Fermat number transform (FNT) modulo F_5 = 2^32 + 1.

What it computes: acc[b, o, oy, ox] = sum_{c, ky, kx} w[o, c, ky, kx] * x[b, c, oy*sh + ky*dh, ox*sw + kx*dw]
for small signed integers x (the centered input q - zero point, |x| <= 255, 0 in the padding) and
int8 weights, bit for bit equal to the int64 sum (engine/ops/int_conv.py's reference).

Modulus and dynamic range. All arithmetic is modulo M = F_5 = 2^32 + 1 (b = 32, t = 5). A layer's
true sums satisfy |acc| <= 255 * 128 * taps < 2^31 < M / 2 (int_conv.MAX_TAPS bounds taps), so
the residue r in [0, M) determines acc exactly: acc = r if r <= M // 2 else r - M ("centered").
2 has order 64 modulo M (2^32 = -1), and every prime factor of a Fermat number F_t has 2 of order
2^(t+1), so 2^m - 1 is invertible modulo M for 0 < m < 64: alpha = 2^(64/N) is a root of unity of
order N with the cyclic convolution property for every power of two N <= 64 (Agarwal and Burrus,
"Fast convolution using Fermat number transforms", 1974). Every twiddle factor is a power of two,
so the transforms need only shifts, additions and subtractions; N^-2 (the 2-D inverse's scale) is
2^(64 - 2 log2 N) and is folded into the transformed weights.

Representation. Residues are kept in the normal binary code, r in [0, 2^32], in 64-bit lanes:
`_mul_pow2` computes 2^k r (k < 32) as p = r << k < 2^64 and reduces it with 2^32 = -1,
p = hi * 2^32 + lo = lo - hi (mod M); 2^(k+32) r = -(2^k r). The diminished-1 code of Leibowitz
(1976; r - 1 stored in b bits plus a zero flag, so that a residue fits a b-bit word and 2^k r is a
rotation with inverted end-around carry) is the representation for b-bit datapaths; with 64-bit
lanes both codes are exact and the normal one needs no zero flag, so it is the one used here.
Pointwise products are taken in the centered code, both factors in [-(2^31 + 1), 2^31 - 1], so
the int64 product (|p| <= 2^62 + 2^32 + 1) cannot overflow; each is reduced once to lo - hi
(|lo - hi| < 2^33) and added up over the input channels in int64 (exact for any channel count
below 2^30), with one reduction modulo M per output point before the inverse transform.

Tiling (overlap-save). A stride (sh, sw) is removed by polyphase decomposition: phase (p, q) of
the input, x_pq[i, j] = x[sh*i + p, sw*j + q], is an extra input channel convolved at stride 1
with the taps of w that land on it (kernel k' = ceil(((kh - 1) * dh + 1) / sh) rows, likewise
columns). Output tiles of V x V outputs read N x N input tiles (N = V + k' - 1); the cyclic
convolution of an input tile with the weight tile h[(-a) mod N, (-b) mod N] = w'[a, b] equals the
layer's output on its first V x V positions. Each input tile is transformed once per input
channel and phase and reused by every output channel; products are summed over input channels
in the transform domain and each output tile is inverse transformed once per output channel.
The 2-D transforms are row-column: radix-2 decimation in frequency forward (natural order in,
bit-reversed out), decimation in time inverse (bit-reversed in, natural out), so no bit reversal
is needed. Tiles are processed TILES_PER_BLOCK at a time, each block one task on the session's
Python threads (conv._run_tasks; the kernel releases the GIL): the (channel, tile) pairs of a
block are the vector lanes of the forward transforms, its output channels those of the products
(int32 factors, 32 x 32 -> 64-bit multiplies, unless a residue is +2^31, which does not fit
int32: then int64), and its (tile, output channel) pairs those of the inverse. Every output
depends only on its own tile, so the result does not depend on the thread count.

Speed (docs/benchmarks.md): per output of the ResNet-18 stem (N = 16, 4x4 phase kernels, 13x13
valid outputs per tile) this takes about 20 modular products and 6.6 inverse butterflies. The
products' loop spends 8 vector instructions per 8 products (64-bit lanes: a widening load, the
multiply, mask, shift, subtract, add, the sums' load and store), a butterfly with its twiddle
about 10 per 8 lanes: some 28 vector instructions per output, where the direct kernel
(engine/ops/int_conv_direct.py) takes 2.6 VPDPBUSD (64 multiply-adds each: 42 steps of 4 taps
per 16 outputs) and about 0.5 for its loads and epilogue. So it loses wherever AVX-512 VNNI is
there (6-9x on the stem), and wins only without it, on large stride-1 kernels
(int_conv.choose_kernel).
"""
import numpy as np

from ..jit import jit
from .conv import _run_tasks

MODULUS = (1 << 32) + 1
HALF = MODULUS // 2
TRANSFORM_SIZES = (8, 16, 32, 64)
TILES_PER_BLOCK = 8
_M = np.uint64(MODULUS)
_LOW = np.uint64(0xFFFFFFFF)
_SHIFT = np.uint64(32)
_HALF = np.uint64(HALF)


def choose_transform_size(kernel_hw):
    """The transform size N for a (stride 1, after the polyphase split) kernel of kernel_hw: 16
    up to 7 taps a side, then 32 up to 17, then 64 up to 33; None beyond. Measured on the ResNet-18
    stem (4x4 phase kernels) and a 3x3 64->64 conv at 56x56 (benchmarks/integer_conv.py, 1 thread):
    N = 16 beat 8, 32 and 64 on both (11.0 / 11.4 / 12.0 / 13.2 ms and 8.8 / 9.7 / 11.4 / 19.9 ms
    for N = 16 / 8 / 32 / 64): larger tiles waste fewer border outputs, but their transforms take
    more butterflies per point and their working set leaves the L2 cache."""
    k = max(kernel_hw)
    for n, largest in ((16, 7), (32, 17), (64, 33)):
        if k <= largest:
            return n
    return None


def phase_weights(weight, strides, dilations):
    """int64 [O, C/group * sh * sw, k'h, k'w]: the weights of the stride-1 convolution over the
    input's stride phases (channel c * sh * sw + p * sw + q reads phase (p, q) of channel c)."""
    out_channels, group_in, kh, kw = weight.shape
    (sh, sw), (dh, dw) = strides, dilations
    rows = ((kh - 1) * dh) // sh + 1
    columns = ((kw - 1) * dw) // sw + 1
    phased = np.zeros((out_channels, group_in, sh, sw, rows, columns), dtype=np.int64)
    for ky in range(kh):
        for kx in range(kw):
            y, x = ky * dh, kx * dw
            phased[:, :, y % sh, x % sw, y // sh, x // sw] = weight[:, :, ky, kx]
    return phased.reshape(out_channels, group_in * sh * sw, rows, columns)


def prepare_weights(weight, group, strides, dilations, size=None):
    """What `convolve` needs of a layer: the transformed weights (times N^-2, centered, int64
    [N*N, group, C/group * phases, O/group]), the transform size N (`size`, or by
    `choose_transform_size`), the strides and the phase kernel's size."""
    phased = phase_weights(weight, strides, dilations)
    out_channels, channels = phased.shape[:2]
    kernel_hw = phased.shape[2:]
    n = size or choose_transform_size(kernel_hw)
    if n is None or n - max(kernel_hw) + 1 < 1:
        raise ValueError(f"a kernel of {kernel_hw} phase taps does not fit a transform of at most "
                         f"{TRANSFORM_SIZES[-1]} points")
    tile = np.zeros((n, n, out_channels, channels), dtype=np.int64)
    for a in range(kernel_hw[0]):
        for b in range(kernel_hw[1]):
            tile[(-a) % n, (-b) % n] = phased[:, :, a, b]
    lanes = np.ascontiguousarray(tile % MODULUS, dtype=np.uint64).reshape(n, n, -1)
    _forward_2d(lanes)
    log_n = n.bit_length() - 1
    lanes = lanes.reshape(n * n, -1)
    _scale(lanes, (64 - 2 * log_n) % 64)
    centered = _centered(lanes).reshape(n * n, group, out_channels // group, channels)
    transformed = np.ascontiguousarray(centered.transpose(0, 1, 3, 2))
    # The int32 copy for the fast products, empty when a value does not fit (+2^31).
    narrow = transformed.astype(np.int32) if np.all(transformed <= np.iinfo(np.int32).max) else np.zeros(
        (0, 1, 1, 1), np.int32)
    return {"transformed": transformed, "narrow": narrow, "size": n,
            "strides": tuple(strides), "kernel": kernel_hw}


def convolve(x, prepared, out_hw):
    """int64 [B, out_h, out_w, O] (channels last): the exact convolution of the padded, centered integer input
    x (int64 [B, C, H, W], padding already in place) with the prepared weights."""
    n = prepared["size"]
    sh, sw = prepared["strides"]
    kh, kw = prepared["kernel"]
    out_h, out_w = out_hw
    valid_h, valid_w = n - kh + 1, n - kw + 1
    tiles_y, tiles_x = -(-out_h // valid_h), -(-out_w // valid_w)
    # Phases of the input, zero past its end, covering every tile's N x N window.
    rows, columns = tiles_y * valid_h + kh - 1, tiles_x * valid_w + kw - 1
    batch, channels = x.shape[:2]
    phases = np.zeros((batch, channels, sh, sw, rows, columns), dtype=np.int64)
    for p in range(sh):
        for q in range(sw):
            part = x[:, :, p::sh, q::sw][:, :, :rows, :columns]
            phases[:, :, p, q, :part.shape[2], :part.shape[3]] = part
    phases = phases.reshape(batch, channels * sh * sw, rows, columns)
    transformed = prepared["transformed"]
    out_channels = transformed.shape[1] * transformed.shape[3]
    acc = np.empty((batch, out_h, out_w, out_channels), dtype=np.int64)
    blocks = -(-tiles_y * tiles_x // TILES_PER_BLOCK)
    narrow = prepared["narrow"]
    _run_tasks(lambda task: _convolve_kernel(phases, transformed, narrow, n, valid_h, valid_w, tiles_y, tiles_x, task,
                                             acc), range(batch * blocks))
    return acc


@jit
def _convolve_kernel(phases, transformed, narrow_weights, n, valid_h, valid_w, tiles_y, tiles_x, task, acc):
    """Block `task` (sample task // blocks, TILES_PER_BLOCK tiles from (task % blocks) *
    TILES_PER_BLOCK in row-major tile order; the tasks run on Python threads): gather and
    forward-transform its input tiles (lanes: channel, tile), multiply-accumulate per frequency
    over the channels of each group (lanes: output channel), reduce, inverse-transform (lanes:
    tile, output channel) and write the valid V x V corner of each tile into acc [B, out_h, out_w, O]
    (channels last: each output position's channels are one contiguous run of the inverse's lanes)."""
    channels = phases.shape[1]
    points, group, group_channels, group_out = transformed.shape
    _, out_h, out_w, _ = acc.shape
    tiles = tiles_y * tiles_x
    blocks = (tiles + TILES_PER_BLOCK - 1) // TILES_PER_BLOCK
    b = task // blocks
    first = (task % blocks) * TILES_PER_BLOCK
    count = min(TILES_PER_BLOCK, tiles - first)
    # Forward: [N, N, channels, count] residues of the input tiles.
    spectra = np.empty((n, n, channels, count), dtype=np.uint64)
    for t in range(count):
        ty, tx = (first + t) // tiles_x, (first + t) % tiles_x
        for c in range(channels):
            for i in range(n):
                source = phases[b, c, ty * valid_h + i]
                for j in range(n):
                    value = source[tx * valid_w + j]
                    spectra[i, j, c, t] = np.uint64(value + MODULUS if value < 0 else value)
    _forward_2d(spectra.reshape(n, n, channels * count))
    centered = _centered(spectra.reshape(points, channels * count)).reshape(points, channels, count)
    # Products summed over each group's channels: sums [points, group, count, O/group], int64.
    # The centered residues fit int32 except +2^31 (probability 2^-32 per value): with both
    # factors in int32, the products are 1-instruction 32 x 32 -> 64-bit multiplies.
    sums = np.zeros((points, group, count, group_out), dtype=np.int64)
    if narrow_weights.size and _fits_int32(centered):
        _pointwise(narrow_weights, centered.astype(np.int32), sums)
    else:
        _pointwise(transformed, centered, sums)
    residues = _reduced(sums.reshape(points, group * count * group_out))
    _inverse_2d(residues.reshape(n, n, group * count * group_out))
    result = residues.reshape(n, n, group, count, group_out)
    for t in range(count):
        ty, tx = (first + t) // tiles_x, (first + t) % tiles_x
        for i in range(min(valid_h, out_h - ty * valid_h)):
            for j in range(min(valid_w, out_w - tx * valid_w)):
                target = acc[b, ty * valid_h + i, tx * valid_w + j]
                for g in range(group):
                    source = result[i, j, g, t]
                    for within in range(group_out):
                        r = source[within]
                        target[g * group_out + within] = np.int64(r) - MODULUS if r > _HALF else np.int64(r)


@jit
def _fits_int32(values):
    """Whether every value fits int32."""
    for value in values.ravel():
        if value > 2147483647:
            return False
    return True


@jit
def _pointwise(transformed, centered, sums):
    """sums[f, g, t, o] += sum over the channels c of group g of transformed[f, g, c, o] *
    centered[f, g * C/group + c, t], each product reduced once (p = hi * 2^32 + lo = lo - hi,
    |lo - hi| < 2^33): whole contiguous rows over the output channels, as the vectorizer wants
    them. transformed, centered: int32 or int64 centered residues (the product stays in int64)."""
    points, group, group_channels, group_out = transformed.shape
    count = centered.shape[2]
    for f in range(points):
        for g in range(group):
            for t in range(count):
                row = sums[f, g, t]
                for c in range(group_channels):
                    weights = transformed[f, g, c]
                    value = np.int64(centered[f, g * group_channels + c, t])
                    for o in range(group_out):
                        product = np.int64(weights[o]) * value
                        row[o] += (product & 0xFFFFFFFF) - (product >> 32)


@jit
def _centered(residues):
    """int64 copy of uint64 residues in [0, M): r, or r - M above M // 2 (in [-(2^31 + 1), 2^31])."""
    flat = residues.ravel()
    out = np.empty(flat.size, dtype=np.int64)
    for i in range(flat.size):
        r = flat[i]
        out[i] = np.int64(r) - MODULUS if r > _HALF else np.int64(r)
    return out.reshape(residues.shape)


@jit
def _reduced(sums):
    """uint64 residues in [0, M) of int64 sums (|sum| < 2^63): s = hi * 2^32 + lo = lo - hi."""
    flat = sums.ravel()
    out = np.empty(flat.size, dtype=np.uint64)
    for i in range(flat.size):
        s = flat[i]
        r = (s & 0xFFFFFFFF) - (s >> 32)  # in (-2^31, 2^32 + 2^31)
        if r < 0:
            r += MODULUS
        elif r >= MODULUS:
            r -= MODULUS
        out[i] = np.uint64(r)
    return out.reshape(sums.shape)


@jit
def _scale(lanes, exponent):
    """lanes[...] = 2^exponent * lanes mod M, in place (uint64 [rows, lanes])."""
    for i in range(lanes.shape[0]):
        _mul_pow2(lanes[i], exponent)


@jit
def _mul_pow2(row, exponent):
    """row = 2^exponent * row mod M in place, for residues in [0, M) and 0 <= exponent < 64."""
    k = np.uint64(exponent & 31)
    negate = exponent >= 32
    for i in range(row.size):
        p = row[i] << k  # < 2^64: row[i] <= 2^32, k <= 31
        r = (p & _LOW) + _M - (p >> _SHIFT)
        r = r - _M if r >= _M else r
        if negate:
            r = _M - r
            r = r - _M if r >= _M else r
        row[i] = r


@jit
def _dif(data):
    """In place, along axis 0 of uint64 data [N, lanes]: X[k] = sum_n alpha^(nk) x[n] mod M,
    alpha = 2^(64/N), radix-2 decimation in frequency; X comes out in bit-reversed order."""
    n, lanes = data.shape
    size = n
    while size >= 2:
        half = size // 2
        step = 64 // size  # the root of order `size` is 2^step
        for start in range(0, n, size):
            for j in range(half):
                top, bottom = data[start + j], data[start + j + half]
                for lane in range(lanes):
                    a, b = top[lane], bottom[lane]
                    total = a + b
                    top[lane] = total - _M if total >= _M else total
                    difference = a + _M - b
                    bottom[lane] = difference - _M if difference >= _M else difference
                if j:
                    _mul_pow2(bottom, j * step)
        size = half


@jit
def _dit_inverse(data):
    """In place, along axis 0 of uint64 data [N, lanes] in bit-reversed order: x[n] * N =
    sum_k alpha^(-nk) X[k] mod M, radix-2 decimation in time; x comes out in natural order."""
    n, lanes = data.shape
    size = 2
    while size <= n:
        half = size // 2
        step = 64 // size
        for start in range(0, n, size):
            for j in range(half):
                top, bottom = data[start + j], data[start + j + half]
                if j:
                    _mul_pow2(bottom, (64 - j * step) % 64)
                for lane in range(lanes):
                    a, b = top[lane], bottom[lane]
                    total = a + b
                    top[lane] = total - _M if total >= _M else total
                    difference = a + _M - b
                    bottom[lane] = difference - _M if difference >= _M else difference
        size *= 2


@jit
def _forward_2d(data):
    """Row-column 2-D forward transform of uint64 data [N, N, lanes], in place."""
    n = data.shape[0]
    _dif(data.reshape(n, -1))
    for i in range(n):
        _dif(data[i])


@jit
def _inverse_2d(data):
    """Row-column 2-D inverse transform (times N^2) of uint64 data [N, N, lanes], in place."""
    n = data.shape[0]
    _dit_inverse(data.reshape(n, -1))
    for i in range(n):
        _dit_inverse(data[i])
