"""The LLVM-IR micro-kernel against its plain-numpy twin."""
import numba
import numpy as np
import pytest

from pabnn.engine.popcount_block import CHANNELS, PIXELS, popcount_block, popcount_block_reference


@numba.njit
def _call(windows, starts, weights, weight_start, length, scales, scales_start, result, result_start, result_stride,
          accumulate):
    popcount_block(windows, starts, weights, weight_start, length, scales, scales_start, result, result_start,
                   result_stride, accumulate)


@pytest.mark.parametrize("accumulate", [True, False])
@pytest.mark.parametrize("length", [1, 2, 7, 36, 100])
@pytest.mark.parametrize("density", [0.02, 0.5, 0.98])
def test_popcount_block_equals_reference(length, density, accumulate):
    rng = np.random.default_rng(length)
    bits = rng.random((400 + CHANNELS * length + 8, 64)) < density
    words = np.packbits(bits, axis=1, bitorder="little").view("<u8").ravel().astype(np.uint64)
    windows, weights = words[:400], words[400:]
    starts = rng.integers(0, 400 - length, size=PIXELS).astype(np.int64)
    scales = rng.normal(size=40)
    result_start, result_stride = 9, 6  # channel o, pixel p -> 9 + 6 o + p
    initial = rng.normal(size=120)
    fast, expected = initial.copy(), initial.copy()
    _call(windows, starts, weights, 3, length, scales, 5, fast, result_start, result_stride, accumulate)
    popcount_block_reference(windows, starts, weights, 3, length, scales, 5, expected, result_start, result_stride,
                             accumulate)
    # Same float64 operations in the same order (convert, multiply, add): bitwise equal.
    np.testing.assert_array_equal(fast, expected)
    touched = np.zeros(120, dtype=bool)
    for o in range(CHANNELS):
        touched[result_start + o * result_stride:result_start + o * result_stride + PIXELS] = True
    np.testing.assert_array_equal(fast[~touched], initial[~touched])


def test_all_ones_count_every_bit():
    length = 5
    windows = np.full(4 * length, np.uint64(2**64 - 1), dtype=np.uint64)
    weights = np.full(CHANNELS * length, np.uint64(2**64 - 1), dtype=np.uint64)
    result = np.zeros(PIXELS * CHANNELS)
    _call(windows, np.arange(4, dtype=np.int64) * length, weights, 0, length, np.ones(CHANNELS), 0, result,
          0, PIXELS, True)
    assert (result == 64 * length).all()
