"""Least-squares staircase fitting (the PA approximation of DESIGN.md section 2).

A staircase with thresholds t_1 <= ... <= t_K and levels L_0 <= ... <= L_K maps v to L_i where i
is the number of thresholds with v >= t_i. `StaircaseFit` finds them by Lloyd-Max iteration:
levels are the mean of each piece (least squares), thresholds the midpoints between levels.
Its symmetric variant fits |v| and mirrors the result (levels and thresholds symmetric about 0).
`UniformStaircaseFit` constrains the levels to a uniform grid L_q = lowest + e * q (the binary
activation code of engine/ops/pa_conv.py needs it). `widened_staircase` scales a fitted staircase.
"""
import copy

import numpy as np


def _sorted_values(values, n_thresholds):
    """The values to fit, sorted float64 1-D, after checking them and the threshold count."""
    values = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise ValueError("staircase fitting needs a non-empty array of finite values")
    if n_thresholds < 1:
        raise ValueError(f"n_thresholds must be >= 1, found {n_thresholds}")
    return values


class StaircaseFit:
    """Fit a staircase with `n_thresholds` thresholds to 1-D data by least squares.

    symmetric: levels and thresholds symmetric about 0 (fits |v| and mirrors).
    lowest_level: if given, L_0 is fixed to it (0 for tensors that follow ReLU).

    Fitted attributes: thresholds_ float64 [K], levels_ float64 [K+1], mse_ (mean squared error
    on the data), relative_error_ (mse_ / mean(v^2); 0 for all-zero data), n_iter_.
    """

    def __init__(self, n_thresholds, *, symmetric=False, lowest_level=None, max_iter=100, tol=1e-9):
        self.n_thresholds = n_thresholds
        self.symmetric = symmetric
        self.lowest_level = lowest_level
        self.max_iter = max_iter
        self.tol = tol

    def fit(self, values):
        values = _sorted_values(values, self.n_thresholds)
        if self.symmetric:
            if self.lowest_level is not None:
                raise ValueError("a symmetric staircase cannot fix its lowest level")
            self.thresholds_, self.levels_, self.n_iter_ = _symmetric_lloyd(values, self.n_thresholds,
                                                                            self.max_iter, self.tol)
        else:
            self.thresholds_, self.levels_, self.n_iter_ = _lloyd(values, self.n_thresholds, self.lowest_level,
                                                                  self.max_iter, self.tol)
        self.mse_ = float(np.mean((self.transform(values) - values) ** 2))
        power = float(np.mean(values ** 2))
        self.relative_error_ = self.mse_ / power if power > 0 else 0.0
        return self

    def transform(self, values):
        """The staircase applied to `values`: L_i with i = #{k: v >= t_k}."""
        return self.levels_[np.searchsorted(self.thresholds_, values, side="right")]


class UniformStaircaseFit:
    """Fit a staircase with `n_thresholds` (N) thresholds and uniform levels L_q = lowest + e * q,
    q = 0..N, to 1-D data by least squares.

    lowest_level: if given, lowest is fixed to it (0 for tensors that follow ReLU).
    Lloyd iteration on the grid: each value goes to its nearest level (thresholds at the midpoints
    lowest + e * (q - 1/2)), then (lowest, e) are the least-squares fit of the values on their level
    indices q (e alone when lowest is fixed); neither step raises the error. It starts from the
    least-squares staircase (`StaircaseFit`, its lowest and mean step), and without a fixed lowest
    level also from the symmetric one; the better result is kept.

    Fitted attributes: thresholds_ float64 [N], levels_ float64 [N+1], lowest_, step_ (e >= 0),
    mse_, relative_error_ (as `StaircaseFit`), n_iter_.
    """

    def __init__(self, n_thresholds, *, lowest_level=None, max_iter=100, tol=1e-9):
        self.n_thresholds = n_thresholds
        self.lowest_level = lowest_level
        self.max_iter = max_iter
        self.tol = tol

    def fit(self, values):
        values = _sorted_values(values, self.n_thresholds)
        starts = [StaircaseFit(self.n_thresholds, lowest_level=self.lowest_level, max_iter=self.max_iter,
                               tol=self.tol).fit(values).levels_]
        if self.lowest_level is None:
            starts.append(StaircaseFit(self.n_thresholds, symmetric=True, max_iter=self.max_iter,
                                       tol=self.tol).fit(values).levels_)
        best = None
        for levels in starts:
            lowest, step, iterations = _uniform_lloyd(values, self.n_thresholds, self.lowest_level, levels[0],
                                                      (levels[-1] - levels[0]) / self.n_thresholds,
                                                      self.max_iter, self.tol)
            grid = lowest + step * np.arange(self.n_thresholds + 1)
            mse = float(np.mean((grid[np.searchsorted(grid[:-1] + step / 2, values, side="right")] - values) ** 2))
            if best is None or mse < best[0]:
                best = (mse, lowest, step, iterations)
        self.mse_, self.lowest_, self.step_, self.n_iter_ = best
        self.levels_ = self.lowest_ + self.step_ * np.arange(self.n_thresholds + 1)
        self.thresholds_ = self.levels_[:-1] + self.step_ / 2
        power = float(np.mean(values ** 2))
        self.relative_error_ = self.mse_ / power if power > 0 else 0.0
        return self

    def transform(self, values):
        """The staircase applied to `values`: L_q with q = #{k: v >= t_k}."""
        return self.levels_[np.searchsorted(self.thresholds_, values, side="right")]


