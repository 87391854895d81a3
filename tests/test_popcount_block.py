"""The LLVM-IR micro-kernel against its plain-numpy twin."""
import numba
import numpy as np
import pytest

from pabnn.engine.popcount_block import (CHANNELS, DIRECT_CHANNELS, DIRECT_PIXELS, PIXELS, popcount_block,
                                        popcount_block_reference, popcount_direct_block,
                                        popcount_direct_block_reference, popcount_direct_output,
                                        popcount_direct_output_reference, popcount_direct_planes,
                                        popcount_direct_planes_reference)


@numba.njit
def _call(windows, window_start, window_stride, weights, weight_start, length, scales, scales_start, result,
          result_start, result_stride, accumulate):
    popcount_block(windows, window_start, window_stride, weights, weight_start, length, scales, scales_start, result,
                   result_start, result_stride, accumulate)


@pytest.mark.parametrize("accumulate", [True, False])
@pytest.mark.parametrize("length", [1, 2, 7, 36, 100])
@pytest.mark.parametrize("density", [0.02, 0.5, 0.98])
@pytest.mark.parametrize("window_stride", [PIXELS, 11])
def test_popcount_block_equals_reference(length, density, accumulate, window_stride):
    rng = np.random.default_rng(length)
    window_words = 5 + window_stride * length + PIXELS
    bits = rng.random((window_words + CHANNELS * length + 8, 64)) < density
    words = np.packbits(bits, axis=1, bitorder="little").view("<u8").ravel().astype(np.uint64)
    windows, weights = words[:window_words], words[window_words:]
    scales = rng.normal(size=40)
    result_start, result_stride = 9, 10  # channel o, pixel p -> 9 + 10 o + p
    initial = rng.normal(size=100)
    fast, expected = initial.copy(), initial.copy()
    _call(windows, 5, window_stride, weights, 3, length, scales, 5, fast, result_start, result_stride, accumulate)
    popcount_block_reference(windows, 5, window_stride, weights, 3, length, scales, 5, expected, result_start,
                             result_stride, accumulate)
    # Same float64 operations in the same order (convert, multiply, add): bitwise equal.
    np.testing.assert_array_equal(fast, expected)
    touched = np.zeros(100, dtype=bool)
    for o in range(CHANNELS):
        touched[result_start + o * result_stride:result_start + o * result_stride + PIXELS] = True
    np.testing.assert_array_equal(fast[~touched], initial[~touched])


def test_one_hot_words_show_which_pixel_and_channel_fired():
    # Pixel p's word t has bit p; channel o's word t has bit o for t < o + 1 only: the count of
    # (o, p) is the number of t <= o with p == o, i.e. o + 1 on the diagonal and 0 elsewhere.
    length = CHANNELS
    windows = np.zeros(PIXELS * length, dtype=np.uint64)
    weights = np.zeros(CHANNELS * length, dtype=np.uint64)
    for t in range(length):
        for p in range(PIXELS):
            windows[t * PIXELS + p] = np.uint64(1) << np.uint64(p)
        for o in range(CHANNELS):
            if t <= o:
                weights[t * CHANNELS + o] = np.uint64(1) << np.uint64(o)
    result = np.full(CHANNELS * PIXELS, 7.0)
    _call(windows, 0, PIXELS, weights, 0, length, np.ones(CHANNELS), 0, result, 0, PIXELS, False)
    expected = np.diag(np.arange(1.0, CHANNELS + 1))
    np.testing.assert_array_equal(result.reshape(CHANNELS, PIXELS), expected)


def test_all_ones_count_every_bit():
    length = 5
    windows = np.full(PIXELS * length, np.uint64(2**64 - 1), dtype=np.uint64)
    weights = np.full(CHANNELS * length, np.uint64(2**64 - 1), dtype=np.uint64)
    result = np.zeros(CHANNELS * PIXELS)
    _call(windows, 0, PIXELS, weights, 0, length, np.ones(CHANNELS), 0, result, 0, PIXELS, True)
    assert (result == 64 * length).all()


@numba.njit
def _call_direct(activations, bases, bases_start, shift, offsets, length, weights, weight_start, scales, scales_start,
                 result, result_start, result_stride, accumulate):
    popcount_direct_block(activations, bases, bases_start, shift, offsets, length, weights, weight_start, scales,
                          scales_start, result, result_start, result_stride, accumulate)


def _random_words(rng, count, density):
    bits = rng.random((count, 64)) < density
    return np.packbits(bits, axis=1, bitorder="little").view("<u8").ravel().astype(np.uint64)


