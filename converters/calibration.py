"""Calibration: fit each binarized layer's staircases on calibration data and correct its output.

A binarized layer L computes y_L = conv(Qw(W), Qa(x_L)) + b. Its float original computes
f_L = conv(W, x_L^float) + b on the float network's input x_L^float. Calibration chooses Qa
(and corrects y_L) so that y_L stays close to f_L, in one of these named methods:

- "lloyd": Qa is the least-squares (Lloyd-Max) staircase of the FLOAT network's activations
  x_L^float; no output correction. Each layer is fitted alone (the baseline).
- "sequential": layers are calibrated in graph order, each on the activations x_L that the
  network computes once all earlier layers are binarized (run node by node, one pass); Qa is
  the Lloyd-Max staircase of x_L, and the output statistics are corrected per channel:
      y'[o] = s[o] * y[o] + t[o],  s = std(f[o]) / std(y[o]),  t = mean(f[o]) - s * mean(y[o])
  which is exact in PA form (s scales weight_scales, weight_offset and bias).
- "regression": "sequential", and instead of the moment correction each output channel's
  weight levels and bias are refitted by least squares of the layer's OUTPUT on the calibration
  data (`regress_weight_levels`): y[o] = sum_i L[o, i] Z[o, i] + b[o] vs f[o].
- "rounding": "regression", then which level each weight uses is chosen by the layer's output
  error too (`round_to_output`): rounds of exact coordinate descent over the weights' pieces
  alternating with the level regression. It starts from the "regression" fit, and each sweep and
  refit only lowers the output error on the calibration data (up to the small ridge of the refit).
- "equalized": "rounding" after per-input-channel equalization of the quantizer
  (`approximate_layer`): strengths 0, 0.5 and 1 are compared by the layer's output error
  E = mean((y - f)^2) after the level regression, and the rounding continues from the best one
  (about twice the work of "rounding"; strength 0 is "rounding" itself). Its choices are scored
  on the images they were fitted to.
- "selected" (the default): per layer, every combination of equalization strength, activation
  staircase width (Lloyd-Max, or its levels and thresholds times 1.15 or 1.3), weight staircase
  (least squares or symmetric) and output correction (none, matched moments, level regression at
  several ridges, rounding) is scored by its output error on calibration images
  held out from its fit (k-fold), and the best is refitted on all images (`selection.py`). The
  uncorrected plain layer is a candidate, so the choice never scores worse than it held out.
- "propagated": "selected", except that the per-layer held-out error only picks the best
  candidate of each kind of correction (none, moments, regression, rounding), and among those
  the one whose held-out layer output, carried through the float nodes after it to the input of
  the next binarized layer (the graph's outputs after the last one), is closest to the float
  network's there wins (`downstream_scorer`, on the first PROPAGATION_IMAGES calibration images,
  each image's layer output from the fit that did not see it). It costs one more pass over
  those nodes per finalist; it was compared with "selected" and not made the default
  (docs/accuracy.md).

"regression", "rounding", "equalized", "selected" and "propagated" also refit the float Conv/Gemm
layers that follow a binarized layer (by default only the classifier), in the same graph order:
their weights and bias become the least-squares fit of the float layer's output on the inputs
that the binarized network gives them (`refit_float_layer`). The first float layer reads the network's input,
which binarization does not change, and is never refitted.

Each output correction is a class in `selection.py` (`MatchedMoments`, `RegressedLevels`,
`RoundedPieces`, `Uncorrected`: a `fit(statistics, start)` on the layer's output statistics), and
every fit, error and refit works on those statistics (`least_squares.py`, the shared core); a
method is a recipe (METHODS) of which approximation and correction it uses.

Levels stay shared by the tensor's channels and the lowest level stays 0 after a ReLU, so
every result is a valid PA layer (DESIGN.md section 2).
"""
import numpy as np
from tqdm.auto import tqdm

from pabnn.engine.errors import ConversionError
from pabnn.engine.graph import Graph, Node
from pabnn.engine.ops import get_op
from pabnn.engine.session import Session

from .fitting import fit_weight_staircases, widened_staircase
from .integer import integer_node
from .least_squares import (CALIBRATION_BATCH, allowed_pieces, output_statistics, piece_anchors, pieces_of,
                            refit_error, regress_from_statistics, round_pieces, solve_refit, sum_statistics,
                            weight_pieces)
from .passes import fit_activation_staircase, is_nonnegative, layer_weight, pa_node, scale_layer_output
from .selection import (EQUALIZATION_STRENGTHS, MIN_STD, SCALE_LIMITS, MatchedMoments, RegressedLevels, RoundedPieces,
                        Start, select_layer)

