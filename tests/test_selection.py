"""converters/selection.py: candidates scored on calibration images held out from their fit."""
import os

import numpy as np
import onnx
import pytest
from tolerances import FLOAT32_RTOL, assert_close

from pabnn.converters import fold_batchnorm, import_onnx
from pabnn.converters.calibration import (_select, approximate_layer, correct_layer, correct_output,
                                          regress_weight_levels, round_to_output, run_layer, run_tensors)
from pabnn.converters.fitting import fit_weight_staircases
from pabnn.converters.least_squares import output_statistics, squared_error, sum_statistics
from pabnn.converters.selection import MatchedMoments, RegressedLevels, RoundedPieces, Uncorrected, held_out_error

DATA = os.path.join(os.path.dirname(__file__), "..", "examples", "data")
LAYER = "/stage2/conv1/Conv"  # stride 2, pads 1, input after a ReLU
FOLDS = 4


@pytest.fixture(scope="module")
def layer_data():
    """(float Conv node, its float input [24, ...], its float output) on 24 calibration digits."""
    graph = fold_batchnorm(import_onnx(onnx.load(os.path.join(DATA, "digits_resnet.onnx"))))
    images = np.load(os.path.join(DATA, "digits_sample.npz"))["calibration"][:24]
    node = next(n for n in graph.nodes if n.name == LAYER)
    values = run_tensors(graph, {"input": images}, [node.inputs[0], node.outputs[0]])
    return node, values[node.inputs[0]], values[node.outputs[0]]


@pytest.fixture(scope="module")
def approximation(layer_data):
    node, inputs, _ = layer_data
    return approximate_layer(node, inputs, 2, 2, True, 0.5, np.random.default_rng(0))


def _fold_parts(pa, inputs, target):
    return [output_statistics(pa, inputs[fold::FOLDS], target[fold::FOLDS]) for fold in range(FOLDS)]


@pytest.mark.parametrize("correction", [Uncorrected(), MatchedMoments(), RegressedLevels(1e-1), RoundedPieces(1e-3)],
                         ids=lambda c: c.name)
def test_held_out_error_is_the_error_of_the_fitted_layer_on_the_held_out_images(layer_data, approximation,
                                                                                correction):
    """The error computed from fold statistics equals running each fold's fitted PA layer (the
    real kernel) on that fold's images: the statistics hold everything the error depends on."""
    _, inputs, target = layer_data
    parts = _fold_parts(approximation.pa, inputs, target)
    start = approximation.start()
    expected = 0.0
    for fold in range(FOLDS):
        pieces, levels, bias = correction.fit(sum_statistics(parts[:fold] + parts[fold + 1:]), start)
        layer = approximation.finish(pieces, levels, bias)[0]
        output = run_layer(layer, inputs[fold::FOLDS]).astype(np.float64)
        expected += float(np.sum((output - target[fold::FOLDS]) ** 2))
    actual = held_out_error(parts, correction, start)
    # The kernel's float32 output against the float64 statistics: relative to the error's size.
    assert_close(actual / expected, 1.0, FLOAT32_RTOL * 10, f"{correction.name} held-out error")


def test_held_out_error_differs_from_the_in_sample_error(layer_data, approximation):
    """A regression scored on its own images looks better than on held-out ones."""
    _, inputs, target = layer_data
    parts = _fold_parts(approximation.pa, inputs, target)
    start = approximation.start()
    correction = RegressedLevels(1e-3)
    everything = sum_statistics(parts)
    _, levels, bias = correction.fit(everything, start)
    in_sample = float(np.sum(squared_error(everything, start.weights(levels=levels), bias)))
    assert held_out_error(parts, correction, start) > in_sample


def test_matched_moments_from_statistics_equal_the_moment_correction(layer_data, approximation):
    _, inputs, target = layer_data
    statistics = output_statistics(approximation.pa, inputs, target)
    pieces, levels, bias = MatchedMoments().fit(statistics, approximation.start())
    from_statistics = run_layer(approximation.finish(pieces, levels, bias)[0], inputs)
    measured = run_layer(correct_output(approximation.pa, inputs, target), inputs)
    assert_close(from_statistics, measured, FLOAT32_RTOL, "moment correction")


def test_selection_keeps_the_candidate_with_the_smallest_held_out_error(layer_data):
    node, inputs, target = layer_data
    pa, latent, report = _select(node, inputs, target, 1, 2, True, np.random.default_rng(1))
    candidates = report["candidates"]
    best = min(candidates, key=lambda c: c["held_out_relative_error"])
    assert report["held_out_relative_error"] == best["held_out_relative_error"]
    assert (report["equalization"], report["weight_staircase"], report["correction"]) == (
        best["equalization"], best["weight_staircase"], best["correction"])
    # The simplest layer (no equalization, least squares staircase, uncorrected) is a candidate,
    # and both staircases are scored at every strength.
    assert {"equalization": 0.0, "weight_staircase": "least_squares", "correction": "none"} in [
        {key: c[key] for key in ("equalization", "weight_staircase", "correction")} for c in candidates]
    assert {(c["equalization"], c["weight_staircase"]) for c in candidates} == {
        (e, w) for e in (0.0, 0.5, 1.0) for w in ("least_squares", "symmetric")}
    # The chosen layer's in-sample error is that of its refit on all images, below its held-out one.
    output = run_layer(pa, inputs).astype(np.float64)
    in_sample = float(np.sum((output - target) ** 2) / np.sum(target.astype(np.float64) ** 2))
    assert in_sample <= report["held_out_relative_error"]
    assert latent["weight"].shape == node.params["weight"].shape


def test_symmetric_staircase_at_one_base_is_plus_minus_mean_absolute_weight():
    weight = np.random.default_rng(2).normal(0.3, 1.0, size=(5, 3, 3, 3))
    thresholds, levels, report = fit_weight_staircases(weight, 1, staircase="symmetric")
    mean_abs = np.abs(weight.reshape(5, -1)).mean(axis=1)
    assert_close(thresholds[:, 0], np.zeros(5), 1e-12, "thresholds")
    assert_close(levels, np.stack([-mean_abs, mean_abs], axis=1), 1e-12, "levels")
    assert report["symmetric_channels"] == 5


def test_unknown_weight_staircase_is_refused():
    with pytest.raises(ValueError, match="unknown weight staircase 'signed'"):
        fit_weight_staircases(np.ones((2, 3)), 1, staircase="signed")


def test_method_corrections_equal_the_functional_fits(layer_data, approximation):
    """The "regression" and "rounding" methods (their correction classes on the statistics) give
    the layers that `regress_weight_levels` and `round_to_output` give."""
    _, inputs, target = layer_data
    pa, scaled, thresholds = approximation.pa, approximation.scaled, approximation.weight_thresholds
    levels, bias = regress_weight_levels(scaled, pa, thresholds, approximation.weight_levels, inputs, target)
    regressed, _, _ = correct_layer(approximation, inputs, target, "regression")
    assert_close(run_layer(regressed, inputs), run_layer(approximation.with_levels(levels, bias), inputs),
                 FLOAT32_RTOL, "regression")
    rounded_weights, levels, bias = round_to_output(scaled, pa, thresholds, approximation.weight_levels, inputs,
                                                    target)
    rounded, latent, _ = correct_layer(approximation, inputs, target, "rounding")
    np.testing.assert_array_equal(latent["weight"], rounded_weights.params["weight"])
    assert_close(run_layer(rounded, inputs), run_layer(approximation.with_levels(levels, bias, rounded_weights),
                                                       inputs), FLOAT32_RTOL, "rounding")
