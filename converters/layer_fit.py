"""One binarized layer's fit: its staircases (`approximate_layer` -> `LayerApproximation`) and the
correction of its output (`correct_layer`), and running a layer on calibration data.

A binarized layer computes y = conv(Qw(W), Qa(x)) + b (DESIGN.md section 2). Its approximation
fits Qw per output channel (converters/fitting.py) and Qa on a sample of the layer's calibration
inputs, after an optional per-input-channel equalization; an output correction then changes the
weight levels, the bias or which level each weight uses (the classes of converters/selection.py,
fitted on the output statistics of converters/least_squares.py). The calibration methods
(converters/methods.py) are classes built on these functions.
"""
import numpy as np

from pabnn.engine.graph import Node
from pabnn.engine.ops import get_op

from .fitting import fit_weight_staircases, widened_staircase
from .least_squares import (CALIBRATION_BATCH, allowed_pieces, output_statistics, piece_anchors, pieces_of,
                            regress_from_statistics, round_pieces, weight_pieces)
from .passes import fit_activation_staircase, layer_weight, pa_node, scale_layer_output
from .selection import (MIN_STD, ROUNDING_ROUNDS, SCALE_LIMITS, MatchedMoments, RegressedLevels, RoundedPieces,
                        Start)

MAX_ACTIVATION_SAMPLES = 500_000
# Ridge of the output regression of the weight levels, relative to the mean feature energy.
REGRESSION_RIDGE = 1e-3
# The output corrections by name (see converters/selection.py); None leaves the output as it is.
CORRECTIONS = {"moments": MatchedMoments(), "regression": RegressedLevels(REGRESSION_RIDGE),
               "rounding": RoundedPieces(REGRESSION_RIDGE, ROUNDING_ROUNDS)}


def calibrate_layer(node, inputs, target, weight_bases, act_bases, nonnegative, correction, equalization, rng,
                    act_coding="thermometer"):
    """One binarized layer: (PA node, latent weights, fit report); latent weights are
    {"weight": float32 [O, C, kh, kw] that Qw approximates, "thresholds": float64 [O, M] of Qw}.
    `approximate_layer`, then `correction` ("moments", "regression", "rounding" or None)
    adjusts its output (`correct_layer`)."""
    approximation = approximate_layer(node, inputs, weight_bases, act_bases, nonnegative, equalization, rng,
                                      act_coding=act_coding)
    return correct_layer(approximation, inputs, target, correction)


class LayerApproximation:
    """Qw and Qa of one layer before any output correction (see `approximate_layer`); act_sample:
    the activations (scaled by channel_scale) Qa was fitted to."""

    def __init__(self, scaled, weight_thresholds, weight_levels, act_fit, channel_scale, act_sample, in_channels,
                 report, act_coding="thermometer"):
        self.scaled = scaled
        self.act_coding = act_coding
        self.weight_thresholds = weight_thresholds
        self.weight_levels = weight_levels
        self.act_fit = act_fit
        self.channel_scale = channel_scale
        self.act_sample = act_sample
        self.act_thresholds = act_fit.thresholds_[:, None] / channel_scale[None, :]
        self.in_channels = in_channels
        self.report = report
        self.pa = self.with_levels(weight_levels)

    def widened(self, scale):
        """This approximation with Qa's levels and thresholds times `scale` (`widened_staircase`); Qw,
        the equalization and the activation sample are shared, not fitted again."""
        act_fit = widened_staircase(self.act_fit, scale, self.act_sample)
        report = dict(self.report, act_relative_error=act_fit.relative_error_,
                      act_levels=[float(v) for v in act_fit.levels_], act_scale=scale)
        return LayerApproximation(self.scaled, self.weight_thresholds, self.weight_levels, act_fit, self.channel_scale,
                                  self.act_sample, self.in_channels, report, self.act_coding)

    def with_levels(self, weight_levels, bias=None, scaled=None):
        """The PA node with other weight levels (and bias, latent weights)."""
        return pa_node(self.scaled if scaled is None else scaled, self.weight_thresholds, weight_levels,
                       self.act_thresholds, self.act_fit.levels_, self.in_channels, bias=bias,
                       act_coding=self.act_coding)

    def latent(self, scaled=None):
        """The latent weights {"weight": float32 [O, C, kh, kw] that Qw approximates, "thresholds"}."""
        return {"weight": layer_weight(self.scaled if scaled is None else scaled), "thresholds": self.weight_thresholds}

    def start(self):
        """The `selection.Start` of the corrections: Qw's pieces and levels and the trained bias."""
        weight = np.asarray(layer_weight(self.scaled), dtype=np.float64)
        return Start(weight_pieces(self.scaled, self.weight_thresholds), self.weight_levels,
                     self.pa.params["bias"].astype(np.float64),
                     allowed_pieces(weight.reshape(weight.shape[0], -1), self.weight_thresholds))

    def finish(self, pieces, levels, bias):
        """(PA node, latent weights) with these pieces [O, K], levels [O, M+1] and bias [O]."""
        scaled = with_pieces(self.scaled, self.weight_thresholds, pieces)
        return self.with_levels(levels, bias, scaled), self.latent(scaled)


