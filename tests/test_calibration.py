"""converters/layer_fit.py and converters/calibration.py: output correction, output regression of
the weight levels, the piece sweep, equalization, the float refit, and the per-layer diagnostics
built on them (the methods end to end: test_methods.py)."""
import numpy as np
import pytest
from tolerances import FLOAT32_RTOL, assert_close

from pabnn.converters import least_squares
from pabnn.converters.calibration import refit_float_layer
from pabnn.converters.layer_fit import (_scale_input_channels, calibrate_layer, correct_output, equalizing_scales,
                                        regress_weight_levels, run_layer, with_weight)
from pabnn.converters.least_squares import (output_statistics, piece_anchors, refit_error, regress_from_statistics,
                                            sweep_pieces, weight_pieces)
from pabnn.converters.diagnostics import classification_metrics, top1_change
from pabnn.converters.fitting import fit_weight_staircases, staircase_to_bases
from pabnn.converters.passes import fit_activation_staircase, layer_weight, pa_node
from pabnn.engine.bits import unpack_weight_planes


def _plain_pa(node, inputs, weight_bases=2, act_bases=2):
    thresholds, levels, _ = fit_weight_staircases(layer_weight(node), weight_bases)
    act = fit_activation_staircase(inputs.ravel(), act_bases, nonnegative=True)
    return pa_node(node, thresholds, levels, act.thresholds_, act.levels_, inputs.shape[1]), thresholds, levels


def _moments(values):
    axes = (0,) + tuple(range(2, values.ndim))
    return values.mean(axis=axes), values.std(axis=axes)


def test_output_correction_matches_the_float_moments_per_channel(layer_data):
    node, inputs, target = layer_data
    pa, _, _ = _plain_pa(node, inputs)
    corrected = correct_output(pa, inputs, target)
    mean, std = _moments(run_layer(corrected, inputs).astype(np.float64))
    want_mean, want_std = _moments(target.astype(np.float64))
    assert not np.allclose(_moments(run_layer(pa, inputs).astype(np.float64))[1], want_std, rtol=1e-2)
    # The correction is exact algebra; only the float32 rounding of the rescaled parameters remains.
    assert_close(mean, want_mean, FLOAT32_RTOL, "corrected channel means")
    assert_close(std, want_std, FLOAT32_RTOL, "corrected channel stds")


def test_output_regression_recovers_levels_that_generated_the_target(layer_data):
    """A target produced by the same pieces with other levels and bias is fitted exactly (ridge 0)."""
    node, inputs, _ = layer_data
    pa, thresholds, levels = _plain_pa(node, inputs)
    rng = np.random.default_rng(0)
    true_levels = np.sort(rng.normal(size=levels.shape), axis=1)
    true_bias = rng.normal(size=levels.shape[0])
    in_channels = inputs.shape[1]
    p = pa.params
    act_levels = p["act_lowest"][0] + np.concatenate([[0.0], np.cumsum(p["act_steps"].astype(np.float64))])
    generator = pa_node(node, thresholds, true_levels, p["act_thresholds"], act_levels, in_channels, bias=true_bias)
    target = run_reference_layer(generator, inputs)
    found_levels, found_bias = regress_weight_levels(node, pa, thresholds, levels, inputs, target, ridge=0.0)
    # float32 parameters of the generator: its levels are the float32 roundings of true_levels.
    assert_close(found_levels, true_levels, FLOAT32_RTOL, "regressed levels")
    assert_close(found_bias, true_bias, FLOAT32_RTOL, "regressed bias")


def run_reference_layer(node, inputs):
    from pabnn.engine.ops import get_op

    return get_op(node.op, node.name).reference(node, [inputs.astype(np.float64)])[0]


