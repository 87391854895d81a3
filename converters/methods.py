"""The calibration methods: how one binarized layer is fitted, one class per method.

`calibrate` (converters/calibration.py) walks the graph in order and hands each binarized layer to
the method's `fit_layer` as a `LayerToFit`: the float Conv/Gemm node, its calibration inputs and
the float network's output of that layer. A method says on which inputs it calibrates
(`sequential`: the partly binarized network's; otherwise the float network's), whether the float
layers after the first binarized one are refitted (`refit_float`), and whether it scores a layer's
finalists further down the network (`propagates`). Every method fits staircases with
`approximate_layer` and corrects the output with the classes of converters/selection.py over the
least-squares statistics of converters/least_squares.py.

The methods, from the simplest:

- "lloyd" (`Lloyd`): Qa the Lloyd-Max staircase of the float network's activations; no correction.
- "sequential" (`Sequential`): on the partly binarized network's activations, per-channel output
  moments matched to the float layer's.
- "regression" (`Regression`): weight levels and bias refitted to the float output by least squares.
- "rounding" (`Rounding`): the regression alternated with choosing which level each weight uses.
- "equalized" (`Equalized`): "rounding" at the best input-channel equalization strength.
- "selected" (`Selected`, the default): every combination of those choices scored on calibration
  images held out from its fit (converters/selection.py).
- "propagated" (`Propagated`): "selected", with the finalists compared further down the network.
"""
import numpy as np

from .layer_fit import approximate_layer, correct_layer, output_error
from .least_squares import output_statistics
from .selection import select_layer

# Images on which "equalized" compares its equalization strengths (each is corrected on all images).
SEARCH_IMAGES = 128


class LayerToFit:
    """One binarized layer and what its fit sees: the float Conv/Gemm `node`, its calibration
    `inputs` [batch, C, ...] and the float network's output of the layer `target` [batch, O, ...],
    the PA configuration (M = weight_bases, N = act_bases, act_coding), whether the input is
    nonnegative (the lowest activation level is then 0), and the random generator of the
    activation samples."""

    def __init__(self, node, inputs, target, weight_bases, act_bases, nonnegative, rng, act_coding="thermometer"):
        self.node, self.inputs, self.target = node, inputs, target
        self.weight_bases, self.act_bases, self.act_coding = weight_bases, act_bases, act_coding
        self.nonnegative, self.rng = nonnegative, rng

    def approximate(self, equalization, staircase="least_squares", act_scale=1.0, rng=None):
        """`approximate_layer` of this layer (rng: this layer's generator unless given)."""
        return approximate_layer(self.node, self.inputs, self.weight_bases, self.act_bases, self.nonnegative,
                                 equalization, self.rng if rng is None else rng, staircase, self.act_coding, act_scale)


class CalibrationMethod:
    """A calibration method; `fit_layer` returns (PA node, latent weights, fit report) of one
    `LayerToFit`. Latent weights: {"weight": float32 [O, C, kh, kw] that Qw approximates,
    "thresholds": float64 [O, M] of Qw}."""
    name = None
    sequential = True  # fit on the partly binarized network's activations, not the float network's
    refit_float = True  # refit the float Conv/Gemm layers after the first binarized one
    propagates = False  # fit_layer takes a downstream scorer (calibration.downstream_scorer)

    def fit_layer(self, layer, score_outputs=None):
        raise NotImplementedError


class Lloyd(CalibrationMethod):
    """Qa is the least-squares (Lloyd-Max) staircase of the FLOAT network's activations, Qw the
    least-squares staircase of the weights; the output is not corrected. Each layer is fitted
    alone (the baseline)."""
    name, sequential, refit_float = "lloyd", False, False
    correction = None  # a name of layer_fit.CORRECTIONS

    def fit_layer(self, layer, score_outputs=None):
        return correct_layer(layer.approximate(0.0), layer.inputs, layer.target, self.correction)


class Sequential(Lloyd):
    """Layers are calibrated in graph order, each on the activations x that the network computes once
    all earlier layers are binarized; Qa is the Lloyd-Max staircase of x, and the output
    statistics are corrected per channel:
        y'[o] = s[o] * y[o] + t[o],  s = std(f[o]) / std(y[o]),  t = mean(f[o]) - s * mean(y[o])
    which is exact in PA form (s scales the weight levels and the bias)."""
    name, sequential, refit_float, correction = "sequential", True, False, "moments"


