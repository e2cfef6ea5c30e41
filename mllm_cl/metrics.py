"""Continual-learning metrics on accuracies in percent: the accuracy matrix and its summaries, and paper 1's scores.

The accuracy matrix A has A[k][j] = accuracy on task j after learning task k (tasks 0..T-1; entries above
the diagonal, tasks not learned yet, may be NaN and are never used). Standard metrics: average accuracy
(Lopez-Paz & Ranzato 2017; Chaudhry et al. 2018), forgetting (Chaudhry et al. 2018), backward transfer
(Lopez-Paz & Ranzato 2017). Paper 1 (Srivastava et al. 2024): omega = harmonic mean of a group of benchmark
accuracies with a zero counted as 0.1%, Delta = omega(base) - omega(now), VL score = harmonic mean.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def accuracy_matrix(a: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """A as a (T, T) float array; raises if it is not square or has a missing entry on or below the diagonal."""
    matrix = np.asarray(a, dtype=float)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"an accuracy matrix must be square (T x T, row k = after task k), got shape {matrix.shape}")
    lower = np.tril(matrix)
    if not np.all(np.isfinite(lower)):
        k, j = np.argwhere(~np.isfinite(lower))[0]
        raise ValueError(f"accuracy matrix entry [{k}][{j}] (task {j} after task {k}) is {matrix[k, j]}; "
                         f"every entry on or below the diagonal must be measured")
    return matrix


def average_accuracy(a: Sequence[Sequence[float]] | np.ndarray, k: int | None = None) -> float:
    """ACC_k = (1/(k+1)) * sum_{j<=k} A[k][j]: mean accuracy over the tasks learned so far (default k = T-1)."""
    matrix = accuracy_matrix(a)
    k = matrix.shape[0] - 1 if k is None else k
    if not 0 <= k < matrix.shape[0]:
        raise ValueError(f"k={k} is outside 0..{matrix.shape[0] - 1}")
    return float(matrix[k, :k + 1].mean())


def forgetting(a: Sequence[Sequence[float]] | np.ndarray) -> list[float]:
    """f_j = max_{j<=l<T-1} A[l][j] - A[T-1][j] for every task j < T-1: from its best accuracy to its final one."""
    matrix = accuracy_matrix(a)
    last = matrix.shape[0] - 1
    return [float(matrix[j:last, j].max() - matrix[last, j]) for j in range(last)]


def backward_transfer(a: Sequence[Sequence[float]] | np.ndarray) -> float:
    """BWT = (1/(T-1)) * sum_{j<T-1} (A[T-1][j] - A[j][j]); negative = forgetting, positive = later tasks helped."""
    matrix = accuracy_matrix(a)
    last = matrix.shape[0] - 1
    if last == 0:
        raise ValueError("backward transfer needs at least two tasks")
    return float(np.mean([matrix[last, j] - matrix[j, j] for j in range(last)]))


def mean_accuracy_over_sequence(a: Sequence[Sequence[float]] | np.ndarray) -> float:
    """The mean of the accuracy matrix's lower triangle, diagonal included: 2 / (T (T+1)) * sum_{j<=k} A[k][j],
    every task's accuracy after every task since it was learned (what CoIN and MCITlib call the mean accuracy
    over the sequence)."""
    matrix = accuracy_matrix(a)
    return float(matrix[np.tril_indices(matrix.shape[0])].mean())


def forward_transfer(a: Sequence[Sequence[float]] | np.ndarray, zero_shot: Sequence[float]) -> float:
    """FWT = (1/(T-1)) * sum_{j>=1} (A[j-1][j] - b_j) (Lopez-Paz and Ranzato 2017, GEM), b_j the starting model's
    zero-shot accuracy on task j: how much learning the earlier tasks helps task j before it is learned."""
    matrix = accuracy_matrix(a)
    size = matrix.shape[0]
    if size < 2:
        raise ValueError("forward transfer needs at least two tasks")
    if len(zero_shot) != size:
        raise ValueError(f"forward transfer needs one zero-shot accuracy per task ({size}), got {len(zero_shot)}")
    before = [matrix[j - 1, j] for j in range(1, size)]
    if not np.all(np.isfinite(before)):
        raise ValueError("forward transfer needs A[j-1][j], every task's accuracy just before it was learned")
    return float(np.mean([value - zero_shot[j] for j, value in enumerate(before, 1)]))


def sequence_metrics(a: Sequence[Sequence[float]] | np.ndarray,
                     zero_shot: Sequence[float] | None = None) -> dict[str, float | None]:
    """The figures the CL libraries (CoIN, MCITlib) report for one accuracy matrix: avg_acc (final average),
    mean_acc (over the sequence), bwt, fwt (against `zero_shot`, the starting model's accuracy per task) and
    mean_forgetting; None where a figure is undefined (one task; no zero-shot row for fwt)."""
    several = accuracy_matrix(a).shape[0] > 1
    return {"avg_acc": average_accuracy(a), "mean_acc": mean_accuracy_over_sequence(a),
            "bwt": backward_transfer(a) if several else None,
            "fwt": forward_transfer(a, zero_shot) if several and zero_shot else None,
            "mean_forgetting": float(np.mean(forgetting(a))) if several else None}


def _values(accuracies: Mapping[str, float] | Sequence[float]) -> list[float]:
    return list(accuracies.values()) if isinstance(accuracies, Mapping) else list(accuracies)


def harmonic_mean(values: Mapping[str, float] | Sequence[float], zero_as: float = 0.1) -> float:
    """n / sum_i (1 / v_i) over accuracies in percent, a zero counting as `zero_as` percent (paper 1: 0.1%)."""
    items = _values(values)
    if not items:
        raise ValueError("the harmonic mean of no values is undefined")
    bad = [v for v in items if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0)]
    if bad:
        raise ValueError(f"accuracies must be finite numbers >= 0 (percent), got {bad}")
    return len(items) / sum(1.0 / (v if v > 0 else zero_as) for v in items)


def nl_omega(accuracies: Mapping[str, float] | Sequence[float]) -> float:
    """omega: the harmonic mean of a group of language benchmarks (e.g. WSC273, WinoGrande, ARC-E, ARC-C)."""
    return harmonic_mean(accuracies)


def nl_delta(omega_base: float, omega_now: float) -> float:
    """Delta = omega(base LLM) - omega(after task k): positive = forgotten, negative = positive backward transfer."""
    return omega_base - omega_now


def vl_hmean(accuracies: Mapping[str, float] | Sequence[float]) -> float:
    """The vision-language score: the harmonic mean of the VL benchmarks' accuracies."""
    return harmonic_mean(accuracies)


# ---------------------------------------------------------------- uncertainty

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(correct: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of an accuracy, in percent (Wilson 1927): with p = correct / n,

        (p + z^2/2n  +/-  z * sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)

    which, unlike p +/- z*sqrt(p(1-p)/n), stays inside [0, 100] and is not empty at 0% or 100%."""
    if n <= 0 or not 0 <= correct <= n:
        raise ValueError(f"wilson_interval needs 0 <= correct <= n and n > 0, got {correct} of {n}")
    p, z2 = correct / n, z * z
    centre = p + z2 / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    scale = 1 + z2 / n
    return 100.0 * max(0.0, (centre - half) / scale), 100.0 * min(1.0, (centre + half) / scale)


def bootstrap_delta_interval(base: Mapping[str, Sequence[int]], now: Mapping[str, Sequence[int]],
                             resamples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """A paired bootstrap interval of Delta = omega(base) - omega(now) from per-document correctness (0/1).

    Each resample draws, per benchmark, documents with replacement and scores the *same* documents before and
    after, so what the two models share (the documents' difficulty) cancels out; the interval is the
    (1 - level) / 2 and (1 + level) / 2 percentiles of the resampled Deltas, in points."""
    if set(base) != set(now) or not base:
        raise ValueError(f"base and now must score the same benchmarks, got {sorted(base)} and {sorted(now)}")
    rng = np.random.default_rng(seed)
    omega_base = np.empty((resamples, len(base)))
    omega_now = np.empty((resamples, len(base)))
    for column, task in enumerate(sorted(base)):
        before, after = np.asarray(base[task], dtype=float), np.asarray(now[task], dtype=float)
        if before.shape != after.shape or before.size == 0:
            raise ValueError(f"{task}: {before.size} documents before and {after.size} after; they must be the same")
        picks = rng.integers(0, before.size, size=(resamples, before.size))
        omega_base[:, column] = 100.0 * before[picks].mean(axis=1)
        omega_now[:, column] = 100.0 * after[picks].mean(axis=1)

    def omega(accuracies: np.ndarray) -> np.ndarray:  # harmonic mean per row, a zero counting as 0.1%
        return accuracies.shape[1] / (1.0 / np.where(accuracies > 0, accuracies, 0.1)).sum(axis=1)

    deltas = omega(omega_base) - omega(omega_now)
    low, high = np.percentile(deltas, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def region_width(region: dict[str, float | None]) -> float | None:
    """The width alpha_G - alpha_T of an alpha curve's regions (paper 2, LLaVA-c, Figure 4); None when either
    edge is undefined."""
    return None if region["alpha_G"] is None or region["alpha_T"] is None else region["alpha_G"] - region["alpha_T"]
