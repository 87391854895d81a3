"""The least-squares core of calibration: what a linear layer's output error depends on.

A Conv/Gemm (or PAConv/PALinear) layer computes y[o] = sum_k q[o, k] X[k] + b[o] over its window
columns X (taps k of o's group; Qa(x) for a PA layer). Its squared error against a target f over
any set of positions is a quadratic form of the `output_statistics` of those positions (gram
matrix, sums, moments with f, target sums and squares), so every fit calibration makes (refit of
float weights, regression of weight levels, the piece sweep, moment matching) and every error it
compares is computed from statistics, and statistics of disjoint sets of images add up (which is
how candidates are scored on held-out images).

Where a layer has fewer positions than taps (a wide layer on few calibration images: ResNet-18's
512-channel layers, a fully connected layer), the statistics keep the window columns X themselves
instead of the gram matrix X X^T: they are smaller, and the level equations of a candidate's
pieces cost O M K P from them instead of O M K^2. The fits that need every pair of taps (the piece
sweep) form the gram matrix once (`with_gram`).
"""
import numpy as np
from numba import prange

from pabnn.engine.jit import parallel_jit
from pabnn.engine.ops.conv import conv_geometry, window_view
from pabnn.engine.ops.pa_conv import act_quantize

from .passes import layer_weight

CALIBRATION_BATCH = 64
# Float64 window-column values that the output statistics of one layer hold at once (64 MB).
STATISTICS_VALUES = 8_000_000

def solve_refit(statistics, prior, ridge):
    """The ridge solution of `refit_float_layer` from `output_statistics`: [O, K+1] (weights, bias)
    per output channel, `prior` [O, K+1] the trained ones. The normal matrix [[G, s], [s^T, n]] is
    shared by a group's output channels: one solve with O/group right-hand sides per group."""
    gram, sums, moments = gram_of(statistics), statistics["sums"], statistics["moments"]
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


def refit_error(statistics, solution):
    """sum (W[o] . X + b[o] - f[o])^2 - sum f^2 over the positions of `statistics`, for the
    weights and bias `solution` [O, K+1] (the omitted sum f^2 does not depend on them)."""
    gram, sums, moments = gram_of(statistics), statistics["sums"], statistics["moments"]
    group, group_out, taps = moments.shape
    weights = solution[:, :taps].reshape(group, group_out, taps)
    bias = solution[:, taps].reshape(group, group_out)
    quadratic = np.sum((weights @ gram) * weights)  # sum W G W^T, as one matrix product per group
    cross = 2 * np.einsum("go,gok,gk->", bias, weights, sums) + statistics["positions"] * np.sum(bias ** 2)
    linear = 2 * (np.sum(weights * moments) + np.sum(bias * statistics["target_sums"]))
    return float(quadratic + cross - linear)


def sum_statistics(parts):
    """`output_statistics` of the union of the parts' positions (window columns side by side when
    every part keeps them, else gram matrices summed)."""
    if any("columns" in part for part in parts) and not all("columns" in part for part in parts):
        parts = [with_gram(part) for part in parts]
    return {key: np.concatenate([part[key] for part in parts], axis=2) if key == "columns"
            else sum(part[key] for part in parts) for key in parts[0]}


def gram_of(statistics):
    """The gram matrices G[g] = X X^T [g, K, K] of `statistics`."""
    if "gram" in statistics:
        return statistics["gram"]
    columns = statistics["columns"]
    return columns @ columns.transpose(0, 2, 1)


def with_gram(statistics):
    """`statistics` holding the gram matrices instead of the window columns (the same statistics)."""
    if "gram" in statistics:
        return statistics
    return dict({key: value for key, value in statistics.items() if key != "columns"}, gram=gram_of(statistics))


