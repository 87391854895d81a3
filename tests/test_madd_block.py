"""engine/madd_block.py: the int16 multiply-add micro-kernel against its plain-numpy twin."""
import numba
import numpy as np
import pytest

from pabnn.engine.madd_block import CHANNELS, PIXELS, madd_block, madd_block_reference


@numba.njit
def _call(columns, column_start, column_stride, weights, weight_start, pairs, result, result_start, result_stride):
    madd_block(columns, column_start, column_stride, weights, weight_start, pairs, result, result_start,
               result_stride)


def both(columns, column_start, column_stride, weights, weight_start, pairs, result_start=3, result_stride=21):
    fast = np.full(result_start + CHANNELS * result_stride, -7, np.int32)
    slow = fast.copy()
    _call(columns, column_start, column_stride, weights, weight_start, pairs, fast, result_start, result_stride)
    madd_block_reference(columns, column_start, column_stride, weights, weight_start, pairs, slow, result_start,
                         result_stride)
    return fast, slow


@pytest.mark.parametrize("pairs, column_stride", [(1, 32), (5, 32), (74, 40), (300, 32)])
def test_random_blocks_equal_the_twin(pairs, column_stride):
    rng = np.random.default_rng(pairs)
    columns = rng.integers(0, 256, 7 + pairs * column_stride + 2 * PIXELS).astype(np.int16)
    weights = rng.integers(-128, 128, 5 + 2 * CHANNELS * pairs).astype(np.int16)
    fast, slow = both(columns, 7, column_stride, weights, 5, pairs)
    assert np.array_equal(fast, slow)
    assert np.all(fast[:3] == -7)  # nothing written before result_start


def test_one_hot_taps_show_which_pixel_and_channel_fired():
    """Pixel p holds 2^(p % 8) on tap 1 of step 2 only; channel o weighs that tap (o + 1): each
    sum is (o + 1) * 2^(p % 8), so a wrong lane, pair or channel shows."""
    pairs = 4
    columns = np.zeros(pairs * 2 * PIXELS, np.int16)
    for p in range(PIXELS):
        columns[2 * 2 * PIXELS + 2 * p + 1] = 2 ** (p % 8)
    weights = np.zeros(2 * CHANNELS * pairs, np.int16)
    for o in range(CHANNELS):
        weights[2 * 2 * CHANNELS + 2 * o + 1] = o + 1
        weights[2 * 2 * CHANNELS + 2 * o] = 100  # tap 0 of step 2 reads zeros
    fast, slow = both(columns, 0, 2 * PIXELS, weights, 0, pairs, result_start=0, result_stride=PIXELS)
    expected = np.array([[(o + 1) * 2 ** (p % 8) for p in range(PIXELS)] for o in range(CHANNELS)], np.int32)
    assert np.array_equal(fast.reshape(CHANNELS, PIXELS), expected)
    assert np.array_equal(fast, slow)


def test_extreme_products_sum_exactly_in_int32():
    """255 x -128 over 32895 pairs = -2^31 + 4224 (the most negative sum an IntConv can reach)."""
    pairs = 32895
    columns = np.full(pairs * 2 * PIXELS, 255, np.int16)
    weights = np.full(2 * CHANNELS * pairs, -128, np.int16)
    fast, slow = both(columns, 0, 2 * PIXELS, weights, 0, pairs, result_start=0, result_stride=PIXELS)
    assert np.all(fast == 255 * -128 * 2 * pairs) and np.array_equal(fast, slow)
