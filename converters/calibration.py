"""Calibration: fit each binarized layer's staircases on calibration data and correct its output.

A binarized layer L computes y_L = conv(Qw(W), Qa(x_L)) + b. Its float original computes
f_L = conv(W, x_L^float) + b on the float network's input x_L^float. Calibration chooses Qa
(and corrects y_L) so that y_L stays close to f_L, in one of these named methods:

- "lloyd": Qa is the least-squares (Lloyd-Max) staircase of the FLOAT network's activations
  x_L^float; no output correction. Each layer is fitted alone (the baseline).
- "sequential": layers are calibrated in graph order, each on the activations x_L that the
  network computes once all earlier layers are binarized (run with pabnn.engine.Session); Qa is
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
- "equalized" (the default): "rounding" after per-input-channel equalization of the quantizer
  (`approximate_layer`): strengths 0, 0.5 and 1 are compared by the layer's output error
  E = mean((y - f)^2) after the level regression, and the rounding continues from the best one
  (about twice the work of "rounding"; strength 0 is "rounding" itself).

"regression", "rounding" and "equalized" also refit the float Conv/Gemm layers that follow a
binarized layer (by default only the classifier), in the same graph order: their weights and
bias become the least-squares fit of the float layer's output on the inputs that the binarized
network gives them (`refit_float_layer`). The first float layer reads the network's input,
which binarization does not change, and is never refitted.

Levels stay shared by the tensor's channels and the lowest level stays 0 after a ReLU, so
every result is a valid PA layer (DESIGN.md section 2).
"""
import numpy as np
from numba import prange
from tqdm.auto import tqdm

from pabnn.engine.errors import ConversionError
from pabnn.engine.graph import Graph, Node
from pabnn.engine.jit import parallel_jit
from pabnn.engine.ops import get_op
from pabnn.engine.ops.conv import conv_geometry, window_view
from pabnn.engine.ops.pa_conv import act_quantize
from pabnn.engine.session import Session

from .fitting import fit_weight_staircases
from .passes import fit_activation_staircase, is_nonnegative, layer_weight, pa_node, scale_layer_output

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
}
DEFAULT_METHOD = "equalized"
CALIBRATION_BATCH = 64
# Float64 window-column values that the output statistics of one layer hold at once (64 MB).
STATISTICS_VALUES = 8_000_000
MAX_ACTIVATION_SAMPLES = 500_000
# Images used to score the candidates of a layer (each is corrected on all images).
SEARCH_IMAGES = 128
# Bounds of the per-channel output scale: a channel that calibration never excites keeps s = 1.
MIN_STD = 1e-12
# Ridge of the output regression of the weight levels, relative to the mean feature energy.
REGRESSION_RIDGE = 1e-3
# Rounds of (refit levels, sweep the weights' pieces) of the "rounding" method.
ROUNDING_ROUNDS = 4
# Ridges tried by the refit of float layers after binarized ones (relative to the mean diagonal
# of the normal matrix, towards the trained weights); the one with the smallest output error on
# held-out calibration images in REFIT_FOLDS-fold cross-validation is used.
REFIT_RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
REFIT_FOLDS = 4
SCALE_LIMITS = (0.125, 8.0)