@pytest.mark.parametrize("accumulate", [True, False])
@pytest.mark.parametrize("length", [1, 2, 9, 36, 100])
@pytest.mark.parametrize("density", [0.02, 0.5, 0.98])
def test_popcount_direct_block_equals_reference(length, density, accumulate):
    rng = np.random.default_rng(length)
    activations = _random_words(rng, 500, density)
    weights = _random_words(rng, DIRECT_CHANNELS * length + 3, density)
    # Pixels anywhere (repeated, out of order), window words anywhere (repeated, descending).
    bases = np.array([0, 7, 130, 7, 64, 3, 99, 250, 11, 2], dtype=np.int64)
    offsets = rng.integers(0, 200, size=length + 2).astype(np.int64)
    scales = rng.normal(size=40)
    result_start, result_stride = 9, 13  # channel o, pixel p -> 9 + 13 o + p
    initial = rng.normal(size=DIRECT_CHANNELS * result_stride + 20)
    fast, expected = initial.copy(), initial.copy()
    arguments = (bases, 1, 11, offsets, length, weights, 3, scales, 5)
    _call_direct(activations, *arguments, fast, result_start, result_stride, accumulate)
    popcount_direct_block_reference(activations, *arguments, expected, result_start, result_stride, accumulate)
    # Same float64 operations in the same order (convert, multiply, add): bitwise equal.
    np.testing.assert_array_equal(fast, expected)
    touched = np.zeros(len(initial), dtype=bool)
    for o in range(DIRECT_CHANNELS):
        touched[result_start + o * result_stride:result_start + o * result_stride + DIRECT_PIXELS] = True
    np.testing.assert_array_equal(fast[~touched], initial[~touched])


