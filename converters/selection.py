"""Per-layer choice of the calibration fit by its error on calibration images held out from it.

The "selected" calibration method (the default) does not trust any fit on the images it was
fitted to. For one binarized layer it compares these candidates:

- equalization strength e in EQUALIZATION_STRENGTHS (`approximate_layer`; Qa is refitted for each);
- activation staircase width g in ACT_LEVEL_SCALES: Qa's Lloyd-Max levels and thresholds times g
  (`widened_staircase`). Lloyd-Max minimizes the error of the layer's input; the output error,
  after the corrections below, is often smaller with a wider staircase (docs/accuracy.md);
- weight staircase "least_squares" (per channel the better of the asymmetric and the symmetric
  Lloyd fit) or "symmetric" (every channel symmetric: at M=1 XNOR-Net's +-mean|w|);
- output correction, each a class below with a `fit(statistics, start)`:
  `Uncorrected` (the staircase levels and the trained bias), `MatchedMoments` (per-channel
  scale and shift to the float output's mean and standard deviation), `RegressedLevels` at each
  ridge of REGRESSION_RIDGES (least-squares weight levels and bias), `RoundedPieces` (the
  regression alternated with sweeps over which level each weight uses).

Each candidate is scored by K-fold cross-validation over the calibration images (image i is in
fold i % K): its correction is fitted on the other folds and its output error summed over the
held-out fold. The corrections are least-squares or moment fits, so fit and error come from
per-fold output statistics (`least_squares.output_statistics`) without running the layer per
candidate (those that keep the pieces from the pieces' level equations of each fold).
`RoundedPieces` (the costly one) is scored only at the (e, g, staircase) whose best regression
scored best. The winner is refitted on all images. The uncorrected plain layer
(e = 0, g = 1, least squares; the "lloyd" fit on the layer's actual input) is always a candidate, so
the choice never scores worse on held-out images than it.

With `score_outputs` (the "propagated" method), the held-out error above only picks the best
candidate of each kind of correction, and those finalists are compared by an error further down
the network that their held-out outputs give (converters/calibration.py: `downstream_scorer`).
"""
import numpy as np

from .fitting import WEIGHT_STAIRCASES
from .least_squares import (equations_error, level_equations, output_statistics, regress_from_statistics, round_pieces,
                            squared_error, sum_statistics)

EQUALIZATION_STRENGTHS = (0.0, 0.5, 1.0)
ACT_LEVEL_SCALES = (1.0, 1.15, 1.3)
REGRESSION_RIDGES = (1e-3, 1e-1, 10.0)
SELECTION_FOLDS = 4
ROUNDING_ROUNDS = 4
# Bounds of the per-channel output scale of `MatchedMoments`; a constant channel keeps scale 1.
SCALE_LIMITS = (0.125, 8.0)
# What a correction that keeps the pieces reads of the statistics it is fitted on, besides the
# pieces' level equations: the complements of the folds need only these, not their K x K gram.
SUMMARY_KEYS = ("target_sums", "target_squares", "positions")
MIN_STD = 1e-12


class Start:
    """A layer's fit before correction: pieces [O, K] (which level each weight uses), levels
    [O, M+1], bias [O] (float64), and allowed [O, M+1] (the pieces a weight may move into)."""

    def __init__(self, pieces, levels, bias, allowed):
        self.pieces, self.levels, self.bias, self.allowed = pieces, levels, bias, allowed
        self._equations = {}

    def weights(self, pieces=None, levels=None):
        """The weight values q[o, k] = levels[o, pieces[o, k]] [O, K]."""
        return np.take_along_axis(self.levels if levels is None else levels,
                                  self.pieces if pieces is None else pieces, axis=1)

    def level_equations(self, statistics):
        """`level_equations` of these pieces on `statistics`, computed once per statistics object
        (the regressions at several ridges share them)."""
        key = id(statistics)
        if key not in self._equations:
            self._equations[key] = (statistics, level_equations(statistics, self.pieces, self.levels.shape[1]))
        return self._equations[key][1]

    def fold_equations(self, parts, training):
        """Fill the `level_equations` cache for the per-fold statistics `parts` and their complements
        `training` (`fold_complements(parts)`): each part's equations computed, each complement's the
        sum of the other parts' (the equations are linear in the statistics), so the K x K work is
        done once per fold."""
        equations = [self.level_equations(part) for part in parts]
        for fold, others in enumerate(training):
            if id(others) not in self._equations:
                rest = equations[:fold] + equations[fold + 1:]
                self._equations[id(others)] = (others, (sum(normal for normal, _ in rest),
                                                        sum(right for _, right in rest)))

    def forget(self):
        """Drop the cached equations (and the statistics they keep alive)."""
        self._equations.clear()


class Uncorrected:
    name = kind = "none"
    keeps_pieces = True  # every weight stays on its start's level (only levels and bias change)

    def fit(self, statistics, start):
        return start.pieces, start.levels, start.bias


