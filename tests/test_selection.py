"""converters/selection.py: candidates scored on calibration images held out from their fit."""
import os

import numpy as np
import onnx
import pytest
from tolerances import FLOAT32_RTOL, FLOAT64_RTOL, assert_close

from pabnn.converters import convert, fold_batchnorm, import_onnx
from pabnn.converters.calibration import downstream_scorer, run_tensors
from pabnn.converters.layer_fit import (approximate_layer, correct_layer, correct_output, regress_weight_levels,
                                        round_to_output, run_layer)
from pabnn.converters.methods import METHODS, LayerToFit
from pabnn.converters.fitting import StaircaseFit, UniformStaircaseFit, fit_weight_staircases, widened_staircase
from pabnn.converters.least_squares import (equations_error, gram_of, level_equations, output_statistics,
                                            squared_error, sum_statistics)
from pabnn.converters.selection import (MatchedMoments, RegressedLevels, RoundedPieces, Uncorrected, fold_complements,
                                       held_out_error)
from pabnn.engine.graph import Graph, Node

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


def select(node, inputs, target, score_outputs=None):
    """The "selected" method's fit of `node` at PA(1,2) after a ReLU."""
    layer = LayerToFit(node, inputs, target, 1, 2, True, np.random.default_rng(1))
    return METHODS["selected"].fit_layer(layer, score_outputs)


def _fold_parts(pa, inputs, target, keep_columns=None):
    return [output_statistics(pa, inputs[fold::FOLDS], target[fold::FOLDS], keep_columns) for fold in range(FOLDS)]


@pytest.mark.parametrize("correction", [Uncorrected(), MatchedMoments(), RegressedLevels(1e-1), RoundedPieces(1e-3)],
                         ids=lambda c: c.name)
@pytest.mark.parametrize("keep_columns", [False, True], ids=["gram", "columns"])
def test_held_out_error_is_the_error_of_the_fitted_layer_on_the_held_out_images(layer_data, approximation,
                                                                                correction, keep_columns):
    """The error computed from fold statistics equals running each fold's fitted PA layer (the
    real kernel) on that fold's images: the statistics hold everything the error depends on,
    whether they keep the gram matrix or the window columns."""
    _, inputs, target = layer_data
    parts = _fold_parts(approximation.pa, inputs, target, keep_columns)
    assert all(("columns" in part) == keep_columns for part in parts)
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


@pytest.mark.parametrize("keep_columns", [False, True], ids=["gram", "columns"])
def test_error_from_level_equations_equals_the_squared_error(layer_data, approximation, keep_columns):
    """For weights that keep their pieces, the error from the pieces' level equations (what
    held_out_error scores with) equals the error from the gram matrix (or the window columns),
    for any levels and bias."""
    _, inputs, target = layer_data
    statistics = output_statistics(approximation.pa, inputs, target, keep_columns)
    start = approximation.start()
    rng = np.random.default_rng(3)
    for levels, bias in [(start.levels, start.bias),
                         (start.levels * rng.uniform(0.5, 2.0, start.levels.shape), rng.normal(size=start.bias.shape))]:
        expected = squared_error(statistics, start.weights(levels=levels), bias)
        equations = level_equations(statistics, start.pieces, levels.shape[1])
        actual = equations_error(equations, levels, bias, statistics["target_squares"])
        # Both are sums of about K^2 float64 terms of the size of sum f^2, in different orders.
        assert_close(actual / np.sum(statistics["target_squares"]), expected / np.sum(statistics["target_squares"]),
                     FLOAT64_RTOL, "error from the level equations")


