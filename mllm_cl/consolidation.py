"""Consolidating a newly trained model into the previous one: ModelMix and Spectral-Aware Consolidation.

LLaVA-c (Liu et al., 2025), section 4.1, eqs 4-7. With theta_old the model before task t and theta_new the
model trained on task t from it, both methods move theta_old part of the way towards theta_new.

ModelMix (eq 4):  theta = theta_old + alpha * (theta_new - theta_old)

SAC, per weight matrix W (a higher-rank tensor is reshaped to (out, rest) first):

    Delta = W_new - W_old = U diag(s) V^T         s_1 >= ... >= s_r > 0, r = numerical rank of Delta
    m_k(s)_i = (1/k) * sum_{j=i}^{i+k-1} s_j      windowed mean, s_j = s_r for j > r  (eq 6)
    k  = choose_window(s, alpha, rule)             the k in 1..r whose matched quantity M_k is closest to
                                                   alpha * T  (eq 7), under one of two rules:
            nuclear (default):  M_k = sum_i m_k(s)_i,  T = sum_i s_i    (the nuclear norm shrinks by alpha)
            top:                M_k = m_k(s)_1,        T = s_1          (the top direction shrinks by alpha,
                                                                         as in ModelMix; smaller ones keep more)
    c  = min(1, alpha * T / M_k)
    s' = c * m_k(s)
    W  = W_old + U diag(s') V^T

The paper's equations 6-7 were lost in extraction; the windowed mean, the padding and both matching rules
come from its text and are this project's reconstructions. The factor c is ours too: on a flat spectrum every
window leaves s unchanged, so the windows alone cannot reach the alpha share; c then supplies it, and a
flat spectrum comes out as alpha * s, exactly what ModelMix gives. Since s is non-increasing, each windowed
mean is <= s_i and the means are non-increasing, and c <= 1, so s' is non-increasing with s'_i <= s_i;
the largest values, at the top of the steepest drops, shrink most. When the closest window undershoots the
share, c stays 1 rather than push any value above its original. `_rule_sums` is the one place that holds
the matching rules. Non-matrix parameters (biases, norms) get ModelMix.

`sac` here is the plain rule, one `torch.linalg.svd` per matrix; `mllm_cl.spectral` computes the same with
batched, sketched SVDs, once for a whole alpha sweep (what the CL method and consolidate.py use).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from mllm_cl.errors import UserError

Tensor = torch.Tensor
StateDict = Mapping[str, Tensor]

# Singular values below this share of the largest are round-off, not update: the numerical rank ends there.
RANK_RTOL = 1e-5


class ConsolidationMismatchError(UserError, ValueError):
    """The old and new state dicts do not describe the same model."""


def check_state_dicts(old: StateDict, new: StateDict) -> None:
    """Raise `ConsolidationMismatchError` naming every missing or extra key, shape or dtype mismatch, NaN or inf."""
    problems = []
    missing = sorted(set(old) - set(new))
    extra = sorted(set(new) - set(old))
    if missing:
        problems.append(f"keys in the old model but not the new one: {missing}")
    if extra:
        problems.append(f"keys in the new model but not the old one: {extra}")
    for key in sorted(set(old) & set(new)):
        if old[key].shape != new[key].shape:
            problems.append(f"{key}: shape {tuple(old[key].shape)} (old) vs {tuple(new[key].shape)} (new)")
        elif old[key].dtype != new[key].dtype:
            problems.append(f"{key}: dtype {old[key].dtype} (old) vs {new[key].dtype} (new)")
        elif not old[key].is_floating_point() and not torch.equal(old[key], new[key]):
            problems.append(f"{key}: {old[key].dtype} tensor differs between the models and cannot be mixed")
        else:
            for name, state in (("old", old), ("new", new)):
                if state[key].is_floating_point() and not torch.isfinite(state[key]).all():
                    problems.append(f"{key}: the {name} model holds NaN or inf values (a diverged training run?)")
    if problems:
        raise ConsolidationMismatchError(
            "the old and new models cannot be consolidated (the new one must be trained from the old one): "
            + "; ".join(problems))


def check_alpha(alpha: float) -> None:
    """Raise ValueError unless 0 <= alpha <= 1."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1] (the weight of the new model), got {alpha}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 parameters are mixed in float64, all others in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def mix(old: Tensor, new: Tensor, alpha: float) -> Tensor:
    """ModelMix on one tensor; the endpoints are returned exactly."""
    if alpha == 0.0 or not old.is_floating_point():
        return old.clone()
    if alpha == 1.0:
        return new.clone()
    dtype = compute_dtype(old.dtype)
    return torch.lerp(old.to(dtype), new.to(dtype), alpha).to(old.dtype)


def modelmix(old: StateDict, new: StateDict, alpha: float) -> dict[str, Tensor]:
    """theta_old + alpha * (theta_new - theta_old) for every tensor (LLaVA-c eq 4)."""
    check_state_dicts(old, new)
    check_alpha(alpha)
    return {key: mix(old[key], new[key], alpha) for key in old}


# ---------------------------------------------------------------- one spectrum

def window_sums(s: Tensor) -> Tensor:
    """sum_i m_k(s)_i for every k = 1..r, in O(r): entry k-1 is the consolidated sum with window k.

    Element j (0-based) lies in min(j+1, k) windows, and the windows past the end hold k(k-1)/2 padded
    copies of s_r in all, so  k * sum_i m_k(s)_i = sum_{j<k} (j+1) s_j + k * sum_{j>=k} s_j + s_r k(k-1)/2.
    """
    r = s.numel()
    s = s.double()
    k = torch.arange(1, r + 1, dtype=torch.float64, device=s.device)
    zero = s.new_zeros(1)
    weighted = torch.cat([zero, torch.cumsum(k * s, 0)])  # (r+1,) sum_{j<k} (j+1) s_j
    prefix = torch.cat([zero, torch.cumsum(s, 0)])  # (r+1,) sum_{j<k} s_j
    tail = prefix[-1] - prefix[1:]  # (r,) sum_{j>=k} s_j
    return (weighted[1:] + k * tail + s[-1] * k * (k - 1) / 2) / k