# Each method: calibrate on the partly binarized network's activations (sequential) or the float
# network's; the equalization strengths tried (the one with the smallest output error is kept);
# the output correction; whether the float layers after the first binarized one are refitted.
METHODS = {
    "lloyd": {"sequential": False, "equalization": (0.0,), "correction": None, "refit_float": False},
    "sequential": {"sequential": True, "equalization": (0.0,), "correction": "moments", "refit_float": False},
    "regression": {"sequential": True, "equalization": (0.0,), "correction": "regression", "refit_float": True},
    "rounding": {"sequential": True, "equalization": (0.0,), "correction": "rounding", "refit_float": True},
    "equalized": {"sequential": True, "equalization": (0.0, 0.5, 1.0), "correction": "rounding",
                  "refit_float": True},
    "selected": {"sequential": True, "equalization": EQUALIZATION_STRENGTHS, "correction": "selected",
                 "refit_float": True},
    "propagated": {"sequential": True, "equalization": EQUALIZATION_STRENGTHS, "correction": "selected",
                   "refit_float": True, "propagate": True},
}
DEFAULT_METHOD = "selected"
MAX_ACTIVATION_SAMPLES = 500_000
# Images used to score the candidates of a layer (each is corrected on all images).
SEARCH_IMAGES = 128
# Ridge of the output regression of the weight levels, relative to the mean feature energy.
REGRESSION_RIDGE = 1e-3
# Rounds of (refit levels, sweep the weights' pieces) of the "rounding" method.
ROUNDING_ROUNDS = 4
# Ridges tried by the refit of float layers after binarized ones (relative to the mean diagonal
# of the normal matrix, towards the trained weights); the one with the smallest output error on
# held-out calibration images in REFIT_FOLDS-fold cross-validation is used.
REFIT_RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
REFIT_FOLDS = 4
# Calibration images on which "propagated" compares a layer's finalists downstream.
PROPAGATION_IMAGES = 256
# The output corrections of the methods (see converters/selection.py).
CORRECTIONS = {"moments": MatchedMoments(), "regression": RegressedLevels(REGRESSION_RIDGE),
               "rounding": RoundedPieces(REGRESSION_RIDGE, ROUNDING_ROUNDS)}


def calibrate(graph, names, feeds, weight_bases, act_bases, method=DEFAULT_METHOD, seed=0, progress=None,
              act_coding="thermometer", integer=()):
    """Binarize the Conv/Gemm nodes `names` of `graph` with the calibration `method`, and turn the
    Conv/Gemm nodes `integer` into 8-bit integer layers (converters/integer.py) on the inputs they
    see in the same pass (the partly converted network's, for the sequential methods).

    act_coding: the activation code of every binarized layer ("thermometer" or "binary": Qa on a
    uniform grid, fitted by `approximate_layer`, so every method works with either).
    graph: float Graph (BatchNorm folded); feeds: {input name: float32 array [batch, ...]}.
    progress: show a progress bar (None: only on a terminal).
    Returns (graph with PA nodes, [fit report per binarized layer], {layer: latent weights},
    [report per refitted float layer], [report per integer layer]), see `calibrate_layer` for the latent weights and
    `refit_float_layer` for the refit reports.
    """
    if method not in METHODS:
        raise ConversionError(f"unknown calibration method {method!r}; methods: {list(METHODS)}")
    recipe = METHODS[method]
    refitted = ([name for name in float_layers_after(graph, names) if name not in integer]
                if recipe["refit_float"] else [])
    layers = set(names) | set(refitted) | set(integer)
    rng = np.random.default_rng(seed)
    fits, latent, refits, integer_reports, nodes = [], {}, [], [], []
    last_use = {name: index for index, node in enumerate(graph.nodes) for name in node.inputs}
    kernels = {}  # the float nodes' kernels, made once for the "propagated" method's passes
    # The float network's tensors, and the partly binarized network's where they differ (a tensor
    # not in `binarized` equals its float value); only tensors that a later node reads are kept.
    float_values, binarized = dict(feeds), {}
    bar = tqdm(total=len(layers), desc="calibrating", unit="layer", disable=None if progress is None else not progress,
               leave=False)
    for index, node in enumerate(graph.nodes):
        float_outputs = run_node(node, [float_values[name] for name in node.inputs])
        if node.name in layers:
            tensor = node.inputs[0]
            inputs = binarized.get(tensor, float_values[tensor]) if recipe["sequential"] else float_values[tensor]
            target = float_outputs[0]
            if node.name in integer:
                node, report = integer_node(node, inputs)
                integer_reports.append(report)
            elif node.name in refitted:
                node, report = refit_float_layer(node, inputs, target)
                refits.append(dict(report, layer=node.name))
            else:
                score_outputs = None
                if recipe.get("propagate"):
                    score_outputs = downstream_scorer(
                        graph, index, names, lambda name: binarized.get(name, float_values[name]),
                        float_values.__getitem__, inputs, target, last_use, kernels)
                node, latent[node.name], fit = _calibrate_one(node, inputs, target, weight_bases, act_bases,
                                                              is_nonnegative(graph, tensor), method, rng, act_coding,
                                                              score_outputs)
                fits.append(fit)
            bar.update()
        layer_output = None
        if recipe["sequential"] and (node.name in layers or any(name in binarized for name in node.inputs)):
            outputs = run_node(node, [binarized.get(name, float_values[name]) for name in node.inputs])
            binarized.update(zip(node.outputs, outputs))
            layer_output = outputs[0]
        if node.name in layers and node.name not in refitted:
            if layer_output is None:  # not sequential: the layer on the float input it was fitted to
                layer_output = run_node(node, [float_values[node.inputs[0]]])[0]
            (fits[-1] if node.name in names else integer_reports[-1])["output_sqnr_db"] = sqnr_db(
                layer_output, float_outputs[0])
        float_values.update(zip(node.outputs, float_outputs))
        for name in set(node.inputs):
            if last_use[name] == index:
                float_values.pop(name, None)
                binarized.pop(name, None)
        nodes.append(node)
    bar.close()
    return Graph(graph.inputs, graph.outputs, nodes, graph.metadata), fits, latent, refits, integer_reports


