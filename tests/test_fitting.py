"""Staircase fitting: ordering, least-squares optimality, error vs bases, the bit-plane form."""
import numpy as np
import pytest

from pabnn.converters.fitting import StaircaseFit, fit_weight_staircases, staircase_to_bases
from pabnn.converters.passes import fit_activation_staircase


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("n_thresholds", [1, 2, 3, 4, 7])
def test_thresholds_and_levels_are_ordered(n_thresholds, symmetric):
    values = np.random.default_rng(n_thresholds).standard_t(4, size=3000)
    fit = StaircaseFit(n_thresholds, symmetric=symmetric).fit(values)
    assert fit.thresholds_.shape == (n_thresholds,) and fit.levels_.shape == (n_thresholds + 1,)
    assert np.all(np.diff(fit.thresholds_) >= 0) and np.all(np.diff(fit.levels_) >= 0)
    # Each threshold lies between the levels it separates.
    assert np.all(fit.levels_[:-1] <= fit.thresholds_) and np.all(fit.thresholds_ <= fit.levels_[1:])


@pytest.mark.parametrize("symmetric", [False, True])
def test_error_shrinks_as_bases_grow(symmetric):
    values = np.random.default_rng(0).normal(size=5000)
    errors = [StaircaseFit(k, symmetric=symmetric).fit(values).relative_error_ for k in range(1, 9)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    # Lloyd-Max on a Gaussian: 2 levels leave 1 - 2/pi = 36.3% of the power.
    assert errors[0] == pytest.approx(1 - 2 / np.pi, abs=0.02)


def test_levels_are_the_mean_of_their_piece():
    values = np.random.default_rng(1).exponential(size=4000)
    fit = StaircaseFit(3).fit(values)
    pieces = np.searchsorted(fit.thresholds_, values, side="right")
    for i, level in enumerate(fit.levels_):
        assert level == pytest.approx(values[pieces == i].mean(), rel=1e-9)
    np.testing.assert_allclose(fit.thresholds_, (fit.levels_[:-1] + fit.levels_[1:]) / 2)


def test_symmetric_one_threshold_is_classic_binarization():
    values = np.random.default_rng(2).normal(size=1000)
    fit = StaircaseFit(1, symmetric=True).fit(values)
    np.testing.assert_allclose(fit.thresholds_, [0.0])
    np.testing.assert_allclose(fit.levels_, [-np.abs(values).mean(), np.abs(values).mean()])


@pytest.mark.parametrize("n_thresholds", [2, 3, 4])
def test_symmetric_fit_is_symmetric(n_thresholds):
    fit = StaircaseFit(n_thresholds, symmetric=True).fit(np.random.default_rng(3).laplace(size=2000))
    np.testing.assert_allclose(fit.levels_, -fit.levels_[::-1], atol=1e-12)
    np.testing.assert_allclose(fit.thresholds_, -fit.thresholds_[::-1], atol=1e-12)


def test_lowest_level_fixed_at_zero_for_relu_outputs():
    values = np.maximum(np.random.default_rng(4).normal(size=5000), 0)
    fit = fit_activation_staircase(values, 3, nonnegative=True)
    assert fit.levels_[0] == 0.0
    assert fit.thresholds_[0] > 0  # so Qa(0) = 0: zero padding stays exact
    assert fit.transform(np.zeros(1))[0] == 0.0


def test_transform_ties_go_up():
    fit = StaircaseFit(2).fit(np.array([0.0, 0.0, 1.0, 1.0, 2.0, 2.0]))
    np.testing.assert_allclose(fit.levels_, [0, 1, 2])
    np.testing.assert_allclose(fit.transform(fit.thresholds_), fit.levels_[1:])


def test_constant_data_is_exact_and_bad_data_raises():
    fit = StaircaseFit(3).fit(np.full(50, 0.7))
    np.testing.assert_allclose(fit.transform(np.full(5, 0.7)), 0.7)
    assert fit.mse_ == 0.0
    with pytest.raises(ValueError, match="finite"):
        StaircaseFit(2).fit(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="non-empty"):
        StaircaseFit(2).fit(np.array([]))


@pytest.mark.parametrize("weight_bases", [1, 2, 4])
def test_bit_planes_reconstruct_the_staircase_exactly(weight_bases):
    weight = np.random.default_rng(weight_bases).normal(size=(6, 5, 3, 3))
    thresholds, levels, report = fit_weight_staircases(weight, weight_bases)
    signs, scales, offset = staircase_to_bases(weight, thresholds, levels)
    assert signs.shape == (weight_bases,) + weight.shape
    reconstructed = offset[:, None, None, None] + np.einsum("mo,mocij->ocij", scales, np.where(signs, 1.0, -1.0))
    for o in range(weight.shape[0]):
        expected = levels[o][np.searchsorted(thresholds[o], weight[o], side="right")]
        np.testing.assert_allclose(reconstructed[o], expected, rtol=0, atol=1e-12)
    assert report["symmetric_channels"] + report["least_squares_channels"] == weight.shape[0]


def test_weight_fit_keeps_the_better_of_least_squares_and_symmetric():
    rng = np.random.default_rng(9)
    weight = np.concatenate([rng.normal(size=(1, 400)), rng.normal(2.0, 0.3, size=(1, 400))])
    thresholds, levels, report = fit_weight_staircases(weight, 2)
    for o in range(2):
        chosen = np.mean((levels[o][np.searchsorted(thresholds[o], weight[o], side="right")] - weight[o]) ** 2)
        candidates = [StaircaseFit(2, symmetric=s).fit(weight[o]).mse_ for s in (False, True)]
        assert chosen == pytest.approx(min(candidates), rel=1e-12)
    # An off-centre channel is badly served by a symmetric staircase.
    assert report["least_squares_channels"] >= 1
