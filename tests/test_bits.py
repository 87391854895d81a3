"""Bit conventions of engine/bits.py, checked by unpacking, and the packing kernel vs its twin."""
import numpy as np
import pytest

from pabnn.engine.bits import (pack_activations, pack_activations_reference, pack_bits_last_axis,
                               pack_weight_planes, unpack_bits_last_axis, unpack_weight_planes, words_for)


def test_channel_c_is_bit_c_mod_64_of_word_c_div_64():
    for channel in (0, 1, 63, 64, 65, 127, 129):
        bits = np.zeros(130, dtype=bool)
        bits[channel] = True
        words = pack_bits_last_axis(bits)
        assert words.shape == (3,) and words.dtype == np.uint64
        expected = np.zeros(3, dtype=np.uint64)
        expected[channel // 64] = np.uint64(1) << np.uint64(channel % 64)
        np.testing.assert_array_equal(words, expected)


@pytest.mark.parametrize("channels", [1, 5, 63, 64, 65, 200])
def test_pack_unpack_round_trip_and_zero_tail(channels):
    rng = np.random.default_rng(channels)
    bits = rng.random((3, 2, channels)) < 0.5
    words = pack_bits_last_axis(bits)
    assert words.shape == (3, 2, words_for(channels))
    np.testing.assert_array_equal(unpack_bits_last_axis(words, channels), bits)
    # Bits past the last channel are zero (they must never count in a popcount).
    tail = unpack_bits_last_axis(words, words.shape[-1] * 64)[..., channels:]
    assert not tail.any()


def test_weight_planes_round_trip():
    rng = np.random.default_rng(0)
    signs = rng.random((3, 4, 70, 3, 2)) < 0.5  # [M, O, C, kh, kw]
    planes = pack_weight_planes(signs)
    assert planes.shape == (3, 4, 3, 2, 2)
    np.testing.assert_array_equal(unpack_weight_planes(planes, 70), signs)


@pytest.mark.parametrize("channels", [1, 3, 64, 65, 130])
@pytest.mark.parametrize("pads", [(0, 0, 0, 0), (1, 1, 1, 1), (0, 2, 1, 0)])
def test_pack_activations_kernel_equals_reference(channels, pads):
    rng = np.random.default_rng(channels)
    x = rng.normal(size=(2, channels, 5, 4)).astype(np.float32)
    # Thresholds on both sides of 0 so that padded positions hold both 0 and 1 bits.
    thresholds = np.sort(rng.normal(size=(3, channels)).astype(np.float32), axis=0)
    expected = pack_activations_reference(x, thresholds, pads)
    np.testing.assert_array_equal(pack_activations(x, thresholds, pads), expected)
    top, left, bottom, right = pads
    assert expected.shape == (3, 2, 5 + top + bottom, 4 + left + right, words_for(channels))


def test_activation_bits_are_a_thermometer_code_with_ties_and_nan():
    thresholds = np.array([[0.0], [0.5], [1.0]], dtype=np.float32)
    x = np.array([-1.0, 0.0, 0.25, 0.5, 0.99, 1.0, 7.0, np.nan], dtype=np.float32).reshape(1, 1, 1, 8)
    planes = pack_activations(x, thresholds, (0, 0, 0, 0))
    bits = unpack_bits_last_axis(planes, 1)[:, 0, 0, :, 0]  # [N, W]
    # x >= threshold sets the bit: ties go up; NaN compares false in every plane.
    expected = np.array([[0, 1, 1, 1, 1, 1, 1, 0],
                         [0, 0, 0, 1, 1, 1, 1, 0],
                         [0, 0, 0, 0, 0, 1, 1, 0]], dtype=bool)
    np.testing.assert_array_equal(bits, expected)


def test_padding_holds_the_bits_of_zero():
    thresholds = np.array([[-1.0, 0.0, 0.5]], dtype=np.float32)  # channel-specific thresholds
    x = np.full((1, 3, 1, 1), 5.0, dtype=np.float32)
    planes = pack_activations(x, thresholds, (1, 0, 0, 0))
    padded_bits = unpack_bits_last_axis(planes[0, 0, 0, 0], 3)
    np.testing.assert_array_equal(padded_bits, [True, True, False])  # 0 >= -1, 0 >= 0, not 0 >= 0.5
    np.testing.assert_array_equal(unpack_bits_last_axis(planes[0, 0, 1, 0], 3), [True, True, True])


@pytest.mark.parametrize("pad_value", [-1.0, 0.5, 1.0, 3.0])
def test_padding_holds_the_bits_of_the_pad_value(pad_value):
    rng = np.random.default_rng(4)
    thresholds = np.array([[-1.0, 0.0, 0.5], [0.5, 1.0, 2.0]], dtype=np.float32)
    x = rng.normal(size=(2, 3, 4, 3)).astype(np.float32)
    pads = (1, 2, 0, 1)
    planes = pack_activations(x, thresholds, pads, pad_value)
    np.testing.assert_array_equal(planes, pack_activations_reference(x, thresholds, pads, pad_value))
    corner = unpack_bits_last_axis(planes[:, 1, 0, 0], 3)  # [N, C] at a padded position
    np.testing.assert_array_equal(corner, pad_value >= thresholds)


@pytest.mark.parametrize("channels,group", [(6, 2), (12, 3), (130, 2), (5, 5), (70, 70), (192, 3)])
@pytest.mark.parametrize("pads,pad_value", [((0, 0, 0, 0), 0.0), ((1, 2, 0, 1), 0.0), ((2, 0, 1, 1), -1.0)])
def test_grouped_pack_activations_kernel_equals_reference(channels, group, pads, pad_value):
    rng = np.random.default_rng(channels + group)
    x = rng.normal(size=(2, channels, 5, 4)).astype(np.float32)
    thresholds = np.sort(rng.normal(size=(3, channels)).astype(np.float32), axis=0)
    expected = pack_activations_reference(x, thresholds, pads, pad_value, group)
    np.testing.assert_array_equal(pack_activations(x, thresholds, pads, pad_value, group), expected)
    top, left, bottom, right = pads
    assert expected.shape == (3, 2, 5 + top + bottom, 4 + left + right, group * words_for(channels // group))


@pytest.mark.parametrize("channels,group", [(6, 2), (130, 2), (5, 5), (192, 3)])
def test_each_group_starts_at_a_word_boundary(channels, group):
    """Input channel g * C/g + c is bit c % 64 of word g * words_for(C/g) + c // 64; unpacking each
    group's words gives back its channels, and the bits past a group's channels are 0."""
    group_channels = channels // group
    group_words = words_for(group_channels)
    for channel in sorted({0, group_channels - 1, group_channels, channels - 1}):
        x = np.zeros((1, channels, 1, 1), np.float32)
        x[0, channel] = 1.0
        planes = pack_activations(x, np.full((1, channels), 0.5, np.float32), (0, 0, 0, 0), group=group)
        words = planes[0, 0, 0, 0]
        expected = np.zeros(group * group_words, dtype=np.uint64)
        g, c = divmod(channel, group_channels)
        expected[g * group_words + c // 64] = np.uint64(1) << np.uint64(c % 64)
        np.testing.assert_array_equal(words, expected)
    rng = np.random.default_rng(channels)
    x = rng.normal(size=(1, channels, 2, 3)).astype(np.float32)
    thresholds = rng.normal(size=(2, channels)).astype(np.float32)
    planes = pack_activations(x, thresholds, (1, 1, 1, 1), group=group)
    per_group = planes.reshape(planes.shape[:-1] + (group, group_words))
    bits = unpack_bits_last_axis(per_group, group_words * 64)  # [N, B, Hp, Wp, group, group_words * 64]
    np.testing.assert_array_equal(bits[..., :group_channels].reshape(bits.shape[:-2] + (channels,)),
                                  unpack_bits_last_axis(pack_activations(x, thresholds, (1, 1, 1, 1)), channels))
    assert not bits[..., group_channels:].any()


def test_pack_activations_refuses_a_group_that_does_not_divide_the_channels():
    with pytest.raises(ValueError, match="group"):
        pack_activations(np.zeros((1, 6, 2, 2), np.float32), np.zeros((1, 6), np.float32), (0, 0, 0, 0), group=4)