class MatchedMoments:
    """y' = s y + t per output channel: s = std(f) / std(y) (limited to SCALE_LIMITS),
    t = mean(f) - s mean(y), from the statistics: mean(y) = (q.s + n b) / n and
    mean(y^2) = (q G q + 2 b q.s + n b^2) / n, q G q and q.s from the pieces' level equations."""
    name = kind = "moments"
    keeps_pieces = True

    def fit(self, statistics, start):
        normal, _ = start.level_equations(statistics)
        levels, count = start.levels, statistics["positions"]
        n_levels = levels.shape[1]
        linear = np.einsum("oi,oi->o", levels, normal[:, :n_levels, n_levels])  # q.s, s's sums per level
        quadratic = np.einsum("oi,oij,oj->o", levels, normal[:, :n_levels, :n_levels], levels)  # q G q
        bias = start.bias
        mean_y = linear / count + bias
        variance_y = (quadratic + 2 * bias * linear) / count + bias ** 2 - mean_y ** 2
        mean_f = statistics["target_sums"].reshape(-1) / count
        variance_f = statistics["target_squares"].reshape(-1) / count - mean_f ** 2
        std_y, std_f = np.sqrt(np.maximum(variance_y, 0)), np.sqrt(np.maximum(variance_f, 0))
        scale = np.clip(np.where(std_y > MIN_STD, std_f / np.maximum(std_y, MIN_STD), 1.0), *SCALE_LIMITS)
        return start.pieces, start.levels * scale[:, None], scale * bias + mean_f - scale * mean_y


class RegressedLevels:
    """Least-squares levels and bias per output channel, pieces kept (`regress_from_statistics`)."""
    kind = "regression"
    keeps_pieces = True

    def __init__(self, ridge):
        self.ridge = ridge
        self.name = f"regression(ridge={ridge:g})"

    def fit(self, statistics, start):
        levels, bias = regress_from_statistics(statistics, start.pieces, start.levels, start.bias, self.ridge,
                                               start.level_equations(statistics))
        return start.pieces, levels, bias


class RoundedPieces:
    """`RegressedLevels` alternated with sweeps over the pieces (`round_pieces`)."""
    kind = "rounding"
    keeps_pieces = False

    def __init__(self, ridge, rounds=ROUNDING_ROUNDS):
        self.ridge, self.rounds = ridge, rounds
        self.name = f"rounding(ridge={ridge:g})"

    def fit(self, statistics, start):
        return round_pieces(statistics, start.pieces, start.levels, start.bias, start.allowed, self.rounds,
                            self.ridge)


def held_out_error(parts, correction, start, training=None, fits=None):
    """sum over folds f of the output error on fold f of `correction` fitted on the other folds
    (`parts`: per-fold output statistics; training: their complements, `fold_complements(parts)`,
    when already computed; a correction that keeps the pieces reads only their SUMMARY_KEYS).
    fits: a list that receives each fold's fit (pieces, levels, bias), fold f's fitted without
    fold f's images. A correction that keeps the pieces is fitted and scored from the pieces' level
    equations of each fold (`Start.fold_equations`, `equations_error`): O (M+2)^2 numbers per fold
    instead of a K x K gram product per fold and candidate."""
    if training is None:
        training = fold_complements(parts, SUMMARY_KEYS if correction.keeps_pieces else None)
    if correction.keeps_pieces:
        start.fold_equations(parts, training)
    total = 0.0
    for part, others in zip(parts, training):
        pieces, levels, bias = correction.fit(others, start)
        if correction.keeps_pieces:  # the fold's error from its level equations, no K x K product
            error = equations_error(start.level_equations(part), levels, bias, part["target_squares"])
        else:
            error = squared_error(part, start.weights(pieces, levels), bias)
        total += float(np.sum(error))
        if fits is not None:
            fits.append((pieces, levels, bias))
    return total


def fold_complements(parts, keys=None):
    """[the summed statistics of every fold but f, for each fold f]; only their `keys` when given."""
    if keys is not None:
        parts = [{key: part[key] for key in keys} for part in parts]
    return [sum_statistics(parts[:fold] + parts[fold + 1:]) for fold in range(len(parts))]