def _calibrate_one(node, inputs, target, weight_bases, act_bases, nonnegative, method, rng, act_coding="thermometer",
                   score_outputs=None):
    """(PA node, latent weights, fit report) of one binarized layer by calibration `method`
    (score_outputs: see `select_layer`, for the "propagated" method)."""
    recipe = METHODS[method]
    strengths = recipe["equalization"]
    if recipe["correction"] == "selected":
        pa, latent, fit = _select(node, inputs, target, weight_bases, act_bases, nonnegative, rng, act_coding,
                                  score_outputs)
    elif len(strengths) > 1:
        pa, latent, fit = _search_equalization(node, inputs, target, weight_bases, act_bases, nonnegative,
                                               recipe["correction"], strengths, rng, act_coding)
    else:
        pa, latent, fit = calibrate_layer(node, inputs, target, weight_bases, act_bases, nonnegative,
                                          recipe["correction"], strengths[0], rng, act_coding)
    return pa, latent, dict(fit, layer=node.name, method=method)


def _select(node, inputs, target, weight_bases, act_bases, nonnegative, rng, act_coding="thermometer",
            score_outputs=None):
    """`select_layer` with this module's approximation; every candidate approximation draws the
    same activation sample, so the candidates of one strength share Qa (and its statistics)."""
    layer_seed = int(rng.integers(2 ** 32))

    def approximate(strength, staircase, act_scale=1.0):
        return approximate_layer(node, inputs, weight_bases, act_bases, nonnegative, strength,
                                 np.random.default_rng(layer_seed), staircase, act_coding, act_scale)

    return select_layer(inputs, target, approximate, score_outputs=score_outputs)


