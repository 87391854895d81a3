"""The LLVM-IR micro-kernel against its plain-numpy twin."""
import numba
import numpy as np
import pytest

from pabnn.engine.popcount_block import CHANNELS, PIXELS, popcount_block, popcount_block_reference


@numba.njit
def _call(windows, starts, weights, weight_start, length, counts, counts_start):
    popcount_block(windows, starts, weights, weight_start, length, counts, counts_start)


@pytest.mark.parametrize("length", [1, 2, 7, 36, 100])
@pytest.mark.parametrize("density", [0.02, 0.5, 0.98])
def test_popcount_block_equals_reference(length, density):
    rng = np.random.default_rng(length)
    bits = rng.random((400 + CHANNELS * length + 8, 64)) < density
    words = np.packbits(bits, axis=1, bitorder="little").view("<u8").ravel().astype(np.uint64)
    windows, weights = words[:400], words[400:]
    starts = rng.integers(0, 400 - length, size=PIXELS).astype(np.int64)
    weight_start = 3
    fast = np.full(200, -1, dtype=np.int64)
    expected = np.full(200, -1, dtype=np.int64)
    _call(windows, starts, weights, weight_start, length, fast, 17)
    popcount_block_reference(windows, starts, weights, weight_start, length, expected, 17)
    np.testing.assert_array_equal(fast, expected)
    # Only the 64 counts starting at counts_start are written.
    assert (fast[:17] == -1).all() and (fast[17 + PIXELS * CHANNELS:] == -1).all()


def test_all_ones_count_every_bit():
    length = 5
    windows = np.full(4 * length, np.uint64(2**64 - 1), dtype=np.uint64)
    weights = np.full(CHANNELS * length, np.uint64(2**64 - 1), dtype=np.uint64)
    counts = np.zeros(PIXELS * CHANNELS, dtype=np.int64)
    _call(windows, np.arange(4, dtype=np.int64) * length, weights, 0, length, counts, 0)
    assert (counts == 64 * length).all()