@pytest.mark.parametrize("keep_columns", [False, True], ids=["gram", "columns"])
def test_fold_equations_of_each_complement_are_its_level_equations(layer_data, approximation, keep_columns):
    _, inputs, target = layer_data
    parts = _fold_parts(approximation.pa, inputs, target, keep_columns)
    training = fold_complements(parts)
    start = approximation.start()
    start.fold_equations(parts, training)
    for others in training:
        normal, right = start.level_equations(others)
        expected_normal, expected_right = level_equations(others, start.pieces, start.levels.shape[1])
        scale = np.max(np.abs(expected_normal))
        assert_close(normal / scale, expected_normal / scale, FLOAT64_RTOL, "normal matrix of a complement")
        assert_close(right / scale, expected_right / scale, FLOAT64_RTOL, "right side of a complement")


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
    pa, latent, report = select(node, inputs, target)
    candidates = report["candidates"]
    best = min(candidates, key=lambda c: c["held_out_relative_error"])
    assert report["held_out_relative_error"] == best["held_out_relative_error"]
    assert (report["equalization"], report["weight_staircase"], report["correction"]) == (
        best["equalization"], best["weight_staircase"], best["correction"])
    # The simplest layer (no equalization, least squares staircase, uncorrected) is a candidate,
    # and both staircases are scored at every strength.
    assert {"equalization": 0.0, "weight_staircase": "least_squares", "correction": "none"} in [
        {key: c[key] for key in ("equalization", "weight_staircase", "correction")} for c in candidates]
    assert {"equalization": 0.0, "act_scale": 1.0, "weight_staircase": "least_squares", "correction": "none"} in [
        {key: c[key] for key in ("equalization", "act_scale", "weight_staircase", "correction")} for c in candidates]
    assert {(c["equalization"], c["act_scale"], c["weight_staircase"]) for c in candidates} == {
        (e, g, w) for e in (0.0, 0.5, 1.0) for g in (1.0, 1.15, 1.3) for w in ("least_squares", "symmetric")}
    # The chosen layer's in-sample error is that of its refit on all images, below its held-out one.
    output = run_layer(pa, inputs).astype(np.float64)
    in_sample = float(np.sum((output - target) ** 2) / np.sum(target.astype(np.float64) ** 2))
    assert in_sample <= report["held_out_relative_error"]
    assert latent["weight"].shape == node.params["weight"].shape


@pytest.mark.parametrize("fit, nonnegative", [(StaircaseFit(2, lowest_level=0.0), True),
                                              (StaircaseFit(3, symmetric=True), False),
                                              (UniformStaircaseFit(3, lowest_level=0.0), True)],
                         ids=["relu", "symmetric", "uniform"])
def test_widened_staircase_maps_v_to_scale_times_the_fit_of_v_over_scale(fit, nonnegative):
    values = np.random.default_rng(5).normal(0.3, 1.0, 4000)
    values = np.maximum(values, 0.0) if nonnegative else values
    fit.fit(values)
    widened = widened_staircase(fit, 1.3, values)
    probes = np.linspace(-3, 3, 601)
    assert_close(widened.transform(probes), 1.3 * fit.transform(probes / 1.3), 1e-12, "widened staircase")
    assert_close(widened.mse_, np.mean((widened.transform(values) - values) ** 2), 1e-12, "mse")
    assert widened.mse_ > fit.mse_  # Lloyd-Max is the least-squares fit of these values
    if nonnegative:
        assert widened.levels_[0] == 0.0
    if isinstance(fit, UniformStaircaseFit):
        assert_close(np.diff(widened.levels_), np.full(3, widened.step_), 1e-12, "uniform levels")
    with pytest.raises(ValueError, match="positive scale"):
        widened_staircase(fit, 0.0, values)


def test_a_widened_activation_staircase_is_chosen_when_it_fits_the_output_best(layer_data):
    """With the target the output of the layer whose Qa is the Lloyd-Max staircase times 1.3 (no
    equalization), that candidate is exact and the selection must choose a width of 1.3."""
    node, inputs, target = layer_data
    wide = approximate_layer(node, inputs, 1, 2, True, 0.0, np.random.default_rng(0), act_scale=1.3)
    plain = approximate_layer(node, inputs, 1, 2, True, 0.0, np.random.default_rng(0))
    assert_close(wide.act_thresholds, 1.3 * plain.act_thresholds, FLOAT32_RTOL, "thresholds")
    assert_close(wide.act_fit.levels_, 1.3 * plain.act_fit.levels_, 1e-12, "levels")
    np.testing.assert_array_equal(wide.pa.params["weight_planes"], plain.pa.params["weight_planes"])
    assert wide.report["act_scale"] == 1.3 and plain.report["act_scale"] == 1.0
    made = run_layer(wide.pa, inputs)
    _, _, report = select(node, inputs, made)
    assert report["act_scale"] == 1.3 and report["equalization"] == 0.0
    assert report["held_out_relative_error"] < 1e-6


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