def approximate_layer(node, inputs, weight_bases, act_bases, nonnegative, equalization, rng,
                      staircase="least_squares", act_coding="thermometer", act_scale=1.0):
    """The `LayerApproximation` of Conv/Gemm `node` on its calibration `inputs` [batch, C, ...].

    With a_c = (rms(x) / rms(x_c)) ** equalization per input channel c, the layer quantizes a_c x_c
    with one shared staircase (per-channel thresholds s_j / a_c) and uses the weights W[:, c] / a_c,
    which computes the same float function; equalization 0 is the plain layer. Qw is the
    least-squares staircase per output channel of those weights (`fit_weight_staircases` with
    `staircase`), Qa the Lloyd-Max staircase of the scaled inputs (on a sample of them drawn with `rng`),
    on a uniform grid for act_coding "binary" (`fit_activation_staircase`), its levels and
    thresholds then multiplied by `act_scale` (`widened_staircase`; 1: Lloyd-Max itself).
    """
    channel_scale = equalizing_scales(inputs, equalization)
    scaled = _scale_input_channels(node, channel_scale)
    thresholds, levels, weight_report = fit_weight_staircases(layer_weight(scaled), weight_bases, staircase)
    sample = _sample(inputs * _channel_axis(channel_scale, inputs.ndim), rng)
    act_fit = fit_activation_staircase(sample, act_bases, nonnegative, act_coding)
    report = {"weight_relative_error": weight_report["relative_error"],
              "weight_symmetric_channels": weight_report["symmetric_channels"],
              "act_relative_error": act_fit.relative_error_,
              "act_levels": [float(v) for v in act_fit.levels_],
              "equalization": equalization, "act_scale": 1.0, "weight_staircase": staircase,
              "act_coding": act_coding}
    approximation = LayerApproximation(scaled, thresholds, levels, act_fit, channel_scale, sample, inputs.shape[1],
                                       report, act_coding)
    return approximation if act_scale == 1.0 else approximation.widened(act_scale)


def correct_layer(approximation, inputs, target, correction, statistics=None):
    """(PA node, latent weights, fit report) of `calibrate_layer` from a `LayerApproximation`, its
    output corrected by CORRECTIONS[correction] (None: uncorrected); statistics: the
    `output_statistics` of approximation.pa on (inputs, target) when already computed (they
    depend on Qa only)."""
    if correction is None:
        pa, latent = approximation.pa, approximation.latent()
    else:
        if statistics is None:
            statistics = output_statistics(approximation.pa, inputs, target)
        pa, latent = approximation.finish(*CORRECTIONS[correction].fit(statistics, approximation.start()))
    return pa, latent, dict(approximation.report)