def calibrate(graph, names, feeds, weight_bases, act_bases, method=DEFAULT_METHOD, seed=0, progress=None):
    """Binarize the Conv/Gemm nodes `names` of `graph` with the calibration `method`.

    graph: float Graph (BatchNorm folded); feeds: {input name: float32 array [batch, ...]}.
    progress: show a progress bar (None: only on a terminal).
    Returns (graph with PA nodes, [fit report per binarized layer], {layer: latent weights},
    [report per refitted float layer]), see `calibrate_layer` for the latent weights and
    `refit_float_layer` for the refit reports.
    """
    if method not in METHODS:
        raise ConversionError(f"unknown calibration method {method!r}; methods: {list(METHODS)}")
    recipe = METHODS[method]
    nodes_by_name = {node.name: node for node in graph.nodes}
    refitted = float_layers_after(graph, names) if recipe["refit_float"] else []
    order = [node.name for node in graph.nodes if node.name in set(names) | set(refitted)]
    float_values = run_tensors(graph, feeds, _layer_tensors(nodes_by_name, order))
    rng = np.random.default_rng(seed)
    current = graph
    fits, latent, refits = [], {}, []
    for name in tqdm(order, desc="calibrating", unit="layer", disable=None if progress is None else not progress,
                     leave=False):
        node = nodes_by_name[name]
        tensor = node.inputs[0]
        inputs = run_tensors(current, feeds, [tensor])[tensor] if recipe["sequential"] else float_values[tensor]
        target = float_values[node.outputs[0]]
        if name in refitted:
            refitted_node, report = refit_float_layer(node, inputs, target)
            refits.append(dict(report, layer=name))
            current = _replace(current, refitted_node)
            continue
        nonnegative = is_nonnegative(graph, tensor)
        strengths = recipe["equalization"]
        if len(strengths) > 1:
            pa, latent[name], fit = _search_equalization(node, inputs, target, weight_bases, act_bases, nonnegative,
                                                         recipe["correction"], strengths, rng)
        else:
            pa, latent[name], fit = calibrate_layer(node, inputs, target, weight_bases, act_bases, nonnegative,
                                                    recipe["correction"], strengths[0], rng)
        fits.append(dict(fit, layer=name, method=method, output_sqnr_db=sqnr_db(run_layer(pa, inputs), target)))
        current = _replace(current, pa)
    return current, fits, latent, refits


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
    parts = [_output_statistics(node, inputs[fold::folds], target[fold::folds]) for fold in range(folds)]
    weight = node.params["weight"]
    prior = np.concatenate([weight.reshape(weight.shape[0], -1), node.params["bias"][:, None]], axis=1).astype(
        np.float64)
    ridge = max(ridges)
    if folds > 1:
        errors = [sum(_refit_error(parts[fold], _solve_refit(_sum_statistics(parts[:fold] + parts[fold + 1:]),
                                                             prior, candidate))
                      for fold in range(folds))
                  for candidate in ridges]
        ridge = ridges[int(np.argmin(errors))]
    solution = _solve_refit(_sum_statistics(parts), prior, ridge)
    refitted = with_weight(node, solution[:, :-1].reshape(weight.shape).astype(np.float32),
                           solution[:, -1].astype(np.float32))
    report = {"ridge": ridge, "output_sqnr_db": sqnr_db(run_layer(refitted, inputs), target),
              "trained_output_sqnr_db": sqnr_db(run_layer(node, inputs), target)}
    return refitted, report


def _solve_refit(statistics, prior, ridge):
    """The ridge solution of `refit_float_layer` from `_output_statistics`: [O, K+1] (weights, bias)
    per output channel, `prior` [O, K+1] the trained ones. The normal matrix [[G, s], [s^T, n]] is
    shared by a group's output channels: one solve with O/group right-hand sides per group."""
    gram, sums, moments = statistics["gram"], statistics["sums"], statistics["moments"]
    group, group_out, taps = moments.shape
    solutions = []
    for g in range(group):
        normal = np.empty((taps + 1, taps + 1))
        normal[:taps, :taps] = gram[g]
        normal[:taps, taps] = normal[taps, :taps] = sums[g]
        normal[taps, taps] = statistics["positions"]
        right = np.concatenate([moments[g], statistics["target_sums"][g][:, None]], axis=1)  # [O/g, K+1]
        strength = ridge * max(np.trace(normal) / (taps + 1), 1e-30)
        rows = slice(g * group_out, (g + 1) * group_out)
        solutions.append(np.linalg.solve(normal + strength * np.eye(taps + 1), (right + strength * prior[rows]).T).T)
    return np.concatenate(solutions)


def _refit_error(statistics, solution):
    """sum (W[o] . X + b[o] - f[o])^2 - sum f^2 over the positions of `statistics`, for the
    weights and bias `solution` [O, K+1] (the omitted sum f^2 does not depend on them)."""
    gram, sums, moments = statistics["gram"], statistics["sums"], statistics["moments"]
    group, group_out, taps = moments.shape
    weights = solution[:, :taps].reshape(group, group_out, taps)
    bias = solution[:, taps].reshape(group, group_out)
    quadratic = np.sum((weights @ gram) * weights)  # sum W G W^T, as one matrix product per group
    cross = 2 * np.einsum("go,gok,gk->", bias, weights, sums) + statistics["positions"] * np.sum(bias ** 2)
    linear = 2 * (np.sum(weights * moments) + np.sum(bias * statistics["target_sums"]))
    return float(quadratic + cross - linear)


