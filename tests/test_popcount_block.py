"""The LLVM-IR micro-kernel against its plain-numpy twin."""
import numba
import numpy as np
import pytest

from pabnn.engine.popcount_block import CHANNELS, PIXELS, popcount_block, popcount_block_reference


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