def _uniform_lloyd(sorted_values, n_thresholds, lowest_level, lowest, step, max_iter, tol):
    """Lloyd iteration on the grid lowest + step * q (see `UniformStaircaseFit`) over sorted data,
    from (lowest, step). Returns (lowest, step, iterations)."""
    cumulative = np.concatenate([[0.0], np.cumsum(sorted_values)])
    scale = max(float(np.abs(sorted_values).max()), 1e-30)
    q = np.arange(n_thresholds + 1, dtype=np.float64)
    if lowest_level is not None:
        lowest = float(lowest_level)
    if not step > 0:
        step = max(float(sorted_values[-1] - sorted_values[0]), scale) / n_thresholds
    iteration = 0
    for iteration in range(1, max_iter + 1):
        thresholds = lowest + step * (q[1:] - 0.5)
        bounds = np.concatenate([[0], np.searchsorted(sorted_values, thresholds, side="left"), [sorted_values.size]])
        counts = np.diff(bounds).astype(np.float64)
        sums = cumulative[bounds[1:]] - cumulative[bounds[:-1]]
        if lowest_level is not None:
            denominator = float(np.sum(counts * q * q))
            new_lowest = lowest
            new_step = float(np.sum(q * (sums - lowest * counts))) / denominator if denominator > 0 else step
        else:
            n, sum_q, sum_qq = counts.sum(), np.sum(counts * q), np.sum(counts * q * q)
            determinant = n * sum_qq - sum_q * sum_q
            if determinant <= 1e-12 * n * max(sum_qq, 1.0):  # one occupied piece: keep the step
                new_step = step
            else:
                new_step = float(n * np.sum(q * sums) - sum_q * sums.sum()) / determinant
            new_lowest = float(sums.sum() - new_step * sum_q) / n
        if not new_step > 0:  # the values sit on one level: keep the step, nothing to gain
            new_step = step
        converged = abs(new_step - step) * n_thresholds + abs(new_lowest - lowest) <= tol * scale
        lowest, step = new_lowest, new_step
        if converged:
            break
    return lowest, step, iteration


def _lloyd(sorted_values, n_thresholds, lowest_level, max_iter, tol):
    """Lloyd-Max on sorted data. Returns (thresholds, levels, iterations)."""
    if n_thresholds == 0:
        level = sorted_values.mean() if lowest_level is None else lowest_level
        return np.empty(0), np.array([level]), 0
    n_levels = n_thresholds + 1
    cumulative = np.concatenate([[0.0], np.cumsum(sorted_values)])
    scale = max(float(np.abs(sorted_values).max()), 1e-30)
    # Start from quantiles of the distinct values: data with atoms (the zeros after a ReLU)
    # would otherwise start several levels on the atom, and those pieces stay empty for good.
    distinct = np.unique(sorted_values)
    if lowest_level is None:
        levels = np.quantile(distinct, (np.arange(n_levels) + 0.5) / n_levels)
    else:
        above = distinct[distinct > lowest_level]
        upper = np.quantile(above, (np.arange(n_thresholds) + 0.5) / n_thresholds) if above.size else \
            np.full(n_thresholds, lowest_level)
        levels = np.concatenate([[lowest_level], upper])
    thresholds = (levels[:-1] + levels[1:]) / 2
    for iteration in range(1, max_iter + 1):
        # Piece i holds the values with t_i <= v < t_{i+1}.
        bounds = np.concatenate([[0], np.searchsorted(sorted_values, thresholds, side="left"), [sorted_values.size]])
        counts = np.diff(bounds)
        sums = cumulative[bounds[1:]] - cumulative[bounds[:-1]]
        # An empty piece keeps its previous level; order is restored by the running maximum.
        new_levels = np.where(counts > 0, sums / np.maximum(counts, 1), levels)
        if lowest_level is not None:
            new_levels[0] = lowest_level
        new_levels = np.maximum.accumulate(new_levels)
        new_thresholds = (new_levels[:-1] + new_levels[1:]) / 2
        converged = np.max(np.abs(new_thresholds - thresholds)) <= tol * scale
        levels, thresholds = new_levels, new_thresholds
        if converged:
            break
    return thresholds, levels, iteration