def _sum_statistics(parts):
    """`_output_statistics` of the union of the parts' positions."""
    return {key: sum(part[key] for part in parts) for key in parts[0]}


def _search_equalization(node, inputs, target, weight_bases, act_bases, nonnegative, correction, strengths, rng):
    """`calibrate_layer` with `correction` ("regression" or "rounding") at the equalization
    strength whose layer has the smallest output error on the first SEARCH_IMAGES images after
    the level regression. The piece sweep of "rounding" (many times the cost of the regression)
    runs once, on that strength's approximation and output statistics."""
    best = None
    for strength in strengths:
        approximation = approximate_layer(node, inputs, weight_bases, act_bases, nonnegative, strength, rng)
        statistics = _output_statistics(approximation.pa, inputs, target)
        regressed, _, _ = correct_layer(approximation, inputs, target, "regression", statistics)
        error = output_error(regressed, inputs[:SEARCH_IMAGES], target[:SEARCH_IMAGES])
        if best is None or error < best[0]:
            best = (error, approximation, statistics)
    _, approximation, statistics = best
    return correct_layer(approximation, inputs, target, correction, statistics)


def calibrate_layer(node, inputs, target, weight_bases, act_bases, nonnegative, correction, equalization, rng):
    """One binarized layer: (PA node, latent weights, fit report); latent weights are
    {"weight": float32 [O, C, kh, kw] that Qw approximates, "thresholds": float64 [O, M] of Qw}.
    `approximate_layer`, then `correction` ("moments", "regression", "rounding" or None)
    adjusts its output (`correct_layer`)."""
    approximation = approximate_layer(node, inputs, weight_bases, act_bases, nonnegative, equalization, rng)
    return correct_layer(approximation, inputs, target, correction)


class LayerApproximation:
    """Qw and Qa of one layer before any output correction (see `approximate_layer`)."""

    def __init__(self, scaled, weight_thresholds, weight_levels, act_thresholds, act_fit, in_channels, report):
        self.scaled = scaled
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
                       self.act_thresholds, self.act_fit.levels_, self.in_channels, bias=bias)


def approximate_layer(node, inputs, weight_bases, act_bases, nonnegative, equalization, rng):
    """The `LayerApproximation` of Conv/Gemm `node` on its calibration `inputs` [batch, C, ...].

    With a_c = (rms(x) / rms(x_c)) ** equalization per input channel c, the layer quantizes a_c x_c
    with one shared staircase (per-channel thresholds s_j / a_c) and uses the weights W[:, c] / a_c,
    which computes the same float function; equalization 0 is the plain layer. Qw is the
    least-squares staircase per output channel of those weights, Qa the Lloyd-Max staircase of
    the scaled inputs (on a sample of them drawn with `rng`).
    """
    channel_scale = equalizing_scales(inputs, equalization)
    scaled = _scale_input_channels(node, channel_scale)
    thresholds, levels, weight_report = fit_weight_staircases(layer_weight(scaled), weight_bases)
    act_fit = fit_activation_staircase(_sample(inputs * _channel_axis(channel_scale, inputs.ndim), rng), act_bases,
                                       nonnegative)
    report = {"weight_relative_error": weight_report["relative_error"],
              "weight_symmetric_channels": weight_report["symmetric_channels"],
              "act_relative_error": act_fit.relative_error_,
              "act_levels": [float(v) for v in act_fit.levels_],
              "equalization": equalization}
    return LayerApproximation(scaled, thresholds, levels, act_fit.thresholds_[:, None] / channel_scale[None, :],
                              act_fit, inputs.shape[1], report)