def select_layer(inputs, target, approximate, folds=SELECTION_FOLDS, score_outputs=None):
    """Choose and fit one binarized layer (see the module docstring) on its calibration `inputs`
    [batch, C, ...] and its float output `target` [batch, O, ...].

    approximate(strength, staircase, act_scale) -> LayerApproximation of the layer on `inputs` (its `start()`
    is where the corrections start, its `finish(pieces, levels, bias)` the PA node and latent
    weights they give). Returns (PA node, latent weights, report): the report holds the chosen
    candidate, and every scored candidate's held-out error relative to the float output's
    energy (held_out_relative_error: sum (y - f)^2 / sum f^2 over the held-out images).

    score_outputs(nodes) -> float, optional: an error further down the network when image i's
    layer output is that of the PA node nodes[i % folds] (node f fitted without fold f's images),
    i.e. an error on held-out images only. When given (and folds > 1), the per-layer held-out
    error only chooses the finalists, the best candidate of each kind of correction (none,
    moments, regression, rounding), and the finalist with the smallest `score_outputs` wins
    (ties: the smaller per-layer error); the report lists the finalists' scores
    (downstream_error).
    """
    folds = max(1, min(folds, len(inputs)))
    propagate = score_outputs is not None and folds > 1
    energy = max(float(np.sum(np.asarray(target, dtype=np.float64) ** 2)), 1e-300)
    regressions = [RegressedLevels(ridge) for ridge in REGRESSION_RIDGES]
    # A candidate's Qa is its (equalization strength, activation scale): its "quantizer".
    scored = []  # (held-out error, quantizer, staircase, correction)
    finalists = {}  # kind -> (held-out error, quantizer, staircase, correction, per-fold fits)
    approximations, starts = {}, {}
    # The best regression so far: (error, quantizer, staircase, ridge, fold statistics). Only its
    # quantizer's fold statistics are kept (a gram matrix or window columns per fold: the memory of
    # a wide layer); the rounding scored there sums their complements.
    best = None

    def fold_statistics(quantizer):
        # The statistics depend on the layer's Qa only, not on its weight staircase.
        pa = approximations[quantizer, "least_squares"].pa
        return [output_statistics(pa, inputs[fold::folds], target[fold::folds]) for fold in range(folds)]

    def score(parts, training, correction, quantizer, staircase):
        fits = [] if propagate else None
        error = _score(parts, training, correction, starts[quantizer, staircase], fits)
        scored.append((error, quantizer, staircase, correction))
        kind = correction.kind
        if propagate and (kind not in finalists or error < finalists[kind][0]):
            # A fit that keeps the pieces shares start.pieces: only the levels and bias are kept.
            finalists[kind] = (error, quantizer, staircase, correction, fits)
        return error

    for quantizer in [(strength, scale) for strength in EQUALIZATION_STRENGTHS for scale in ACT_LEVEL_SCALES]:
        base = approximations[quantizer, "least_squares"] = approximate(quantizer[0], "least_squares", quantizer[1])
        parts = fold_statistics(quantizer)
        training = fold_complements(parts, SUMMARY_KEYS) if folds > 1 else None
        for staircase in WEIGHT_STAIRCASES:
            approximation = base if staircase == "least_squares" else approximate(quantizer[0], staircase,
                                                                                  quantizer[1])
            start = approximation.start()
            approximations[quantizer, staircase], starts[quantizer, staircase] = approximation, start
            for correction in [Uncorrected(), MatchedMoments()] + regressions:
                error = score(parts, training, correction, quantizer, staircase)
                if isinstance(correction, RegressedLevels) and (best is None or error < best[0]):
                    best = (error, quantizer, staircase, correction.ridge, parts)
            start.forget()
    _, quantizer, staircase, ridge, parts = best
    score(parts, fold_complements(parts) if folds > 1 else None, RoundedPieces(ridge), quantizer, staircase)
    starts[quantizer, staircase].forget()
    best = parts = None
    report = {}
    if propagate:
        outcomes = []  # (score_outputs, held-out error, quantizer, staircase, correction)
        for error, quantizer, staircase, correction, fits in finalists.values():
            nodes = [approximations[quantizer, staircase].finish(*fit)[0] for fit in fits]
            outcomes.append((float(score_outputs(nodes)), error, quantizer, staircase, correction))
        _, error, quantizer, staircase, correction = min(outcomes, key=lambda entry: entry[:2])
        report["finalists"] = [{"equalization": q[0], "act_scale": q[1], "weight_staircase": w,
                                "correction": c.name, "held_out_relative_error": e / energy, "downstream_error": o}
                               for o, e, q, w, c in outcomes]
    else:
        error, quantizer, staircase, correction = min(scored, key=lambda entry: entry[0])
    finalists = None
    approximation = approximations[quantizer, staircase]
    # The winner's statistics over all images, computed again rather than kept for every quantizer
    # (a gram matrix or the window columns of each: most of a wide layer's memory).
    pieces, levels, bias = correction.fit(sum_statistics(fold_statistics(quantizer)), starts[quantizer, staircase])
    pa, latent = approximation.finish(pieces, levels, bias)
    report = dict(approximation.report, correction=correction.name, folds=folds,
                  held_out_relative_error=error / energy,
                  candidates=[{"equalization": q[0], "act_scale": q[1], "weight_staircase": w, "correction": c.name,
                               "held_out_relative_error": e / energy} for e, q, w, c in scored], **report)
    return pa, latent, report


def _score(parts, training, correction, start, fits=None):
    if len(parts) > 1:
        return held_out_error(parts, correction, start, training, fits)
    # One image: nothing to hold out, and only the uncorrected fit was not fitted to it.
    if isinstance(correction, Uncorrected):
        return float(np.sum(squared_error(parts[0], start.weights(), start.bias)))
    return np.inf