def downstream_scorer(graph, index, names, live, live_float, inputs, target, last_use, kernels=None,
                      images=PROPAGATION_IMAGES):
    """The `score_outputs` of `select_layer` for the layer graph.nodes[index] (one of the binarized
    layers `names`): given PA nodes [one per fold], the layer's output on the first n = min(images,
    batch) calibration images (image i from nodes[i % folds]) is carried through the float nodes
    graph.nodes[index + 1:] to the input x of the next binarized layer that depends on it (the
    graph's outputs when none does), and sum (x - x_float)^2 / sum x_float^2 is returned, x_float
    being the float network's value there.

    live(name) / live_float(name): the partly binarized / the float network's value [batch, ...]
    of a tensor computed before the layer; inputs: the layer's input and target its float output
    [batch, ...]; last_use: {tensor: index of the last node reading it}; kernels: {node name:
    kernel}, a cache shared by the layers of one calibration.
    """
    node = graph.nodes[index]
    count = min(images, len(inputs))
    known = _inputs_after(graph, index, live, count)
    following = [later.inputs[0] for later in graph.nodes[index + 1:] if later.name in names
                 and later.inputs[0] not in known]
    wanted = following[:1] or list(graph.outputs)
    kernels = {} if kernels is None else kernels
    float_known = _inputs_after(graph, index, live_float, count)
    float_known[node.outputs[0]] = target[:count]
    reference = run_forward(graph, index, float_known, wanted, last_use, kernels)
    float_known = None
    energy = max(sum(float(np.sum(np.asarray(value, dtype=np.float64) ** 2)) for value in reference.values()), 1e-300)

    def score(nodes):
        folds = len(nodes)
        parts = [(fold, run_layer(pa, inputs[fold:count:folds])) for fold, pa in enumerate(nodes) if fold < count]
        output = np.empty((count,) + parts[0][1].shape[1:], parts[0][1].dtype)
        for fold, part in parts:
            output[fold:count:folds] = part
        values = run_forward(graph, index, dict(known, **{node.outputs[0]: output}), wanted, last_use, kernels)
        return sum(float(np.sum((values[name].astype(np.float64) - reference[name]) ** 2)) for name in wanted) / energy

    return score


def _inputs_after(graph, index, live, count):
    """{tensor: live(tensor)[:count]} of the tensors that graph.nodes[index + 1:] or the graph's
    outputs read and that graph.nodes[index:] do not compute."""
    later = graph.nodes[index:]
    produced = {name for later_node in later for name in later_node.outputs}
    needed = {name for later_node in later[1:] for name in later_node.inputs} | set(graph.outputs)
    return {name: live(name)[:count] for name in needed - produced}


def run_forward(graph, index, values, wanted, last_use, kernels):
    """{tensor: value} of the tensors `wanted`, from `values` (every tensor that graph.nodes[index + 1:]
    read and do not compute) by running graph.nodes[index + 1:] (kernels cached in `kernels`) until
    all are computed; a tensor is dropped after its last reader (`last_use`)."""
    values, missing = dict(values), set(wanted) - set(values)
    for position in range(index + 1, len(graph.nodes)):
        if not missing:
            break
        node = graph.nodes[position]
        if node.name not in kernels:
            kernels[node.name] = get_op(node.op, node.name).make_kernel(node)
        values.update(zip(node.outputs, run_node(node, [values[name] for name in node.inputs], kernels[node.name])))
        missing -= set(node.outputs)
        for name in set(node.inputs):
            if last_use[name] == position and name not in wanted:
                values.pop(name)
    return {name: values[name] for name in wanted}


def float_layers_after(graph, names):
    """The float Conv/Gemm nodes of `graph` that come after the first of the nodes `names` in
    graph order and are not among them, in graph order."""
    chosen = set(names)
    positions = [i for i, node in enumerate(graph.nodes) if node.name in chosen]
    if not positions:
        return []
    return [node.name for node in graph.nodes[positions[0] + 1:]
            if node.op in ("Conv", "Gemm") and node.name not in chosen]


def refit_float_layer(node, inputs, target, ridges=REFIT_RIDGES, folds=REFIT_FOLDS):
    """Conv/Gemm `node` with the weights and bias that fit its float output `target` on `inputs`,
    and a report {"ridge", "output_sqnr_db", "trained_output_sqnr_db"} (SQNR of the refitted and
    of the trained layer on `inputs` against `target`):

        (W[o], b[o]) = argmin sum (W[o] . X + b[o] - f[o])^2 + ridge * g * |(W[o], b[o]) - (W0[o], b0[o])|^2

    over all batch and spatial positions; X: the window columns of `inputs` [batch, C, ...] (taps of
    o's group), f = target [batch, O, ...], (W0, b0) the node's trained weights and bias, g the
    mean diagonal of the normal matrix of o's group. `ridge` is the one of `ridges` with the
    smallest total error on the held-out images of `folds`-fold cross-validation (images i with
    i % folds == fold); with a single image, the largest (nothing is held out to trust the data).
    """
    folds = min(folds, len(inputs))
    parts = [output_statistics(node, inputs[fold::folds], target[fold::folds]) for fold in range(folds)]
    weight = node.params["weight"]
    prior = np.concatenate([weight.reshape(weight.shape[0], -1), node.params["bias"][:, None]], axis=1).astype(
        np.float64)
    ridge = max(ridges)
    if folds > 1:
        errors = [sum(refit_error(parts[fold], solve_refit(sum_statistics(parts[:fold] + parts[fold + 1:]),
                                                             prior, candidate))
                      for fold in range(folds))
                  for candidate in ridges]
        ridge = ridges[int(np.argmin(errors))]
    solution = solve_refit(sum_statistics(parts), prior, ridge)
    refitted = with_weight(node, solution[:, :-1].reshape(weight.shape).astype(np.float32),
                           solution[:, -1].astype(np.float32))
    report = {"ridge": ridge, "output_sqnr_db": sqnr_db(run_layer(refitted, inputs), target),
              "trained_output_sqnr_db": sqnr_db(run_layer(node, inputs), target)}
    return refitted, report


