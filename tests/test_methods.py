"""converters/methods.py: every calibration method end to end on the bundled ResNet, and the
equalization search of "equalized" ("selected" and "propagated": tests/test_selection.py)."""
import numpy as np
import pytest
from models import assert_engine_matches_reference_per_op
from conftest import MODEL

from pabnn.converters import convert
from pabnn.converters.diagnostics import layer_sqnr
from pabnn.converters.layer_fit import MAX_ACTIVATION_SAMPLES, calibrate_layer, output_error
from pabnn.converters.methods import METHODS, SEARCH_IMAGES, LayerToFit
from pabnn.engine import ConversionError


@pytest.mark.slow
def test_sequential_methods_raise_held_out_sqnr_over_lloyd(sample, float_graph):
    """Every layer's output, measured end to end on held-out digits, is closer to the float
    network with sequential calibration + output regression than with plain Lloyd-Max, closer
    still when the weights' pieces are chosen by the output too, and closer again when each layer
    also chooses its input equalization."""
    feeds = {"input": sample["evaluation"][:64]}
    sqnr = {}
    for method in ("lloyd", "sequential", "regression", "rounding", "equalized"):
        model = convert(MODEL, calibration=sample["calibration"][:64], weight_bases=2, act_bases=2, method=method,
                        min_fan_in=1, progress=False)
        assert model.graph.metadata["converter"]["method"] == method
        assert [fit["method"] for fit in model.fits] == [method] * 8
        sqnr[method] = [row["sqnr_db"] for row in layer_sqnr(model.graph, float_graph, feeds)]
    assert len(sqnr["lloyd"]) == 8
    assert (np.mean(sqnr["equalized"]) > np.mean(sqnr["rounding"]) > np.mean(sqnr["regression"])
            > np.mean(sqnr["sequential"]) > np.mean(sqnr["lloyd"])), sqnr
    assert sqnr["regression"][-1] > sqnr["lloyd"][-1], sqnr


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_gives_a_valid_pa_graph_equal_to_its_reference(sample, method):
    model = convert(MODEL, calibration=sample["calibration"][:16], weight_bases=1, act_bases=2,
                    binarize=["/stage1/conv1/Conv", "/stage2/shortcut/shortcut.0/Conv"], method=method,
                    progress=False)
    assert_engine_matches_reference_per_op(model.graph, {"input": sample["evaluation"][:4]})
    for node in model.graph.nodes:
        if node.op == "PAConv":
            assert node.params["act_lowest"][0] == 0.0 and node.params["act_steps"].ndim == 1
    assert all(np.isfinite(fit["output_sqnr_db"]) for fit in model.fits)
    # The float layers after the first binarized one are refitted by the methods that say so,
    # which never makes their output error on the calibration data worse.
    ops = [node.op for node in model.graph.nodes]
    after = [node.name for node in model.graph.nodes[ops.index("PAConv"):] if node.op in ("Conv", "Gemm")]
    assert len(after) == 7 and after[-1] == "/fc/Gemm"
    refits = model.graph.metadata["converter"]["refitted_float"]
    assert [refit["layer"] for refit in refits] == (after if METHODS[method].refit_float else [])
    for refit in refits:
        assert refit["output_sqnr_db"] >= refit["trained_output_sqnr_db"]


def test_equalized_with_strength_0_alone_is_rounding(sample, monkeypatch):
    """The equalization search adds candidates to "rounding"; with strength 0 as the only one it
    is "rounding", bit for bit; with all three each layer reports the strength it chose."""
    calibration_images = sample["calibration"][:32]
    rounding = convert(MODEL, calibration=calibration_images, weight_bases=2, act_bases=2, method="rounding",
                       progress=False)
    equalized = convert(MODEL, calibration=calibration_images, weight_bases=2, act_bases=2, method="equalized",
                        progress=False)
    assert {fit["equalization"] for fit in equalized.fits} - {0.0}, "the search never left strength 0"
    monkeypatch.setattr(METHODS["equalized"], "strengths", (0.0,))
    alone = convert(MODEL, calibration=calibration_images, weight_bases=2, act_bases=2, method="equalized",
                    progress=False)
    for mine, theirs in zip(alone.graph.nodes, rounding.graph.nodes):
        assert sorted(mine.params) == sorted(theirs.params)
        for key in mine.params:
            np.testing.assert_array_equal(mine.params[key], theirs.params[key], err_msg=f"{mine.name} {key}")


def test_unknown_method_is_refused(sample):
    with pytest.raises(ConversionError, match="unknown calibration method 'best'.*lloyd"):
        convert(MODEL, calibration=sample["calibration"][:4], method="best")


def test_equalization_search_rounds_the_best_regression_candidate(layer_data):
    """The search scores each strength by its output error after the level regression, and its
    result is the rounding of the best one: calibrate_layer(..., "rounding", best), bit for bit
    (the layer's inputs are few enough that the activation fit uses them all, no random draw)."""
    node, inputs, target = layer_data
    assert inputs.size <= MAX_ACTIVATION_SAMPLES
    strengths, rng = METHODS["equalized"].strengths, np.random.default_rng(0)
    assert strengths == (0.0, 0.5, 1.0)
    searched, searched_latent, report = METHODS["equalized"].fit_layer(LayerToFit(node, inputs, target, 2, 2, True,
                                                                                  rng))
    subset = slice(0, SEARCH_IMAGES)
    errors = [output_error(calibrate_layer(node, inputs, target, 2, 2, True, "regression", strength, rng)[0],
                           inputs[subset], target[subset]) for strength in strengths]
    assert len(set(errors)) == len(errors), errors
    best = strengths[int(np.argmin(errors))]
    assert report["equalization"] == best
    direct, direct_latent, _ = calibrate_layer(node, inputs, target, 2, 2, True, "rounding", best, rng)
    assert sorted(searched.params) == sorted(direct.params)
    for key, value in direct.params.items():
        assert np.array_equal(searched.params[key], value), key
    for key, value in direct_latent.items():
        assert np.array_equal(searched_latent[key], value), key