def equalizing_scales(inputs, equalization):
    """a_c = (rms(x) / rms(x_c)) ** equalization, float64 [C] (1 for a channel that is all 0)."""
    values = np.asarray(inputs, dtype=np.float64)
    axes = (0,) + tuple(range(2, values.ndim))
    channel_rms = np.sqrt(np.mean(values ** 2, axis=axes))
    overall = np.sqrt(np.mean(channel_rms ** 2))
    ratio = np.where(channel_rms > 0, overall / np.maximum(channel_rms, 1e-300), 1.0)
    return ratio ** equalization


def _scale_input_channels(node, channel_scale):
    """Conv/Gemm `node` with W[:, c] / a_c (so it computes the same on inputs a_c x_c); in a
    grouped Conv, W[o, c] multiplies input channel g * C/group + c of o's group g."""
    weight = node.params["weight"].astype(np.float64)
    group = node.attrs.get("group", 1) if node.op == "Conv" else 1
    per_output = np.repeat(channel_scale.reshape(group, -1), weight.shape[0] // group, axis=0)  # [O, C/group]
    divisor = per_output.reshape(per_output.shape + (1,) * (weight.ndim - 2))
    return with_weight(node, (weight / divisor).astype(np.float32))


def with_weight(node, weight, bias=None):
    """Conv/Gemm `node` with another weight array (same shape, float32), and bias when given."""
    params = dict(node.params, weight=weight)
    if bias is not None:
        params["bias"] = bias
    return Node(node.op, node.name, list(node.inputs), list(node.outputs), dict(node.attrs), params)


def _channel_axis(values, ndim):
    return values.reshape((1, -1) + (1,) * (ndim - 2))


def regress_weight_levels(float_node, node, weight_thresholds, weight_levels, inputs, target,
                          ridge=REGRESSION_RIDGE, statistics=None):
    """Per output channel o, the weight levels L[o] and bias b[o] that minimise the layer's output
    error, with the pieces of Qw (which weight falls on which level) and Qa kept:

        y[o] = sum_i L[o, i] Z[o, i] + b[o],  Z[o, i] = conv(1[piece(W[o]) == i], Qa(x))
        (L[o], b[o]) = argmin sum (y[o] - f[o])^2 + ridge * g * |(L[o], b[o]) - (L0[o], b0[o])|^2

    over all batch and spatial positions; g is the mean diagonal of the normal matrix, (L0, b0)
    the levels of Qw and the bias of `node`, the PA node replacing Conv/Gemm `float_node`;
    f = `target`, the float layer's output. inputs: the layer's input [batch, C, ...].
    statistics: `output_statistics(node, inputs, target)` when already computed.
    Returns (levels [O, M+1], bias [O]) float64.
    """
    if statistics is None:
        statistics = output_statistics(node, inputs, target)
    pieces = weight_pieces(float_node, weight_thresholds)  # [O, C/group*kh*kw] ints in 0..M
    return regress_from_statistics(statistics, pieces, weight_levels, node.params["bias"].astype(np.float64), ridge)


def round_to_output(float_node, node, weight_thresholds, weight_levels, inputs, target, rounds=ROUNDING_ROUNDS,
                    ridge=REGRESSION_RIDGE, statistics=None):
    """Which level each weight uses (its piece) and the levels themselves, chosen to minimise the
    layer's output error on the calibration data, Qa kept:

        E[o] = sum over positions of (sum_k q[o, k] X[k] + b[o] - f[o])^2,  q[o, k] = L[o, piece[o, k]]

    X: the Qa(x) window columns (taps k of o's group), f: `target`. Starting from the pieces of
    Qw, each round refits levels and bias by least squares (as `regress_weight_levels`), then
    sweeps the taps once, moving each weight to the level that lowers E[o] most (exact coordinate
    descent on the normal equations G = X X^T, so one pass over the data suffices).
    The weights of `float_node` whose piece changed are moved inside their new piece (so the
    planes sign(W - t_k) of the returned node encode the chosen pieces).

    statistics: `output_statistics(node, inputs, target)` when already computed.
    -> (float_node with those latent weights, levels [O, M+1], bias [O]) float64 levels and bias.
    """
    if statistics is None:
        statistics = output_statistics(node, inputs, target)
    weight = np.asarray(layer_weight(float_node), dtype=np.float64)
    pieces, levels, bias = round_pieces(statistics, weight_pieces(float_node, weight_thresholds), weight_levels,
                                        node.params["bias"].astype(np.float64),
                                        allowed_pieces(weight, weight_thresholds), rounds, ridge)
    return with_pieces(float_node, weight_thresholds, pieces), levels, bias


def with_pieces(float_node, weight_thresholds, pieces):
    """Conv/Gemm `float_node` with each weight whose piece of Qw is not `pieces` [O, K] moved inside
    that piece (to its `piece_anchors` value), so the planes sign(W - t_k) encode `pieces`."""
    weight = np.asarray(layer_weight(float_node), dtype=np.float64)
    flat = weight.reshape(weight.shape[0], -1)
    keep = pieces == pieces_of(flat, weight_thresholds)
    latent = np.where(keep, flat, np.take_along_axis(piece_anchors(weight, weight_thresholds), pieces, axis=1))
    return with_weight(float_node, latent.astype(np.float32).reshape(float_node.params["weight"].shape))


def correct_output(node, inputs, target):
    """`node` with its per-channel output moments matched to `target`'s on `inputs`:
    y' = s y + t with s = std(f) / std(y) (limited to SCALE_LIMITS; 1 for a constant channel),
    t = mean(f) - s mean(y), statistics over the batch and spatial axes of channel axis 1.
    """
    output = run_layer(node, inputs).astype(np.float64)
    target = np.asarray(target, dtype=np.float64)
    axes = (0,) + tuple(range(2, output.ndim))
    mean_y, std_y = output.mean(axis=axes), output.std(axis=axes)
    mean_f, std_f = target.mean(axis=axes), target.std(axis=axes)
    scale = np.where(std_y > MIN_STD, std_f / np.maximum(std_y, MIN_STD), 1.0)
    scale = np.clip(scale, *SCALE_LIMITS)
    return scale_layer_output(node, scale, mean_f - scale * mean_y)


def output_error(node, inputs, target):
    """mean((y - f)^2) of PA `node` on `inputs` against the float layer's output `target`."""
    return float(np.mean((run_layer(node, inputs).astype(np.float64) - target) ** 2))


def sqnr_db(output, target):
    """10 log10(sum f^2 / sum (y - f)^2), the signal-to-quantization-noise ratio in dB
    (inf when y == f)."""
    target = np.asarray(target, dtype=np.float64)
    noise = float(np.sum((np.asarray(output, dtype=np.float64) - target) ** 2))
    signal = float(np.sum(target ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(max(signal, 1e-300) / noise)


def run_layer(node, inputs):
    """One single-input node's fast kernel on `inputs` [batch, ...] -> its output."""
    return run_node(node, [inputs])[0]


def run_node(node, inputs, kernel=None):
    """One node's fast kernel on its `inputs` (arrays [batch, ...]) in batches of
    CALIBRATION_BATCH -> its outputs (kernel: the node's, when already made)."""
    kernel = get_op(node.op, node.name).make_kernel(node) if kernel is None else kernel
    if not inputs:
        return kernel([])
    parts = [kernel([value[start:start + CALIBRATION_BATCH] for value in inputs])
             for start in range(0, inputs[0].shape[0], CALIBRATION_BATCH)]
    return [np.concatenate([part[index] for part in parts]) for index in range(len(node.outputs))]



def _sample(values, rng):
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size > MAX_ACTIVATION_SAMPLES:
        values = rng.choice(values, MAX_ACTIVATION_SAMPLES, replace=False)
    return values