def _search_equalization(node, inputs, target, weight_bases, act_bases, nonnegative, correction, strengths, rng,
                         act_coding="thermometer"):
    """`calibrate_layer` with `correction` ("regression" or "rounding") at the equalization
    strength whose layer has the smallest output error on the first SEARCH_IMAGES images after
    the level regression. The piece sweep of "rounding" (many times the cost of the regression)
    runs once, on that strength's approximation and output statistics."""
    best = None
    for strength in strengths:
        approximation = approximate_layer(node, inputs, weight_bases, act_bases, nonnegative, strength, rng,
                                          act_coding=act_coding)
        statistics = output_statistics(approximation.pa, inputs, target)
        regressed, _, _ = correct_layer(approximation, inputs, target, "regression", statistics)
        error = output_error(regressed, inputs[:SEARCH_IMAGES], target[:SEARCH_IMAGES])
        if best is None or error < best[0]:
            best = (error, approximation, statistics)
    _, approximation, statistics = best
    return correct_layer(approximation, inputs, target, correction, statistics)


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
    """Qw and Qa of one layer before any output correction (see `approximate_layer`)."""

    def __init__(self, scaled, weight_thresholds, weight_levels, act_thresholds, act_fit, in_channels, report,
                 act_coding="thermometer"):
        self.scaled = scaled
        self.act_coding = act_coding
        self.weight_thresholds = weight_thresholds
        self.weight_levels = weight_levels
        self.act_thresholds = act_thresholds
        self.act_fit = act_fit
        self.in_channels = in_channels
        self.report = report
        self.pa = self.with_levels(weight_levels)

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
    if act_scale != 1.0:
        act_fit = widened_staircase(act_fit, act_scale, sample)
    report = {"weight_relative_error": weight_report["relative_error"],
              "weight_symmetric_channels": weight_report["symmetric_channels"],
              "act_relative_error": act_fit.relative_error_,
              "act_levels": [float(v) for v in act_fit.levels_],
              "equalization": equalization, "act_scale": act_scale, "weight_staircase": staircase,
              "act_coding": act_coding}
    return LayerApproximation(scaled, thresholds, levels, act_fit.thresholds_[:, None] / channel_scale[None, :],
                              act_fit, inputs.shape[1], report, act_coding)


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


def run_tensors(graph, feeds, tensors, progress=False, description="running"):
    """{tensor: float32 array [batch, ...]} of `tensors`, computed with the engine's kernels
    on the part of `graph` they depend on, in batches of CALIBRATION_BATCH (progress: a bar on
    stderr over the samples, labelled `description`)."""
    tensors = sorted(set(tensors))
    if not tensors:
        return {}
    session = Session(prefix_graph(graph, tensors))
    batch = next(iter(feeds.values())).shape[0]
    parts = {name: [] for name in tensors}
    bar = tqdm(total=batch, desc=description, unit="sample", disable=not progress, leave=False)
    for start in range(0, batch, CALIBRATION_BATCH):
        outputs = session.run(tensors, {k: v[start:start + CALIBRATION_BATCH] for k, v in feeds.items()})
        for name, value in zip(tensors, outputs):
            parts[name].append(value)
        bar.update(outputs[0].shape[0])
    bar.close()
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def prefix_graph(graph, tensors):
    """The sub-graph of the nodes that `tensors` depend on, with `tensors` as its outputs."""
    producers = graph.producers()
    needed, stack = set(), list(tensors)
    while stack:
        node = producers.get(stack.pop())
        if node is not None and node.name not in needed:
            needed.add(node.name)
            stack.extend(node.inputs)
    return Graph(graph.inputs, list(tensors), [node for node in graph.nodes if node.name in needed], {})


def _sample(values, rng):
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size > MAX_ACTIVATION_SAMPLES:
        values = rng.choice(values, MAX_ACTIVATION_SAMPLES, replace=False)
    return values


