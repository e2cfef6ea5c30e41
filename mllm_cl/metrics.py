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