def _finalists(layer_data, target, score=lambda calls: float(len(calls))):
    """{(equalization, staircase, correction): the per-fold PA nodes passed to score_outputs} of
    the "propagated" selection of the test layer on `target`, and its report; score(calls so far)
    is the network error each finalist gets (by default the first one scored wins)."""
    node, inputs, _ = layer_data
    calls = []

    def score_outputs(nodes):
        calls.append(nodes)
        return score(calls)

    _, _, report = select(node, inputs, target, score_outputs)
    keys = [(f["equalization"], f["weight_staircase"], f["correction"]) for f in report["finalists"]]
    return dict(zip(keys, calls)), report


def test_propagated_finalists_are_fitted_without_the_images_they_are_scored_on(layer_data):
    """The PA node that gives fold f's held-out outputs does not change when fold f's targets do,
    and the other folds' nodes do (they were fitted on them)."""
    _, _, target = layer_data
    before, _ = _finalists(layer_data, target)
    changed = target.copy()
    changed[0::FOLDS] *= 1.5
    after, _ = _finalists(layer_data, changed)
    common = [key for key in before if key in after and key[2] != "none"]
    assert common, (list(before), list(after))
    for key in common:
        assert len(before[key]) == FOLDS
        for name in before[key][0].params:
            np.testing.assert_array_equal(before[key][0].params[name], after[key][0].params[name],
                                          err_msg=f"{key} fold 0 {name}")
        assert any(not np.array_equal(before[key][1].params[name], after[key][1].params[name])
                   for name in before[key][1].params), f"{key}: fold 1's node ignores fold 0's images"


def test_propagated_keeps_the_finalist_with_the_smallest_network_error(layer_data):
    """One finalist per kind of correction, the per-layer held-out winner among them; the network
    error, not the per-layer error, chooses among them."""
    node, inputs, target = layer_data
    _, _, per_layer = select(node, inputs, target)
    _, report = _finalists(layer_data, target)  # the first finalist scored (uncorrected) wins
    finalists = report["finalists"]
    assert [f["correction"].split("(")[0] for f in finalists] == ["none", "moments", "regression", "rounding"]
    best = min(finalists, key=lambda f: f["held_out_relative_error"])
    assert (best["equalization"], best["weight_staircase"], best["correction"]) == (
        per_layer["equalization"], per_layer["weight_staircase"], per_layer["correction"])
    assert per_layer["correction"] != "none" and "finalists" not in per_layer
    assert report["correction"] == "none" and report["equalization"] == finalists[0]["equalization"]
    assert report["held_out_relative_error"] == finalists[0]["held_out_relative_error"]
    _, last = _finalists(layer_data, target, score=lambda calls: -float(len(calls)))
    assert last["correction"] == last["finalists"][-1]["correction"] != "none"


@pytest.mark.parametrize("later", [["/stage2/conv2/Conv", "/stage3/conv1/Conv"], []], ids=["next", "last"])
def test_downstream_scorer_carries_each_fold_to_the_next_binarized_input(later):
    """Image i's layer output comes from nodes[i % folds] and goes through the float nodes after
    it to the next binarized layer's input (the graph's output after the last binarized layer);
    the score is the squared error there relative to the float network's energy there."""
    graph = fold_batchnorm(import_onnx(onnx.load(os.path.join(DATA, "digits_resnet.onnx"))))
    images = np.load(os.path.join(DATA, "digits_sample.npz"))["calibration"][:16]
    index = next(i for i, n in enumerate(graph.nodes) if n.name == LAYER)
    node = graph.nodes[index]
    tensors = {name for n in graph.nodes for name in n.inputs + n.outputs} - {"input"}
    values = dict(run_tensors(graph, {"input": images}, tensors), input=images)
    last_use = {name: i for i, n in enumerate(graph.nodes) for name in n.inputs}
    inputs = values[node.inputs[0]]
    score = downstream_scorer(graph, index, [LAYER] + later, values.__getitem__, values.__getitem__, inputs,
                              values[node.outputs[0]], last_use)
    # The float layer in every fold: the float network (its kernels run on other batches).
    assert score([node] * FOLDS) < 1e-10
    wanted = next(n.inputs[0] for n in graph.nodes if n.name == later[0]) if later else graph.outputs[0]
    assert wanted not in (node.inputs[0], node.outputs[0])
    pa = approximate_layer(node, inputs, 1, 1, True, 0.0, np.random.default_rng(0)).pa
    replaced = Graph(graph.inputs, graph.outputs, [pa if n.name == LAYER else n for n in graph.nodes], {})
    (output,) = run_tensors(replaced, {"input": images[1::FOLDS]}, [wanted]).values()
    reference = values[wanted].astype(np.float64)
    expected = np.sum((output - reference[1::FOLDS]) ** 2) / np.sum(reference ** 2)
    assert expected > 1e-3
    # Node-by-node kernels against a Session's plan: float32 sums in another order (observed: 1e-8).
    assert_close(score([node, pa, node, node]), expected, FLOAT32_RTOL, f"error at {wanted} of fold 1")