def output_statistics(node, inputs, target, keep_columns=None):
    """What the output error of `node` on `inputs` against `target` f depends on, for any
    weights and bias: per group g, gram G[g] = X X^T [g, K, K] (or, with `keep_columns`, the
    columns X themselves [g, K, positions]) and sums s[g] = X 1 [g, K]; per output channel o of
    group g, moments r[g, o] = X f[o] [g, O/g, K], target_sums sum f[o] and target_squares
    sum f[o]^2 [g, O/g]; the number of positions. X: the window columns [K, positions] of the group's
    K = C/group * kh * kw taps, over all batch and spatial positions (float64), of Qa(x) for a
    PAConv/PALinear node and of x for a Conv/Gemm node. keep_columns: None keeps X when there are
    fewer positions than taps."""
    kernel_hw, strides, pads, dilations = window_geometry(node, inputs.shape)
    group = node.attrs.get("group", 1) if node.op in ("Conv", "PAConv") else 1
    out_channels = node.params["bias"].shape[0]
    if keep_columns is None:
        taps = inputs.shape[1] // group * kernel_hw[0] * kernel_hw[1]
        keep_columns = inputs.shape[0] * int(np.prod(target.shape[2:])) < taps
    statistics = {"sums": 0.0, "moments": 0.0, "target_sums": 0.0, "target_squares": 0.0, "positions": 0}
    kept = []  # the chunks' window columns, with keep_columns
    gram = 0.0
    p = node.params
    # The window columns of a chunk hold taps x positions float64 values: bound them so that a wide
    # layer on large images does not take gigabytes.
    columns_per_image = inputs.shape[1] * kernel_hw[0] * kernel_hw[1] * int(np.prod(target.shape[2:]))
    chunk = int(np.clip(STATISTICS_VALUES // max(columns_per_image, 1), 1, CALIBRATION_BATCH))
    for start in range(0, inputs.shape[0], chunk):
        x = np.asarray(inputs[start:start + chunk], dtype=np.float64)
        if x.ndim == 2:
            x = x[:, :, None, None]
        padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
        if node.op in ("PAConv", "PALinear"):
            padded = act_quantize(padded, p["act_thresholds"], p["act_steps"], p["act_lowest"],
                                  node.attrs.get("act_coding", "thermometer"))
        windows = window_view(padded, kernel_hw, strides, [0, 0, 0, 0], dilations)
        channels, kh, kw = windows.shape[1:4]
        # One copy of the strided view, in the order [C, kh, kw, batch, out_h, out_w].
        columns = np.ascontiguousarray(windows.transpose(1, 2, 3, 0, 4, 5)).reshape(
            group, (channels // group) * kh * kw, -1)  # [group, K, positions]
        wanted = channels_first(target[start:start + chunk]).reshape(
            group, out_channels // group, -1)  # [group, O/group, positions]
        transposed = columns.transpose(0, 2, 1)
        if keep_columns:
            kept.append(columns)
        else:
            gram = gram + columns @ transposed
        statistics["sums"] = statistics["sums"] + columns.sum(axis=2)
        statistics["moments"] = statistics["moments"] + wanted @ transposed
        statistics["target_sums"] = statistics["target_sums"] + wanted.sum(axis=2)
        statistics["target_squares"] = statistics["target_squares"] + (wanted ** 2).sum(axis=2)
        statistics["positions"] += columns.shape[2]
    if keep_columns:
        statistics["columns"] = kept[0] if len(kept) == 1 else np.concatenate(kept, axis=2)
    else:
        statistics["gram"] = gram
    return statistics


def regress_from_statistics(statistics, pieces, prior_levels, prior_bias, ridge, equations=None):
    """`regress_weight_levels` from `output_statistics`, for any pieces [O, K] (ints in 0..M):
    the ridge solution of `level_equations`. equations: `level_equations(statistics, pieces,
    M + 1)` when already computed (they do not depend on the ridge or the priors).
    -> (levels [O, M+1], bias [O])."""
    n_levels = prior_levels.shape[1]
    normal, right = level_equations(statistics, pieces, n_levels) if equations is None else equations
    prior = np.concatenate([prior_levels, prior_bias[:, None]], axis=1)
    strength = ridge * np.maximum(np.einsum("oii->o", normal) / (n_levels + 1), 1e-30)
    solution = np.linalg.solve(normal + strength[:, None, None] * np.eye(n_levels + 1),
                               (right + strength[:, None] * prior)[:, :, None])[:, :, 0]
    return solution[:, :n_levels], solution[:, n_levels]


def level_equations(statistics, pieces, n_levels):
    """The normal equations of the features Z[o, i] = sum of X[k] over the taps k of level i (and
    a constant for the bias), per output channel: (normal [O, M+2, M+2], right [O, M+2])."""
    sums, moments = statistics["sums"], statistics["moments"]
    group, group_out, taps = moments.shape
    masks = (pieces[:, :, None] == np.arange(n_levels)).astype(np.float64).reshape(
        group, group_out, taps, n_levels)  # [g, O/g, K, M+1]
    normal = np.zeros((group, group_out, n_levels + 1, n_levels + 1))
    transposed = masks.transpose(0, 1, 3, 2)  # [g, O/g, M+1, K]
    if "columns" in statistics:  # Z_i . Z_j of the level features Z_i = m_i^T X
        features = _level_sums(transposed, statistics["columns"])
        normal[..., :n_levels, :n_levels] = features @ features.transpose(0, 1, 3, 2)
    else:  # m_i^T G m_j
        normal[..., :n_levels, :n_levels] = _level_sums(transposed, statistics["gram"]) @ masks
    cross = (transposed @ sums[:, None, :, None])[..., 0]
    normal[..., :n_levels, n_levels] = cross
    normal[..., n_levels, :n_levels] = cross
    normal[..., n_levels, n_levels] = statistics["positions"]
    right = np.concatenate([(transposed @ moments[..., None])[..., 0], statistics["target_sums"][..., None]], axis=2)
    return normal.reshape(-1, n_levels + 1, n_levels + 1), right.reshape(-1, n_levels + 1)


def _level_sums(transposed, matrix):
    """m_i^T A [g, O/g, M+1, n] for the level masks m (transposed: [g, O/g, M+1, K]) and a matrix A
    [g, K, n] (the gram matrices G, or the window columns X)."""
    group, group_out, n_levels, taps = transposed.shape
    # One large product per group (m_i^T A for all channels at once). Every tap is on exactly one
    # level (sum_i m_i = 1), so the last level's product is 1^T A - sum_{i<M} m_i^T A and the large
    # product needs M of the M+1 levels.
    sums = np.empty((group, group_out, n_levels, matrix.shape[2]))
    sums[:, :, :-1] = (np.ascontiguousarray(transposed[:, :, :-1]).reshape(group, -1, taps) @ matrix).reshape(
        group, group_out, n_levels - 1, matrix.shape[2])
    sums[:, :, -1] = matrix.sum(axis=1)[:, None, :] - sums[:, :, :-1].sum(axis=2)
    return sums


def equations_error(equations, levels, bias, target_squares):
    """`squared_error` of the weights levels[o, pieces[o, k]] and bias from the `level_equations`
    (normal, right) of those pieces on some statistics, and those statistics' target_squares [g, O/g]:
    v N v - 2 v . r + sum f^2 per output channel, v = (levels, bias): float64 [O]. The pieces'
    projection of the gram matrix is in N, so this costs O (M+2)^2 instead of O K^2."""
    normal, right = equations
    values = np.concatenate([levels, bias[:, None]], axis=1)  # [O, M+2]
    quadratic = np.einsum("oi,oij,oj->o", values, normal, values)
    return quadratic - 2 * np.einsum("oi,oi->o", values, right) + target_squares.reshape(-1)


def sweep_pieces(statistics, pieces, levels, bias, allowed):
    """One pass of exact coordinate descent over the taps: tap k of every output channel moves to
    the allowed level with the smallest output error, the other taps held. Returns new pieces [O, K]."""
    gram, sums, moments = gram_of(statistics), statistics["sums"], statistics["moments"]
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


def pieces_of(flat_weight, weight_thresholds):
    """Index of the weight level each weight uses, #{k: w >= t_k}, for weights [O, K] under
    per-channel thresholds [O, M] -> int [O, K]."""
    values = np.asarray(flat_weight, dtype=np.float64)
    return np.sum(values[:, :, None] >= weight_thresholds[:, None, :], axis=2)


def weight_pieces(node, weight_thresholds):
    """`pieces_of` the weights of Conv/Gemm `node` -> int [O, C/group*kh*kw]."""
    weight = layer_weight(node)
    return pieces_of(weight.reshape(weight.shape[0], -1), weight_thresholds)


def piece_anchors(weight, weight_thresholds):
    """[O, M+1]: a weight value inside each piece of each output channel: the midpoint of an
    inner piece, and half the channel's standard deviation below t_1 / above t_M for the outer ones."""
    flat = weight.reshape(weight.shape[0], -1)
    margin = np.maximum(flat.std(axis=1), 1e-6) / 2
    anchors = np.empty((flat.shape[0], weight_thresholds.shape[1] + 1))
    anchors[:, 1:-1] = (weight_thresholds[:, :-1] + weight_thresholds[:, 1:]) / 2
    anchors[:, 0] = weight_thresholds[:, 0] - margin
    anchors[:, -1] = weight_thresholds[:, -1] + margin
    return anchors


def window_geometry(node, input_shape):
    """(kernel_hw, strides, pads, dilations) of PAConv/PALinear/Conv/Gemm `node` on inputs of `input_shape`."""
    if node.op in ("PALinear", "Gemm"):
        return (1, 1), [1, 1], [0, 0, 0, 0], [1, 1]
    if node.op == "Conv":
        kernel_hw = node.params["weight"].shape[2:4]
        strides, pads, dilations, _ = conv_geometry(node, input_shape, kernel_hw)
        return kernel_hw, strides, pads, dilations
    kh, kw = node.params["weight_planes"].shape[2:4]
    return (kh, kw), node.attrs["strides"], node.attrs["pads"], node.attrs["dilations"]


def channels_first(values):
    """[batch, O, ...] -> [O, batch * ...] float64."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 2:
        return values.T
    return values.transpose(1, 0, 2, 3).reshape(values.shape[1], -1)


def squared_error(statistics, weights, bias):
    """sum over the positions of `statistics` of (sum_k w[o, k] X[k] + b[o] - f[o])^2, per output
    channel: float64 [O], for weights [O, K] and bias [O]."""
    sums, moments = statistics["sums"], statistics["moments"]
    group, group_out, taps = moments.shape
    w = weights.reshape(group, group_out, taps)
    b = bias.reshape(group, group_out)
    if "columns" in statistics:
        quadratic = np.sum((w @ statistics["columns"]) ** 2, axis=2)
    else:
        quadratic = channel_quadratic(w, statistics["gram"])
    error = (quadratic + 2 * b * np.einsum("gok,gk->go", w, sums) + statistics["positions"] * b ** 2
             - 2 * (np.einsum("gok,gok->go", w, moments) + b * statistics["target_sums"])
             + statistics["target_squares"])
    return error.reshape(-1)


def channel_quadratic(weights, gram):
    """w[g, o] G[g] w[g, o]^T per group g and output channel o: [g, O/g] for weights [g, O/g, K] and
    gram [g, K, K] (one matrix product per group)."""
    return np.sum((weights @ gram) * weights, axis=2)


def round_pieces(statistics, pieces, levels, bias, allowed, rounds, ridge):
    """The alternation of the "rounding" fit on `statistics`: `rounds` times (regress the levels
    and bias, sweep the pieces once), then a last regression. -> (pieces [O, K], levels [O, M+1],
    bias [O])."""
    statistics = with_gram(statistics)  # the sweeps read every pair of taps
    for _ in range(rounds):
        levels, bias = regress_from_statistics(statistics, pieces, levels, bias, ridge)
        pieces = sweep_pieces(statistics, pieces, levels, bias, allowed)
    levels, bias = regress_from_statistics(statistics, pieces, levels, bias, ridge)
    return pieces, levels, bias


def allowed_pieces(weight, weight_thresholds):
    """bool [O, M+1]: the pieces of each output channel that a weight can be moved into (those
    whose `piece_anchors` fall inside them; an empty inner piece between equal thresholds is not)."""
    anchors = piece_anchors(weight, weight_thresholds)
    return pieces_of(anchors.astype(np.float32), weight_thresholds) == np.arange(anchors.shape[1])