def test_direct_block_one_hot_shows_which_pixel_channel_and_step_fired():
    # Pixel p's word at step t has bit p only; channel o's weight word at step t has bit (o % 8)
    # when t == o // 8 and nothing otherwise: count (o, p) = 1 exactly when p == o % 8 and the
    # step t = o // 8 exists (o < 8 * length), so each step shows up in its own channels.
    length = 3  # the last step has no weight bits: it adds nothing
    offsets = np.arange(length, dtype=np.int64) * DIRECT_PIXELS
    activations = np.zeros(DIRECT_PIXELS * length, dtype=np.uint64)
    for t in range(length):
        for p in range(DIRECT_PIXELS):
            activations[t * DIRECT_PIXELS + p] = np.uint64(1) << np.uint64(p)
    weights = np.zeros(DIRECT_CHANNELS * length, dtype=np.uint64)
    for o in range(DIRECT_CHANNELS):
        if o // DIRECT_PIXELS < length:
            weights[(o // DIRECT_PIXELS) * DIRECT_CHANNELS + o] = np.uint64(1) << np.uint64(o % DIRECT_PIXELS)
    bases = np.arange(DIRECT_PIXELS, dtype=np.int64)
    result = np.full(DIRECT_CHANNELS * DIRECT_PIXELS, 7.0)
    _call_direct(activations, bases, 0, 0, offsets, length, weights, 0, np.ones(DIRECT_CHANNELS), 0, result, 0,
                 DIRECT_PIXELS, False)
    o = np.arange(DIRECT_CHANNELS)
    pixels = np.arange(DIRECT_PIXELS)
    expected = (o[:, None] % DIRECT_PIXELS == pixels[None, :]) & (o // DIRECT_PIXELS < length)[:, None]
    np.testing.assert_array_equal(result.reshape(DIRECT_CHANNELS, DIRECT_PIXELS), expected.astype(float))


@numba.njit
def _call_planes(*arguments):
    popcount_direct_planes(*arguments)


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("valid_pixels", [8, 3])
@pytest.mark.parametrize("length", [1, 9, 36])
def test_popcount_direct_planes_equals_reference(length, valid_pixels, relu):
    """Three (k, j) pairs into the pixel-major partial, the last one writing two planes' bits, with
    thresholds +inf (never passed) and -inf (always) among random ones. Ties at thresholds the
    float32 outputs take are in tests/test_plan.py (hand-off cases)."""
    rng = np.random.default_rng(length + valid_pixels)
    activations = _random_words(rng, 500, 0.5)
    weights = _random_words(rng, DIRECT_CHANNELS * length + 3, 0.5)
    bases = np.array([0, 7, 130, 7, 64, 3, 99, 250, 11, 2], dtype=np.int64)
    offsets = rng.integers(0, 200, size=length + 2).astype(np.int64)
    scales = rng.normal(size=60)
    slot_start, stride = 4, 24
    constant, lowest_weight = rng.normal(size=30), rng.normal(size=30)
    act_terms = rng.uniform(0, 50, size=12)
    thresholds = rng.normal(scale=20, size=2 * stride).astype(np.float32)
    thresholds[slot_start + 3] = np.inf
    thresholds[stride + slot_start + 5] = -np.inf
    word_bases = np.array([-1, 40, 10, 30, 0, 20, 50, 60, 70, 80], dtype=np.int64)
    plane_stride, block_offset = 100, 3
    outputs = {}
    for name, call in (("fast", _call_planes), ("reference", popcount_direct_planes_reference)):
        partial = np.zeros(DIRECT_CHANNELS * DIRECT_PIXELS)
        words = np.full(2 * plane_stride + 10, 0xABCD, dtype=np.uint16)
        for pair in range(3):
            call(activations, bases, 1, 11 + pair, offsets, length, weights, 3, scales, 5 + pair, partial, pair > 0,
                 pair == 2, constant, lowest_weight, slot_start, act_terms, 2, relu, thresholds, stride, 2, words,
                 word_bases, plane_stride, block_offset, valid_pixels)
        outputs[name] = (partial, words)
    np.testing.assert_array_equal(outputs["fast"][1], outputs["reference"][1])
    np.testing.assert_array_equal(outputs["fast"][0], outputs["reference"][0])  # the last pair leaves it as it was
    written = np.zeros(len(outputs["fast"][1]), dtype=bool)
    for p in range(valid_pixels):
        for j in range(2):
            written[word_bases[1 + p] + j * plane_stride + block_offset] = True
    assert np.all(outputs["fast"][1][~written] == 0xABCD)
    bits = np.unpackbits(outputs["fast"][1][written].view(np.uint8))
    assert 0.1 < bits.mean() < 0.9  # both outcomes occur


@numba.njit
def _call_output(*arguments):
    popcount_direct_output(*arguments)


@pytest.mark.parametrize("accumulate,has_residual,relu", [(True, True, True), (False, False, False),
                                                          (True, False, True), (False, True, False)])
@pytest.mark.parametrize("valid_channels,valid_pixels", [(16, 8), (11, 5)])
@pytest.mark.parametrize("n_thresholds", [0, 2])
def test_popcount_direct_output_equals_reference(accumulate, has_residual, relu, valid_channels, valid_pixels,
                                                 n_thresholds):
    """y rows of 9 floats per channel (the tile's 8 pixels from y_start), the last valid channel's
    row ending the array (reads past it would fault or differ); thresholds +inf and -inf among
    random ones; words left alone where nothing is written."""
    length = 9
    rng = np.random.default_rng(valid_channels + 3 * valid_pixels + n_thresholds)
    activations = _random_words(rng, 500, 0.5)
    weights = _random_words(rng, DIRECT_CHANNELS * length + 3, 0.5)
    bases = np.array([0, 7, 130, 7, 64, 3, 99, 250, 11, 2], dtype=np.int64)
    offsets = rng.integers(0, 200, size=length).astype(np.int64)
    scales = rng.normal(size=40)
    partial = rng.normal(scale=5, size=DIRECT_CHANNELS * DIRECT_PIXELS)
    slot_start, stride = 4, 24
    constant, lowest_weight = rng.normal(size=30), rng.normal(size=30)
    act_terms = rng.uniform(0, 50, size=12)
    y_start, channel_stride = 1, 9
    size = y_start + (valid_channels - 1) * channel_stride + valid_pixels
    residual = rng.normal(scale=20, size=size).astype(np.float32)
    thresholds = rng.normal(scale=20, size=2 * stride).astype(np.float32)
    thresholds[slot_start + 3] = np.inf
    thresholds[stride + slot_start + 5] = -np.inf
    word_bases = np.array([-1, 40, 10, 30, 0, 20, 50, 60, 70, 80], dtype=np.int64)
    outputs = {}
    for name, call in (("fast", _call_output), ("reference", popcount_direct_output_reference)):
        y = np.full(size, 7.5, dtype=np.float32)
        words = np.full(2 * 100 + 10, 0xABCD, dtype=np.uint16)
        call(activations, bases, 1, 11, offsets, length, weights, 3, scales, 5, partial.copy(), accumulate, constant,
             lowest_weight, slot_start, act_terms, 2, relu, residual, has_residual, y, y_start, channel_stride,
             valid_channels, valid_pixels, thresholds, stride, n_thresholds, words, word_bases, 100, 3)
        outputs[name] = (y, words)
    np.testing.assert_array_equal(outputs["fast"][0], outputs["reference"][0])
    np.testing.assert_array_equal(outputs["fast"][1], outputs["reference"][1])
    written = np.zeros(size, dtype=bool)
    for o in range(valid_channels):
        written[y_start + o * channel_stride:y_start + o * channel_stride + valid_pixels] = True
    assert np.all(outputs["fast"][0][~written] == 7.5) and not np.any(outputs["fast"][0][written] == 7.5)
    changed = outputs["fast"][1] != 0xABCD
    assert changed.sum() <= 2 * valid_pixels and (n_thresholds > 0) == bool(changed.any())