class Regression(Lloyd):
    """"sequential", and instead of the moment match each output channel's weight levels and bias
    are the least-squares fit of the layer's OUTPUT on the calibration data (`regress_weight_levels`):
    y[o] = sum_i L[o, i] Z[o, i] + b[o] vs f[o]. The float layers after the first binarized one are
    refitted (calibration.refit_float_layer)."""
    name, sequential, refit_float, correction = "regression", True, True, "regression"


class Rounding(Lloyd):
    """"regression", then which level each weight uses is chosen by the layer's output error too
    (`round_to_output`): rounds of exact coordinate descent over the weights' pieces alternating
    with the level regression; each sweep and refit only lowers the output error on the
    calibration data (up to the small ridge of the refit)."""
    name, sequential, refit_float, correction = "rounding", True, True, "rounding"


class Equalized(CalibrationMethod):
    """"rounding" after per-input-channel equalization of the quantizer (`approximate_layer`): the
    `strengths` are compared by the layer's output error mean((y - f)^2) on the first SEARCH_IMAGES
    images after the level regression, and the rounding continues from the best one (strength 0 is
    "rounding" itself). Its choices are scored on the images they were fitted to."""
    name = "equalized"
    strengths = (0.0, 0.5, 1.0)
    correction = "rounding"

    def fit_layer(self, layer, score_outputs=None):
        # The piece sweep (many times the cost of the regression) runs once, on the best strength's
        # approximation and output statistics.
        best = None
        for strength in self.strengths:
            approximation = layer.approximate(strength)
            statistics = output_statistics(approximation.pa, layer.inputs, layer.target)
            regressed, _, _ = correct_layer(approximation, layer.inputs, layer.target, "regression", statistics)
            error = output_error(regressed, layer.inputs[:SEARCH_IMAGES], layer.target[:SEARCH_IMAGES])
            if best is None or error < best[0]:
                best = (error, approximation, statistics)
        _, approximation, statistics = best
        return correct_layer(approximation, layer.inputs, layer.target, self.correction, statistics)


class Selected(CalibrationMethod):
    """Per layer, every combination of equalization strength, activation staircase width (Lloyd-Max,
    or its levels and thresholds times 1.15 or 1.3), weight staircase (least squares or symmetric)
    and output correction (none, matched moments, level regression at several ridges, rounding) is
    scored by its output error on calibration images held out from its fit (k-fold), and the best
    is refitted on all images (`selection.select_layer`). The uncorrected plain layer is a
    candidate, so the choice never scores worse than it held out."""
    name = "selected"

    def fit_layer(self, layer, score_outputs=None):
        # Every candidate approximation draws the same activation sample, so the candidates of one
        # strength share Qa (and its statistics); the widths of one (strength, staircase) widen its
        # Lloyd-Max fit instead of fitting Qw and Qa again.
        layer_seed = int(layer.rng.integers(2 ** 32))
        plain = {}  # (strength, staircase) -> its approximation with the Lloyd-Max Qa

        def approximate(strength, staircase, act_scale=1.0):
            if (strength, staircase) not in plain:
                plain[strength, staircase] = layer.approximate(strength, staircase, 1.0,
                                                               np.random.default_rng(layer_seed))
            base = plain[strength, staircase]
            return base if act_scale == 1.0 else base.widened(act_scale)

        return select_layer(layer.inputs, layer.target, approximate, score_outputs=score_outputs)


class Propagated(Selected):
    """"selected", except that the per-layer held-out error only picks the best candidate of each
    kind of correction (none, moments, regression, rounding), and among those the one whose
    held-out layer output, carried through the float nodes after it to the input of the next
    binarized layer (the graph's outputs after the last one), is closest to the float network's
    there wins (calibration.downstream_scorer). One more pass over those nodes per finalist; it was
    compared with "selected" and not made the default (docs/accuracy.md)."""
    name, propagates = "propagated", True


METHODS = {method.name: method for method in
           (Lloyd(), Sequential(), Regression(), Rounding(), Equalized(), Selected(), Propagated())}
DEFAULT_METHOD = "selected"