def correct_layer(approximation, inputs, target, correction, statistics=None):
    """(PA node, latent weights, fit report) of `calibrate_layer` from a `LayerApproximation`;
    statistics: the `_output_statistics` of approximation.pa on (inputs, target) when already
    computed (they depend on Qa only)."""
    pa, scaled = approximation.pa, approximation.scaled
    thresholds, levels = approximation.weight_thresholds, approximation.weight_levels
    if correction == "moments":
        pa = correct_output(pa, inputs, target)
    elif correction == "regression":
        levels, bias = regress_weight_levels(scaled, pa, thresholds, levels, inputs, target, statistics=statistics)
        pa = approximation.with_levels(levels, bias)
    elif correction == "rounding":
        scaled, levels, bias = round_to_output(scaled, pa, thresholds, levels, inputs, target, statistics=statistics)
        pa = approximation.with_levels(levels, bias, scaled)
    return pa, {"weight": layer_weight(scaled), "thresholds": thresholds}, dict(approximation.report)


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
    statistics: `_output_statistics(node, inputs, target)` when already computed.
    Returns (levels [O, M+1], bias [O]) float64.
    """
    if statistics is None:
        statistics = _output_statistics(node, inputs, target)
    pieces = _weight_pieces(float_node, weight_thresholds)  # [O, C/group*kh*kw] ints in 0..M
    return _regress_from_statistics(statistics, pieces, weight_levels, node.params["bias"].astype(np.float64), ridge)


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

    statistics: `_output_statistics(node, inputs, target)` when already computed.
    -> (float_node with those latent weights, levels [O, M+1], bias [O]) float64 levels and bias.
    """
    if statistics is None:
        statistics = _output_statistics(node, inputs, target)
    weight = np.asarray(layer_weight(float_node), dtype=np.float64)
    anchors = _piece_anchors(weight, weight_thresholds)
    allowed = _pieces_of(anchors.astype(np.float32), weight_thresholds) == np.arange(anchors.shape[1])
    pieces = _weight_pieces(float_node, weight_thresholds)
    levels, bias = weight_levels, node.params["bias"].astype(np.float64)
    for _ in range(rounds):
        levels, bias = _regress_from_statistics(statistics, pieces, levels, bias, ridge)
        pieces = _sweep_pieces(statistics, pieces, levels, bias, allowed)
    levels, bias = _regress_from_statistics(statistics, pieces, levels, bias, ridge)
    flat = weight.reshape(weight.shape[0], -1)
    keep = pieces == _pieces_of(flat, weight_thresholds)
    latent = np.where(keep, flat, np.take_along_axis(anchors, pieces, axis=1)).astype(np.float32)
    return with_weight(float_node, latent.reshape(float_node.params["weight"].shape)), levels, bias


