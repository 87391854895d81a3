"""The LLVM-IR micro-kernel against its plain-numpy twin."""
import numba
import numpy as np
import pytest

from pabnn.engine.popcount_block import (CHANNELS, DIRECT_CHANNELS, DIRECT_PIXELS, PIXELS, popcount_block,
                                        popcount_block_reference, popcount_direct_block,
                                        popcount_direct_block_reference, popcount_direct_epilogue,
                                        popcount_direct_epilogue_reference)


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
def _call_epilogue(*arguments):
    popcount_direct_epilogue(*arguments)


def _epilogue_case(rng, length):
    """Random words, bases, offsets and combine coefficients of one tile; thresholds (2 planes, stride
    24 from slot 4) with +inf (never passed) and -inf (always) among random ones."""
    case = dict(activations=_random_words(rng, 500, 0.5), weights=_random_words(rng, DIRECT_CHANNELS * length + 3, 0.5),
                bases=np.array([0, 7, 130, 7, 64, 3, 99, 250, 11, 2], dtype=np.int64),
                offsets=rng.integers(0, 200, size=length + 2).astype(np.int64), scales=rng.normal(size=60),
                constant=rng.normal(size=30), lowest_weight=rng.normal(size=30), act_terms=rng.uniform(0, 50, size=12),
                thresholds=rng.normal(scale=20, size=2 * 24).astype(np.float32),
                word_bases=np.array([-1, 40, 10, 30, 0, 20, 50, 60, 70, 80], dtype=np.int64))
    case["thresholds"][4 + 3] = np.inf
    case["thresholds"][24 + 4 + 5] = -np.inf
    return case


def _run_epilogue(call, case, length, pairs, relu, residual, has_residual, residual_layout, y, write_y, y_layout,
                  valid_channels, valid_pixels, n_thresholds):
    """`pairs` (k, j) calls of `call` on one tile (the last finishing it): (partial, y, words)."""
    partial = np.zeros(DIRECT_CHANNELS * DIRECT_PIXELS)
    words = np.full(2 * 100 + 10, 0xABCD, dtype=np.uint16)
    for pair in range(pairs):
        call(case["activations"], case["bases"], 1, 11 + pair, case["offsets"], length, case["weights"], 3,
             case["scales"], 5 + pair, partial, pair > 0, pair == pairs - 1, case["constant"], case["lowest_weight"], 4,
             case["act_terms"], 2, relu, residual, has_residual, *residual_layout, y, write_y, *y_layout,
             valid_channels, valid_pixels, case["thresholds"], 24, n_thresholds, words, case["word_bases"], 100, 3)
    return partial, y, words


# (start, channel stride, pixel stride) of a tile in an array of 2 + 16 x 9 floats: channel-major
# rows of 9 (a pixel's 8 from the start), or channels-last rows of 18 (a channel's 16 from it).
LAYOUTS = {"channel-major": (1, 9, 1), "channels-last": (2, 1, 18)}


@pytest.mark.parametrize("length", [1, 9, 36])
@pytest.mark.parametrize("pairs", [1, 3])
@pytest.mark.parametrize("relu,has_residual", [(True, True), (False, False), (True, False), (False, True)])
@pytest.mark.parametrize("valid_channels,valid_pixels", [(16, 8), (11, 5), (3, 1)])
@pytest.mark.parametrize("residual_layout,y_layout", [("channel-major", "channel-major"),
                                                      ("channels-last", "channels-last"),
                                                      ("channel-major", "channels-last"),
                                                      ("channels-last", "channel-major")])
def test_popcount_direct_epilogue_equals_reference(length, pairs, relu, has_residual, valid_channels, valid_pixels,
                                                   residual_layout, y_layout):
    """The tile's pairs into the pixel-major partial, the last one writing y in either layout and two
    planes' bits, reading the residual in either layout. y and the residual end right after the last
    valid element (reads or writes past it would fault or show); y and the words are left alone
    where nothing is written."""
    rng = np.random.default_rng(length + 7 * valid_pixels + pairs)
    case = _epilogue_case(rng, length)

    def end(layout):
        start, channel_stride, pixel_stride = LAYOUTS[layout]
        return start + (valid_channels - 1) * channel_stride + (valid_pixels - 1) * pixel_stride + 1

    residual = rng.normal(scale=20, size=end(residual_layout)).astype(np.float32)
    outputs = {}
    for name, call in (("fast", _call_epilogue), ("reference", popcount_direct_epilogue_reference)):
        y = np.full(end(y_layout), 7.5, dtype=np.float32)
        outputs[name] = _run_epilogue(call, case, length, pairs, relu, residual, has_residual,
                                      LAYOUTS[residual_layout], y, True, LAYOUTS[y_layout], valid_channels,
                                      valid_pixels, 2)
    for fast, expected in zip(outputs["fast"], outputs["reference"]):
        np.testing.assert_array_equal(fast, expected)
    start, channel_stride, pixel_stride = LAYOUTS[y_layout]
    written = np.zeros(end(y_layout), dtype=bool)
    for o in range(valid_channels):
        for p in range(valid_pixels):
            written[start + o * channel_stride + p * pixel_stride] = True
    y = outputs["fast"][1]
    assert np.all(y[~written] == 7.5) and not np.any(y[written] == 7.5)
    words = outputs["fast"][2]
    stored = np.zeros(len(words), dtype=bool)
    for p in range(valid_pixels):
        for j in range(2):
            stored[case["word_bases"][1 + p] + j * 100 + 3] = True
    assert np.all(words[~stored] == 0xABCD)
    bits = np.unpackbits(words[stored].view(np.uint8))
    assert 0.05 < bits.mean() < 0.95  # both outcomes occur


@pytest.mark.parametrize("write_y,n_thresholds", [(False, 2), (True, 0)])
def test_popcount_direct_epilogue_writes_only_what_it_is_asked(write_y, n_thresholds):
    """Without write_y, y is never touched (nor read: a 1-element array); with no thresholds, no word."""
    length = 9
    case = _epilogue_case(np.random.default_rng(5), length)
    y = np.full(1 if not write_y else 2 + 16 * 9, 7.5, dtype=np.float32)
    outputs = {}
    for name, call in (("fast", _call_epilogue), ("reference", popcount_direct_epilogue_reference)):
        outputs[name] = _run_epilogue(call, case, length, 2, True, y, False, LAYOUTS["channel-major"], y.copy(),
                                      write_y, LAYOUTS["channel-major"], 16, 8, n_thresholds)
    for fast, expected in zip(outputs["fast"], outputs["reference"]):
        np.testing.assert_array_equal(fast, expected)
    _, y_fast, words = outputs["fast"]
    assert np.all(y_fast == 7.5) != write_y
    assert np.all(words == 0xABCD) == (n_thresholds == 0)