def test_propagated_conversion_is_deterministic_given_the_seed():
    """Two conversions with the same seed give the same file contents; every binarized layer
    reports its finalists and chose one of them."""
    images = np.load(os.path.join(DATA, "digits_sample.npz"))["calibration"][:16]
    layers = [LAYER, "/stage2/conv2/Conv"]
    models = [convert(os.path.join(DATA, "digits_resnet.onnx"), calibration=images, weight_bases=1, act_bases=2,
                      binarize=layers, method="propagated", seed=3, progress=False) for _ in range(2)]
    for mine, theirs in zip(models[0].graph.nodes, models[1].graph.nodes):
        assert sorted(mine.params) == sorted(theirs.params)
        for key in mine.params:
            np.testing.assert_array_equal(mine.params[key], theirs.params[key], err_msg=f"{mine.name} {key}")
    assert [fit["layer"] for fit in models[0].fits] == layers
    for fit in models[0].fits:
        chosen = (fit["equalization"], fit["weight_staircase"], fit["correction"])
        scores = {(f["equalization"], f["weight_staircase"], f["correction"]): f["downstream_error"]
                  for f in fit["finalists"]}
        assert len(scores) == 4 and scores[chosen] == min(scores.values())


def test_window_columns_give_the_statistics_of_the_gram_matrix(layer_data, approximation):
    """Statistics that keep the window columns (chosen when a layer has fewer positions than taps)
    give the same gram matrix, level equations and squared error as those that keep the gram
    matrix, alone and summed over folds, where a fold of each kind may be mixed."""
    _, inputs, target = layer_data
    start = approximation.start()
    gram_parts = _fold_parts(approximation.pa, inputs, target, keep_columns=False)
    column_parts = _fold_parts(approximation.pa, inputs, target, keep_columns=True)
    mixed = column_parts[:2] + gram_parts[2:]
    expected = sum_statistics(gram_parts)
    scale = np.max(np.abs(expected["gram"]))
    for parts in (column_parts, mixed):
        found = sum_statistics(parts)
        assert_close(gram_of(found) / scale, expected["gram"] / scale, FLOAT64_RTOL, "gram matrix")
        for key in ("sums", "moments", "target_sums", "target_squares", "positions"):
            assert_close(found[key], expected[key], FLOAT64_RTOL, key)
        for mine, theirs in zip(level_equations(found, start.pieces, start.levels.shape[1]),
                                level_equations(expected, start.pieces, start.levels.shape[1])):
            assert_close(mine / scale, theirs / scale, FLOAT64_RTOL, "level equations")
        energy = np.sum(expected["target_squares"])
        assert_close(squared_error(found, start.weights(), start.bias) / energy,
                     squared_error(expected, start.weights(), start.bias) / energy, FLOAT64_RTOL, "squared error")
    assert "columns" in sum_statistics(column_parts) and "gram" in sum_statistics(mixed)


def test_statistics_keep_the_window_columns_when_there_are_fewer_positions_than_taps():
    """The automatic choice, on a fully connected layer of 40 inputs (taps): the columns [1, K, P]
    of 8 samples, the gram matrix [1, K, K] of 64; the same statistics either way."""
    rng = np.random.default_rng(5)
    node = Node("Gemm", "layer", ["x"], ["y"], {}, {"weight": rng.normal(size=(5, 40)).astype(np.float32),
                                                    "bias": rng.normal(size=5).astype(np.float32)})
    inputs = rng.normal(size=(64, 40)).astype(np.float32)
    target = rng.normal(size=(64, 5))
    few = output_statistics(node, inputs[:8], target[:8])
    assert few["columns"].shape == (1, 40, 8) and "gram" not in few
    many = output_statistics(node, inputs, target)
    assert many["gram"].shape == (1, 40, 40) and "columns" not in many
    assert_close(gram_of(few), output_statistics(node, inputs[:8], target[:8], keep_columns=False)["gram"],
                 FLOAT64_RTOL, "gram matrix of 8 samples")