def window_mean(s: Tensor, k: int) -> Tensor:
    """m_k(s): the mean of s_i .. s_{i+k-1} for every i, padding past the end with the last value."""
    r = s.numel()
    prefix = torch.cat([s.new_zeros(1), torch.cumsum(s, 0)])  # (r+1,) sum_{j<i} s_j
    start = torch.arange(r, device=s.device)
    end = (start + k).clamp(max=r)
    padding = (start + k - r).clamp(min=0)  # how many copies of s_r window i needs
    return (prefix[end] - prefix[start] + padding * s[-1]) / k  # (r,)


def window_firsts(s: Tensor) -> Tensor:
    """m_k(s)_1 = mean(s_1 .. s_k) for every k = 1..r: the first windowed mean of each window size."""
    s = s.double()
    return torch.cumsum(s, 0) / torch.arange(1, s.numel() + 1, dtype=torch.float64, device=s.device)


# The two readings of LLaVA-c eq 7 (lost in extraction). For each: which sum the window must match, and
# that sum for every window k = 1..r; ties go to the smallest k.
#   nuclear: sum_i m_k(s)_i  closest to  alpha * sum_i s_i   (the update's nuclear norm shrinks as ModelMix's)
#   top:     m_k(s)_1        closest to  alpha * s_1         (the largest direction shrinks as ModelMix's;
#                                                              smaller ones keep more)
RULES = ("nuclear", "top")


def _rule_sums(s: Tensor, rule: str) -> tuple[Tensor, Tensor]:
    """(the target before alpha, the matched quantity for every window k) under `rule`."""
    if rule == "nuclear":
        return s.double().sum(), window_sums(s)
    if rule == "top":
        return s.double()[0], window_firsts(s)
    raise ValueError(f"SAC rule must be one of {', '.join(RULES)}, got {rule!r}")


def choose_window(s: Tensor, alpha: float, rule: str = "nuclear") -> int:
    """The window k in 1..len(s) whose matched quantity is closest to alpha times the target (see RULES)."""
    target, matched = _rule_sums(s, rule)
    return int(torch.argmin((matched - alpha * target).abs())) + 1


def consolidate_spectrum(s: Tensor, alpha: float, rule: str = "nuclear") -> Tensor:
    """s' = c * m_k(s), k = choose_window(s, alpha, rule), c = min(1, alpha * target / matched_k): the matched
    quantity lands on alpha times its target exactly unless the closest window undershoots it."""
    if s.numel() == 0:
        return s.clone()
    if alpha == 0.0 or s.double().sum() == 0:
        return torch.zeros_like(s)
    k = choose_window(s, alpha, rule)
    target, matched = _rule_sums(s, rule)
    scale = torch.clamp(alpha * target / matched[k - 1], max=1.0)
    return (scale * window_mean(s.double(), k)).to(s.dtype)


def numerical_rank(s: Tensor) -> Tensor:
    """How many of the descending singular values s (..., q) exceed RANK_RTOL * s_1: the rest are round-off."""
    return (s > RANK_RTOL * s[..., :1]).sum(dim=-1)


# ---------------------------------------------------------------- a whole model

def is_matrix(t: Tensor) -> bool:
    """SAC treats every floating tensor of two or more dimensions as a matrix; the rest get ModelMix."""
    return t.is_floating_point() and t.dim() >= 2


def matrix_view(t: Tensor) -> Tensor:
    """The (out, rest) matrix of a weight."""
    return t.reshape(t.shape[0], -1)


def consolidate_model(old: StateDict, new: StateDict, alpha: float,
                      consolidate_matrix: Callable[[str], Tensor]) -> dict[str, Tensor]:
    """`consolidate_matrix(key)` for every matrix and ModelMix for every other tensor.

    At alpha 0 and 1 (s' = 0 and s' = s) every tensor gets ModelMix, which gives the old and the new model
    exactly, without the round-off of an SVD.
    """
    check_alpha(alpha)
    endpoint = alpha in (0.0, 1.0)
    return {key: consolidate_matrix(key) if is_matrix(tensor) and not endpoint else mix(tensor, new[key], alpha)
            for key, tensor in old.items()}


def sac_matrix(old: Tensor, new: Tensor, alpha: float, rule: str = "nuclear") -> Tensor:
    """W_old + U diag(s') V^T for one weight, computed in float64 and returned in the weight's dtype."""
    base = matrix_view(old).double()  # (m, n)
    u, s, vh = torch.linalg.svd(matrix_view(new).double() - base, full_matrices=False)
    r = int(numerical_rank(s))
    update = u[:, :r] @ torch.diag(consolidate_spectrum(s[:r], alpha, rule)) @ vh[:r]  # (m, n)
    return (base + update).reshape(old.shape).to(old.dtype)


def sac(old: StateDict, new: StateDict, alpha: float, rule: str = "nuclear") -> dict[str, Tensor]:
    """Spectral-Aware Consolidation (LLaVA-c section 4.1) of `new` into `old` with mix ratio `alpha`."""
    check_state_dicts(old, new)
    return consolidate_model(old, new, alpha, lambda key: sac_matrix(old[key], new[key], alpha, rule))