def test_output_regression_beats_moment_correction_on_the_output(layer_data):
    node, inputs, target = layer_data
    pa, thresholds, levels = _plain_pa(node, inputs)
    levels_fit, bias = regress_weight_levels(node, pa, thresholds, levels, inputs, target)
    p = pa.params
    act_levels = p["act_lowest"][0] + np.concatenate([[0.0], np.cumsum(p["act_steps"].astype(np.float64))])
    regressed = pa_node(node, thresholds, levels_fit, p["act_thresholds"], act_levels, inputs.shape[1], bias=bias)
    errors = {name: float(np.mean((run_layer(candidate, inputs) - target) ** 2)) for name, candidate in
              (("plain", pa), ("moments", correct_output(pa, inputs, target)), ("regression", regressed))}
    assert errors["regression"] < errors["moments"] < errors["plain"], errors


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_equalization_keeps_the_float_function_and_the_contract(layer_data, strength):
    node, inputs, target = layer_data
    scales = equalizing_scales(inputs, strength)
    assert scales.shape == (inputs.shape[1],) and np.all(scales > 0) and np.ptp(scales) > 0
    scaled = _scale_input_channels(node, scales)
    from pabnn.engine.ops import get_op

    conv = get_op("Conv", node.name)
    equalized = conv.reference(scaled, [inputs.astype(np.float64) * scales[None, :, None, None]])[0]
    assert_close(equalized, conv.reference(node, [inputs.astype(np.float64)])[0], FLOAT32_RTOL, "equalized conv")
    rng = np.random.default_rng(0)
    pa, latent, report = calibrate_layer(node, inputs, target, 2, 2, True, "regression", strength, rng)
    thresholds = pa.params["act_thresholds"]
    assert thresholds.shape == (2, inputs.shape[1]) and pa.params["act_steps"].shape == (2,)
    assert pa.params["act_lowest"][0] == 0.0  # the input follows a ReLU
    assert report["equalization"] == strength and latent["weight"].shape == node.params["weight"].shape
    # Per channel, the thresholds are one shared staircase divided by a_c.
    ratios = thresholds * scales[None, :].astype(np.float32)
    assert_close(ratios, np.repeat(ratios[:, :1], inputs.shape[1], axis=1), FLOAT32_RTOL, "shared staircase")


def test_classification_metrics_on_structured_logits():
    labels = np.array([0, 1, 2, 3, 4, 5, 6])
    logits = np.tile(-np.arange(7.0), (7, 1))  # class 0 ranks first, class 6 last, for every sample
    metrics = classification_metrics(logits, labels, float_logits=logits)
    assert metrics["top1"] == pytest.approx(1 / 7) and metrics["top5"] == pytest.approx(5 / 7)
    assert metrics["top1_agreement"] == 1.0 and metrics["logit_cosine"] == pytest.approx(1.0)
    flipped = classification_metrics(logits, labels, float_logits=-logits)
    assert flipped["top1_agreement"] == 0.0 and flipped["logit_cosine"] == pytest.approx(-1.0)
    assert "top5" not in classification_metrics(logits[:5, :5], labels[:5])
    with pytest.raises(ValueError, match="3 labels for 7 samples"):
        classification_metrics(logits, labels[:3])


def test_top1_change_counts_the_disagreements():
    float_correct = np.arange(10) < 8  # float right on samples 0..7
    correct = np.arange(10) >= 1  # right on 1..9: sample 0 lost, samples 8 and 9 gained
    change = top1_change(correct, float_correct)
    assert (change["lost"], change["gained"], change["float_top1"]) == (1, 2, 0.8)
    assert change["top1_change"] == pytest.approx(0.1)
    # b + c - (c - b)^2 / n = 3 - 0.1
    assert change["top1_change_ci95"] == pytest.approx(1.96 * np.sqrt(2.9) / 10)
    assert top1_change(correct, correct)["top1_change_ci95"] == 0.0