def _symmetric_lloyd(sorted_values, n_thresholds, max_iter, tol):
    """Symmetric staircase: fit |v| and mirror. An odd threshold count puts one threshold at 0;
    an even count has a level at 0."""
    magnitudes = np.sort(np.abs(sorted_values))
    if n_thresholds % 2:
        half_thresholds, half_levels, iterations = _lloyd(magnitudes, n_thresholds // 2, None, max_iter, tol)
        # For M=1 the single level is mean |v| (the classic binarization scale).
        levels = np.concatenate([-half_levels[::-1], half_levels])
        thresholds = np.concatenate([-half_thresholds[::-1], [0.0], half_thresholds])
    else:
        half_thresholds, half_levels, iterations = _lloyd(magnitudes, n_thresholds // 2, 0.0, max_iter, tol)
        levels = np.concatenate([-half_levels[::-1], half_levels[1:]])
        thresholds = np.concatenate([-half_thresholds[::-1], half_thresholds])
    return thresholds, levels, iterations


def widened_staircase(fit, scale, values):
    """A copy of the fitted `StaircaseFit` or `UniformStaircaseFit` `fit` whose levels and thresholds
    (and lowest_ and step_ of a uniform one) are `scale` times its own, so that it maps v to
    scale * fit(v / scale), with mse_ and relative_error_ measured on `values` (the data `fit` was
    fitted to). Uniform levels stay uniform, and a lowest level of 0 stays 0."""
    if not scale > 0:
        raise ValueError(f"a staircase can only be widened by a positive scale, found {scale!r}")
    values = np.asarray(values, dtype=np.float64).ravel()
    widened = copy.copy(fit)
    widened.levels_, widened.thresholds_ = fit.levels_ * scale, fit.thresholds_ * scale
    for name in ("lowest_", "step_"):
        if hasattr(fit, name):
            setattr(widened, name, getattr(fit, name) * scale)
    widened.mse_ = float(np.mean((widened.transform(values) - values) ** 2))
    power = float(np.mean(values ** 2))
    widened.relative_error_ = widened.mse_ / power if power > 0 else 0.0
    return widened


WEIGHT_STAIRCASES = ("least_squares", "symmetric")


def fit_weight_staircases(weight, weight_bases, staircase="least_squares"):
    """Per-output-channel staircases of a weight tensor. staircase "least_squares": per channel the
    least-squares or the symmetric fit, whichever has the smaller error; "symmetric": every
    channel's symmetric fit (at M=1 the XNOR-Net binarization +-mean|w| with threshold 0).

    weight: float [O, ...]. Returns (thresholds [O, M], levels [O, M+1], report dict).
    """
    if staircase not in WEIGHT_STAIRCASES:
        raise ValueError(f"unknown weight staircase {staircase!r}; expected one of {WEIGHT_STAIRCASES}")
    flat = np.asarray(weight, dtype=np.float64).reshape(weight.shape[0], -1)
    thresholds = np.empty((flat.shape[0], weight_bases))
    levels = np.empty((flat.shape[0], weight_bases + 1))
    squared_error = 0.0
    symmetric_chosen = 0
    for o, row in enumerate(flat):
        fits = [StaircaseFit(weight_bases).fit(row)] if staircase == "least_squares" else [None]
        fits.append(StaircaseFit(weight_bases, symmetric=True).fit(row))
        best = min((fit for fit in fits if fit is not None), key=lambda f: f.mse_)
        symmetric_chosen += best is fits[1]
        thresholds[o], levels[o] = best.thresholds_, best.levels_
        squared_error += best.mse_ * row.size
    power = float(np.sum(flat ** 2))
    report = {
        "relative_error": squared_error / power if power > 0 else 0.0,
        "symmetric_channels": symmetric_chosen,
        "least_squares_channels": flat.shape[0] - symmetric_chosen,
    }
    return thresholds, levels, report


def staircase_to_bases(values_by_row, thresholds, levels):
    """Sign bit-planes and coefficients of per-row staircases (DESIGN.md section 2):
    Q(v) = c + sum_k d_k sign(v - t_k), d_k = (L_k - L_{k-1}) / 2, c = (L_0 + L_M) / 2, where
    sign(v - t) is +1 for v >= t.

    values_by_row: [O, ...]; thresholds [O, M]; levels [O, M+1]
    -> signs bool [M, O, ...] (True = +1), scales d [M, O], offset c [O]
    """
    values = np.asarray(values_by_row, dtype=np.float64)
    extra = (1,) * (values.ndim - 1)
    signs = np.stack([values >= thresholds[:, k].reshape((-1,) + extra) for k in range(thresholds.shape[1])])
    scales = (levels[:, 1:] - levels[:, :-1]).T / 2
    offset = (levels[:, 0] + levels[:, -1]) / 2
    return signs, scales, offset