def _output_statistics(node, inputs, target):
    """What the output error of `node` on `inputs` against `target` f depends on, for any
    weights and bias: per group g, gram G[g] = X X^T [g, K, K] and sums s[g] = X 1 [g, K]; per
    output channel o of group g, moments r[g, o] = X f[o] [g, O/g, K] and target_sums sum f[o]
    [g, O/g]; the number of positions. X: the window columns [K, positions] of the group's
    K = C/group * kh * kw taps, over all batch and spatial positions (float64), of Qa(x) for a
    PAConv/PALinear node and of x for a Conv/Gemm node."""
    kernel_hw, strides, pads, dilations = _window_geometry(node, inputs.shape)
    group = node.attrs.get("group", 1) if node.op in ("Conv", "PAConv") else 1
    out_channels = node.params["bias"].shape[0]
    statistics = {"gram": 0.0, "sums": 0.0, "moments": 0.0, "target_sums": 0.0, "positions": 0}
    p = node.params
    # The window columns of a chunk hold taps x positions float64 values, twice (the view's copy
    # and its transpose): bound them so that a wide layer on large images does not take gigabytes.
    columns_per_image = inputs.shape[1] * kernel_hw[0] * kernel_hw[1] * int(np.prod(target.shape[2:]))
    chunk = int(np.clip(STATISTICS_VALUES // max(columns_per_image, 1), 1, CALIBRATION_BATCH))
    for start in range(0, inputs.shape[0], chunk):
        x = np.asarray(inputs[start:start + chunk], dtype=np.float64)
        if x.ndim == 2:
            x = x[:, :, None, None]
        padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
        if node.op in ("PAConv", "PALinear"):
            padded = act_quantize(padded, p["act_thresholds"], p["act_steps"], p["act_lowest"])
        windows = window_view(padded, kernel_hw, strides, [0, 0, 0, 0], dilations)
        batch, channels, kh, kw = windows.shape[:4]
        columns = windows.reshape(batch, group, channels // group, kh, kw, -1).transpose(1, 2, 3, 4, 0, 5).reshape(
            group, (channels // group) * kh * kw, -1)  # [group, K, positions]
        wanted = _channels_first(target[start:start + chunk]).reshape(
            group, out_channels // group, -1)  # [group, O/group, positions]
        transposed = columns.transpose(0, 2, 1)
        statistics["gram"] = statistics["gram"] + columns @ transposed
        statistics["sums"] = statistics["sums"] + columns.sum(axis=2)
        statistics["moments"] = statistics["moments"] + wanted @ transposed
        statistics["target_sums"] = statistics["target_sums"] + wanted.sum(axis=2)
        statistics["positions"] += columns.shape[2]
    return statistics


def _regress_from_statistics(statistics, pieces, prior_levels, prior_bias, ridge):
    """`regress_weight_levels` from `_output_statistics`, for any pieces [O, K] (ints in 0..M):
    the normal equations of the features Z[o, i] = sum of X[k] over the taps k of level i.
    -> (levels [O, M+1], bias [O])."""
    gram, sums, moments = statistics["gram"], statistics["sums"], statistics["moments"]
    group, group_out = moments.shape[:2]
    n_levels = prior_levels.shape[1]
    taps = gram.shape[1]
    masks = (pieces[:, :, None] == np.arange(n_levels)).astype(np.float64).reshape(
        group, group_out, taps, n_levels)  # [g, O/g, K, M+1]
    normal = np.zeros((group, group_out, n_levels + 1, n_levels + 1))
    transposed = masks.transpose(0, 1, 3, 2)  # [g, O/g, M+1, K]
    # One large product per group (m_i^T G for all channels at once), then small ones per channel.
    # Every tap is on exactly one level (sum_i m_i = 1), so the last level's product is
    # 1^T G - sum_{i<M} m_i^T G and the large product needs M of the M+1 levels.
    projected = np.empty((group, group_out, n_levels, taps))
    projected[:, :, :-1] = (np.ascontiguousarray(transposed[:, :, :-1]).reshape(group, -1, taps) @ gram).reshape(
        group, group_out, n_levels - 1, taps)
    projected[:, :, -1] = gram.sum(axis=1)[:, None, :] - projected[:, :, :-1].sum(axis=2)
    normal[..., :n_levels, :n_levels] = projected @ masks
    cross = (transposed @ sums[:, None, :, None])[..., 0]
    normal[..., :n_levels, n_levels] = cross
    normal[..., n_levels, :n_levels] = cross
    normal[..., n_levels, n_levels] = statistics["positions"]
    right = np.concatenate([(transposed @ moments[..., None])[..., 0], statistics["target_sums"][..., None]], axis=2)
    normal, right = normal.reshape(-1, n_levels + 1, n_levels + 1), right.reshape(-1, n_levels + 1)
    prior = np.concatenate([prior_levels, prior_bias[:, None]], axis=1)
    strength = ridge * np.maximum(np.einsum("oii->o", normal) / (n_levels + 1), 1e-30)
    solution = np.linalg.solve(normal + strength[:, None, None] * np.eye(n_levels + 1),
                               (right + strength[:, None] * prior)[:, :, None])[:, :, 0]
    return solution[:, :n_levels], solution[:, n_levels]


def _sweep_pieces(statistics, pieces, levels, bias, allowed):
    """One pass of exact coordinate descent over the taps: tap k of every output channel moves to
    the allowed level with the smallest output error, the other taps held. Returns new pieces [O, K]."""
    gram, sums, moments = statistics["gram"], statistics["sums"], statistics["moments"]
    group, group_out, _ = moments.shape
    pieces = pieces.copy()
    for g in range(group):
        rows = slice(g * group_out, (g + 1) * group_out)
        values = np.take_along_axis(levels[rows], pieces[rows], axis=1)  # q [O/g, K]
        # Half the gradient of E in q: G q + b s - r.
        gradient = values @ gram[g] + bias[rows, None] * sums[g][None, :] - moments[g]
        _sweep_kernel(gram[g], np.ascontiguousarray(levels[rows]), np.ascontiguousarray(allowed[rows]),
                      pieces[rows], values, gradient)
    return pieces


@parallel_jit
def _sweep_kernel(gram, levels, allowed, pieces, values, gradient):
    """The sweep of one group, in place on pieces [O, K], values [O, K] and gradient [O, K]:
    moving q[o, k] by d changes E[o] by d^2 G[k, k] + 2 d gradient[o, k]. Output channels are
    independent (each touches only its own row), so they run in parallel, each over the taps in order."""
    out_channels, taps = values.shape
    for o in prange(out_channels):
        for k in range(taps):
            best_change, best_level = 0.0, -1
            for level in range(levels.shape[1]):
                if allowed[o, level]:
                    step = levels[o, level] - values[o, k]
                    change = step * step * gram[k, k] + 2.0 * step * gradient[o, k]
                    if change < best_change:
                        best_change, best_level = change, level
            if best_level >= 0:
                step = levels[o, best_level] - values[o, k]
                pieces[o, k] = best_level
                values[o, k] += step
                for tap in range(taps):
                    gradient[o, tap] += step * gram[k, tap]


def _pieces_of(flat_weight, weight_thresholds):
    """Index of the weight level each weight uses, #{k: w >= t_k}, for weights [O, K] under
    per-channel thresholds [O, M] -> int [O, K]."""
    values = np.asarray(flat_weight, dtype=np.float64)
    return np.sum(values[:, :, None] >= weight_thresholds[:, None, :], axis=2)


def _weight_pieces(node, weight_thresholds):
    """`_pieces_of` the weights of Conv/Gemm `node` -> int [O, C/group*kh*kw]."""
    weight = layer_weight(node)
    return _pieces_of(weight.reshape(weight.shape[0], -1), weight_thresholds)


def _piece_anchors(weight, weight_thresholds):
    """[O, M+1]: a weight value inside each piece of each output channel: the midpoint of an
    inner piece, and half the channel's standard deviation below t_1 / above t_M for the outer ones."""
    flat = weight.reshape(weight.shape[0], -1)
    margin = np.maximum(flat.std(axis=1), 1e-6) / 2
    anchors = np.empty((flat.shape[0], weight_thresholds.shape[1] + 1))
    anchors[:, 1:-1] = (weight_thresholds[:, :-1] + weight_thresholds[:, 1:]) / 2
    anchors[:, 0] = weight_thresholds[:, 0] - margin
    anchors[:, -1] = weight_thresholds[:, -1] + margin
    return anchors


def _window_geometry(node, input_shape):
    """(kernel_hw, strides, pads, dilations) of PAConv/PALinear/Conv/Gemm `node` on inputs of `input_shape`."""
    if node.op in ("PALinear", "Gemm"):
        return (1, 1), [1, 1], [0, 0, 0, 0], [1, 1]
    if node.op == "Conv":
        kernel_hw = node.params["weight"].shape[2:4]
        strides, pads, dilations, _ = conv_geometry(node, input_shape, kernel_hw)
        return kernel_hw, strides, pads, dilations
    kh, kw = node.params["weight_planes"].shape[2:4]
    return (kh, kw), node.attrs["strides"], node.attrs["pads"], node.attrs["dilations"]


def _channels_first(values):
    """[batch, O, ...] -> [O, batch * ...] float64."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 2:
        return values.T
    return values.transpose(1, 0, 2, 3).reshape(values.shape[1], -1)


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
    """One node's fast kernel on `inputs` [batch, ...] in batches of CALIBRATION_BATCH."""
    kernel = get_op(node.op, node.name).make_kernel(node)
    parts = [kernel([inputs[start:start + CALIBRATION_BATCH]])[0]
             for start in range(0, inputs.shape[0], CALIBRATION_BATCH)]
    return np.concatenate(parts)


def run_tensors(graph, feeds, tensors):
    """{tensor: float32 array [batch, ...]} of `tensors`, computed with the engine's kernels
    on the part of `graph` they depend on, in batches of CALIBRATION_BATCH."""
    tensors = sorted(set(tensors))
    if not tensors:
        return {}
    session = Session(prefix_graph(graph, tensors))
    batch = next(iter(feeds.values())).shape[0]
    parts = {name: [] for name in tensors}
    for start in range(0, batch, CALIBRATION_BATCH):
        outputs = session.run(tensors, {k: v[start:start + CALIBRATION_BATCH] for k, v in feeds.items()})
        for name, value in zip(tensors, outputs):
            parts[name].append(value)
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


def _layer_tensors(nodes_by_name, order):
    return [tensor for name in order for tensor in (nodes_by_name[name].inputs[0], nodes_by_name[name].outputs[0])]


def _sample(values, rng):
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size > MAX_ACTIVATION_SAMPLES:
        values = rng.choice(values, MAX_ACTIVATION_SAMPLES, replace=False)
    return values


def _replace(graph, node):
    nodes = [node if existing.name == node.name else existing for existing in graph.nodes]
    return Graph(graph.inputs, graph.outputs, nodes, graph.metadata)