def test_top1_change_interval_is_the_standard_error_of_the_paired_differences():
    rng = np.random.default_rng(0)
    float_correct, correct = rng.random(1000) < 0.9, rng.random(1000) < 0.85
    differences = correct.astype(float) - float_correct
    change = top1_change(correct, float_correct)
    assert change["top1_change"] == pytest.approx(differences.mean())
    assert change["top1_change_ci95"] == pytest.approx(1.96 * differences.std() / np.sqrt(1000))
    labels = np.zeros(1000, dtype=np.int64)
    logits, float_logits = (np.stack([c, ~c], axis=1).astype(float) for c in (correct, float_correct))
    assert classification_metrics(logits, labels, float_logits) == dict(
        classification_metrics(logits, labels), top1_agreement=np.mean(correct == float_correct),
        logit_cosine=pytest.approx(np.mean(correct == float_correct)), **change)


def _grouped_layer(in_channels, out_channels, group, seed=0, channel_spread=(1.0, 1.0)):
    """(float grouped Conv node 3x3 stride 2 pads 1, nonnegative inputs [16, C, 8, 8], its output);
    input channel c is scaled by a factor drawn from `channel_spread`."""
    from pabnn.engine.graph import Node
    from pabnn.engine.ops import get_op

    rng = np.random.default_rng(seed)
    node = Node("Conv", "grouped", ["x"], ["y"], {"strides": [2, 2], "pads": [1, 1, 1, 1], "dilations": [1, 1],
                                                  "group": group},
                {"weight": rng.normal(size=(out_channels, in_channels // group, 3, 3)).astype(np.float32),
                 "bias": rng.normal(size=out_channels).astype(np.float32)})
    inputs = np.maximum(rng.normal(size=(16, in_channels, 8, 8)), 0) * rng.uniform(*channel_spread,
                                                                                  size=(1, in_channels, 1, 1))
    inputs = inputs.astype(np.float32)
    target = get_op("Conv").reference(node, [inputs.astype(np.float64)])[0]
    return node, inputs, target


@pytest.mark.parametrize("channels", [(6, 4, 2), (8, 8, 8)], ids=["group2", "depthwise"])
def test_grouped_equalization_keeps_the_float_function(channels):
    from pabnn.engine.ops import get_op

    node, inputs, target = _grouped_layer(*channels, channel_spread=(0.2, 3.0))  # something to equalize
    scales = equalizing_scales(inputs, 1.0)
    assert np.ptp(scales) > 0
    scaled = _scale_input_channels(node, scales)
    assert scaled.params["weight"].shape == node.params["weight"].shape
    equalized = get_op("Conv").reference(scaled, [inputs.astype(np.float64) * scales[None, :, None, None]])[0]
    assert_close(equalized, target, FLOAT32_RTOL, "equalized grouped conv")


@pytest.mark.parametrize("channels", [(6, 4, 2), (8, 8, 8)], ids=["group2", "depthwise"])
def test_grouped_output_regression_recovers_levels_that_generated_the_target(channels):
    """The regression features of a grouped layer use only each output channel's own group."""
    node, inputs, _ = _grouped_layer(*channels, seed=1)
    pa, thresholds, levels = _plain_pa(node, inputs)
    assert pa.attrs["group"] == channels[2]
    rng = np.random.default_rng(0)
    true_levels = np.sort(rng.normal(size=levels.shape), axis=1)
    true_bias = rng.normal(size=levels.shape[0])
    p = pa.params
    act_levels = p["act_lowest"][0] + np.concatenate([[0.0], np.cumsum(p["act_steps"].astype(np.float64))])
    generator = pa_node(node, thresholds, true_levels, p["act_thresholds"], act_levels, inputs.shape[1],
                        bias=true_bias)
    target = run_reference_layer(generator, inputs)
    found_levels, found_bias = regress_weight_levels(node, pa, thresholds, levels, inputs, target, ridge=0.0)
    assert_close(found_levels, true_levels, FLOAT32_RTOL, "regressed levels")
    assert_close(found_bias, true_bias, FLOAT32_RTOL, "regressed bias")


@pytest.mark.parametrize("channels", [(6, 4, 2), (8, 8, 8)], ids=["group2", "depthwise"])
@pytest.mark.parametrize("strength", [0.0, 1.0])
def test_grouped_calibrated_layer_equals_its_reference(channels, strength):
    from pabnn.engine.ops import get_op

    node, inputs, target = _grouped_layer(*channels, seed=2, channel_spread=(0.5, 2.0))
    pa, _, _ = calibrate_layer(node, inputs, target, 2, 3, True, "regression", strength, np.random.default_rng(0))
    op = get_op("PAConv")
    (fast,) = op.make_kernel(pa)([inputs])
    (reference,) = op.reference(pa, [inputs.astype(np.float64)])
    from tolerances import PA_COMBINE_RTOL

    assert_close(fast, reference, PA_COMBINE_RTOL, "calibrated grouped PAConv")
    # Calibration fits the layer: its output is far closer to the float output than to zero.
    assert np.mean((fast - target) ** 2) < 0.5 * np.mean(target ** 2)


def _pa_with_pieces(node, pa, thresholds, levels, pieces, bias):
    """The PA layer whose weights use levels[o, pieces[o, k]] (latent weights placed inside
    their pieces), with `pa`'s Qa."""
    weight = layer_weight(node).astype(np.float64)
    anchors = piece_anchors(weight, thresholds)
    latent = np.take_along_axis(anchors, pieces, axis=1).astype(np.float32).reshape(node.params["weight"].shape)
    latent_node = with_weight(node, latent)
    p = pa.params
    act_levels = p["act_lowest"][0] + np.concatenate([[0.0], np.cumsum(p["act_steps"].astype(np.float64))])
    return pa_node(latent_node, thresholds, levels, p["act_thresholds"], act_levels, pa.attrs["in_channels"],
                   bias=bias)


def _reference_error(node, inputs, target):
    return float(np.mean((run_reference_layer(node, inputs) - target) ** 2))


def test_piece_sweep_lowers_the_output_error_and_keeps_an_exact_fit(layer_data):
    """Coordinate descent on the sufficient statistics, checked by running the reference layer."""
    node, inputs, target = layer_data
    pa, thresholds, levels = _plain_pa(node, inputs)
    statistics = output_statistics(pa, inputs, target)
    pieces = weight_pieces(node, thresholds)
    levels, bias = regress_from_statistics(statistics, pieces, levels, pa.params["bias"].astype(np.float64), 0.0)
    allowed = np.ones(levels.shape, dtype=bool)
    swept = sweep_pieces(statistics, pieces, levels, bias, allowed)
    before = _reference_error(_pa_with_pieces(node, pa, thresholds, levels, pieces, bias), inputs, target)
    after = _reference_error(_pa_with_pieces(node, pa, thresholds, levels, swept, bias), inputs, target)
    assert np.mean(swept != pieces) > 0.01 and after < 0.9 * before, (before, after)
    # A target made by the PA layer itself: its own pieces are already optimal, no tap moves.
    generator = _pa_with_pieces(node, pa, thresholds, levels, swept, bias)
    exact = run_reference_layer(generator, inputs)
    exact_statistics = output_statistics(pa, inputs, exact)
    assert np.array_equal(sweep_pieces(exact_statistics, swept, levels, bias, allowed), swept)


def test_output_statistics_do_not_depend_on_the_chunk_size(layer_data, monkeypatch):
    """Wide layers accumulate their statistics over chunks of images; one image per chunk
    gives the statistics of the whole batch at once."""
    node, inputs, target = layer_data
    pa, _, _ = _plain_pa(node, inputs)
    whole = output_statistics(pa, inputs, target)
    monkeypatch.setattr(least_squares, "STATISTICS_VALUES", 1)
    chunked = output_statistics(pa, inputs, target)
    assert chunked["positions"] == whole["positions"] == inputs.shape[0] * target.shape[2] * target.shape[3]
    for key in ("gram", "sums", "moments", "target_sums"):
        np.testing.assert_allclose(chunked[key], whole[key], rtol=1e-12, err_msg=key)


def test_rounding_fits_the_layer_output_better_than_regression(layer_data):
    node, inputs, target = layer_data
    rng = np.random.default_rng(0)
    regressed, _, _ = calibrate_layer(node, inputs, target, 2, 2, True, "regression", 0.0, rng)
    rounded, latent, _ = calibrate_layer(node, inputs, target, 2, 2, True, "rounding", 0.0, rng)
    errors = [float(np.mean((run_layer(pa, inputs) - target) ** 2)) for pa in (regressed, rounded)]
    assert errors[1] < 0.9 * errors[0], errors
    # The latent weights encode the rounded planes: sign(W - t_k) of them are the node's planes.
    thresholds = latent["thresholds"]
    signs, _, _ = staircase_to_bases(latent["weight"], thresholds, np.zeros((thresholds.shape[0], 3)))
    assert np.array_equal(signs, unpack_weight_planes(rounded.params["weight_planes"], inputs.shape[1]))


def _sweep_reference(gram, sums, moments, target_sum_squares, positions, pieces, levels, bias, allowed):
    """Plain-Python twin of `_sweep_kernel` for one group: each tap in turn takes the allowed level
    whose output error E[o] = q G q + 2 b q.s + n b^2 - 2 q.r - 2 b sum f + sum f^2, evaluated in
    full for every candidate, is smallest (the current level kept unless one is strictly better)."""
    pieces = pieces.copy()

    def error(o, q):
        return (q @ gram @ q + 2 * bias[o] * q @ sums + positions * bias[o] ** 2 - 2 * q @ moments[o]
                + target_sum_squares[o])

    for k in range(gram.shape[0]):
        for o in range(pieces.shape[0]):
            q = levels[o, pieces[o]]
            best, best_error = pieces[o, k], error(o, q)
            for level in range(levels.shape[1]):
                if allowed[o, level]:
                    candidate = q.copy()
                    candidate[k] = levels[o, level]
                    if error(o, candidate) < best_error - 1e-9 * abs(best_error):
                        best, best_error = level, error(o, candidate)
            pieces[o, k] = best
    return pieces


def test_sweep_kernel_equals_its_plain_python_twin():
    rng = np.random.default_rng(3)
    out_channels, taps, positions = 5, 12, 200
    columns = rng.integers(0, 3, size=(taps, positions)).astype(np.float64)
    target = rng.normal(size=(out_channels, positions))
    levels = np.sort(rng.normal(size=(out_channels, 3)), axis=1)
    bias = rng.normal(size=out_channels)
    allowed = np.ones(levels.shape, dtype=bool)
    allowed[0, 1] = False  # an empty middle piece is never chosen, though it would fit channel 0 exactly
    target[0] = levels[0, 1] * columns.sum(axis=0) + bias[0]
    pieces = rng.integers(0, 3, size=(out_channels, taps))
    pieces[0][pieces[0] == 1] = 0
    gram, sums, moments = columns @ columns.T, columns.sum(axis=1), target @ columns.T
    statistics = {"gram": gram[None], "sums": sums[None], "moments": moments[None],
                  "target_sums": target.sum(axis=1)[None], "positions": positions}
    swept = sweep_pieces(statistics, pieces, levels, bias, allowed)
    expected = _sweep_reference(gram, sums, moments, (target ** 2).sum(axis=1), positions, pieces, levels, bias,
                                allowed)
    assert np.mean(swept != pieces) > 0.1  # the sweep has work to do
    assert not np.any(swept[0] == 1)
    np.testing.assert_array_equal(swept, expected)


def _float_layer(op, seed):
    """(float Conv/Gemm node, nonnegative inputs, the output of the same layer with other weights
    and bias): a Conv has group 2, stride 2, pads 1 and dilation 2."""
    from pabnn.engine.graph import Node
    from pabnn.engine.ops import get_op

    rng = np.random.default_rng(seed)
    if op == "Conv":
        attrs = {"strides": [2, 2], "pads": [1, 1, 1, 1], "dilations": [2, 2], "group": 2}
        weight_shape, input_shape = (4, 3, 3, 3), (24, 6, 9, 9)
    else:
        attrs, weight_shape, input_shape = {}, (5, 7), (64, 7)

    def layer():
        return Node(op, "layer", ["x"], ["y"], dict(attrs),
                    {"weight": rng.normal(size=weight_shape).astype(np.float32),
                     "bias": rng.normal(size=weight_shape[0]).astype(np.float32)})

    node, generator = layer(), layer()
    inputs = np.maximum(rng.normal(size=input_shape), 0).astype(np.float32)
    return node, inputs, get_op(op).reference(generator, [inputs.astype(np.float64)])[0], generator


@pytest.mark.parametrize("op", ["Conv", "Gemm"])
def test_float_refit_recovers_the_layer_that_made_the_target(op):
    node, inputs, target, generator = _float_layer(op, seed=4)
    refitted, report = refit_float_layer(node, inputs, target, ridges=(0.0,))
    assert report["ridge"] == 0.0 and report["output_sqnr_db"] > report["trained_output_sqnr_db"]
    assert refitted.attrs == node.attrs
    assert_close(refitted.params["weight"], generator.params["weight"], FLOAT32_RTOL, "refitted weight")
    assert_close(refitted.params["bias"], generator.params["bias"], FLOAT32_RTOL, "refitted bias")
    # The ridge pulls towards the trained weights: without bound, it keeps them.
    kept, _ = refit_float_layer(node, inputs, target, ridges=(1e9,))
    assert_close(kept.params["weight"], node.params["weight"], 1e-4, "weight under an unbounded ridge")
    assert_close(kept.params["bias"], node.params["bias"], 1e-4, "bias under an unbounded ridge")


@pytest.mark.parametrize("op", ["Conv", "Gemm"])
def test_float_refit_cross_validation_chooses_the_ridge_the_data_supports(op):
    from pabnn.engine.ops import get_op

    node, inputs, clean, _ = _float_layer(op, seed=5)
    # A target that other weights explain exactly: the smallest ridge fits it best on held-out images.
    assert refit_float_layer(node, inputs, clean, ridges=(1e-6, 1e2))[1]["ridge"] == 1e-6
    # The node's own output under noise 30 times its size: nothing to learn, the trained weights win.
    own = get_op(op).reference(node, [inputs.astype(np.float64)])[0]
    noisy = own + 30 * np.std(own) * np.random.default_rng(0).normal(size=own.shape)
    refitted, report = refit_float_layer(node, inputs, noisy, ridges=(1e-6, 1e2))
    assert report["ridge"] == 1e2
    overfitted, _ = refit_float_layer(node, inputs, noisy, ridges=(1e-6,))
    distances = [np.abs(fit.params["weight"] - node.params["weight"]).max() for fit in (refitted, overfitted)]
    assert distances[0] < 0.5 * distances[1], distances


@pytest.mark.parametrize("op", ["Conv", "Gemm"])
def test_refit_error_equals_the_error_of_the_layer_run_on_the_data(op):
    """`refit_error` from the sufficient statistics vs sum (y - f)^2 - sum f^2 with y computed
    by the reference layer."""
    from pabnn.engine.ops import get_op

    node, inputs, target, generator = _float_layer(op, seed=6)
    solution = np.concatenate([generator.params["weight"].reshape(len(generator.params["bias"]), -1),
                               generator.params["bias"][:, None]], axis=1).astype(np.float64)
    output = get_op(op).reference(generator, [inputs.astype(np.float64)])[0]
    noisy_target = target + np.random.default_rng(1).normal(size=target.shape)
    expected = np.sum((output - noisy_target) ** 2) - np.sum(noisy_target ** 2)
    found = refit_error(output_statistics(node, inputs, noisy_target), solution)
    assert found == pytest.approx(expected, rel=1e-9)
