"""Consolidating a newly trained model into the previous one: ModelMix and Spectral-Aware Consolidation.

LLaVA-c (Liu et al., 2025), section 4.1, eqs 4-7. With theta_old the model before task t and theta_new the
model trained on task t from it, both methods move theta_old part of the way towards theta_new.

ModelMix (eq 4):  theta = theta_old + alpha * (theta_new - theta_old)

SAC, per weight matrix W (a higher-rank tensor is reshaped to (out, rest) first):

    Delta = W_new - W_old = U diag(s) V^T         s_1 >= ... >= s_r > 0, r = numerical rank of Delta
    m_k(s)_i = (1/k) * sum_{j=i}^{i+k-1} s_j      windowed mean, s_j = s_r for j > r  (eq 6)
    k  = choose_window(s, alpha)                   the k in 1..r whose sum_i m_k(s)_i is closest to
                                                   alpha * sum_i s_i  (eq 7)
    c  = min(1, alpha * sum_i s_i / sum_i m_k(s)_i)
    s' = c * m_k(s)
    W  = W_old + U diag(s') V^T

The paper's equations 6-7 were lost in extraction; the windowed mean, the padding and the matching rule come
from its text and are this project's reconstruction. The factor c is ours too: on a flat spectrum every
window leaves s unchanged, so the windows alone cannot reach the alpha share; c then supplies it, and a
flat spectrum comes out as alpha * s, exactly what ModelMix gives. Since s is non-increasing, each windowed
mean is <= s_i and the means are non-increasing, and c <= 1, so s' is non-increasing with s'_i <= s_i;
the largest values, at the top of the steepest drops, shrink most. When the closest window undershoots the
share, c stays 1 rather than push any value above its original. `choose_window` is the one place that
holds the matching rule, so it can be swapped. Non-matrix parameters (biases, norms) get ModelMix.

The SVDs do not depend on alpha: `decompose_updates` computes them once (on the GPU when there is one,
batched over parameters of the same shape) and `sac_from_spectra` turns them into a model for any alpha,
so an alpha sweep costs one set of SVDs. Each SVD comes from the eigendecomposition of the Gram matrix of
the update's short side (n x n for an (m, n) update with m >= n), formed in float64: on two CPU cores that
made the SVDs of Pythia-160M six times faster than float32 `torch.linalg.svd` (69 s against 442 s), and in
float64 the squaring loses nothing that matters (singular values are exact to ~1e-7 of s_1; the numerical
rank is cut at 1e-5 of s_1, and the directions below it, round-off, are left out of the update). The new
weights are rebuilt in float32 (float64 for float64 parameters) and cast back to each parameter's dtype.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

Tensor = torch.Tensor
StateDict = Mapping[str, Tensor]

# Extra sketch columns for the low-rank path: the sketch of a rank-r update has r + 8 columns.
SKETCH_OVERSAMPLING = 8
# The largest stack of same-shaped updates decomposed in one batched call, in elements (512 MiB in float64).
MAX_BATCH_ELEMENTS = 2**26
# Singular values below this share of the largest are round-off, not update: the numerical rank ends there.
RANK_RTOL = 1e-5


class ConsolidationMismatchError(ValueError):
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
            "the old and new models cannot be consolidated (the new one must be trained from the old one):\n  "
            + "\n  ".join(problems))


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1] (the weight of the new model), got {alpha}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mix(old: Tensor, new: Tensor, alpha: float) -> Tensor:
    """ModelMix on one tensor; the endpoints are returned exactly."""
    if alpha == 0.0 or not old.is_floating_point():
        return old.clone()
    if alpha == 1.0:
        return new.clone()
    dtype = _compute_dtype(old.dtype)
    return torch.lerp(old.to(dtype), new.to(dtype), alpha).to(old.dtype)


def modelmix(old: StateDict, new: StateDict, alpha: float) -> dict[str, Tensor]:
    """theta_old + alpha * (theta_new - theta_old) for every tensor (LLaVA-c eq 4)."""
    check_state_dicts(old, new)
    _check_alpha(alpha)
    return {key: _mix(old[key], new[key], alpha) for key in old}


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


def choose_window(s: Tensor, alpha: float) -> int:
    """The window k in 1..len(s) whose consolidated sum sum_i m_k(s)_i is closest to alpha * sum_i s_i.

    The matching rule of LLaVA-c eq 7 as this project reconstructs it; ties go to the smallest k.
    """
    target = alpha * s.double().sum()
    return int(torch.argmin((window_sums(s) - target).abs())) + 1


def consolidate_spectrum(s: Tensor, alpha: float) -> Tensor:
    """s' = c * m_k(s) with k = choose_window(s, alpha) and c = min(1, alpha * sum(s) / sum(m_k(s)))."""
    if s.numel() == 0:
        return s.clone()
    total = s.double().sum()
    if alpha == 0.0 or total == 0:
        return torch.zeros_like(s)
    mean = window_mean(s.double(), choose_window(s, alpha))
    scale = torch.clamp(alpha * total / mean.sum(), max=1.0)
    return (scale * mean).to(s.dtype)


# ---------------------------------------------------------------- all matrices of a model

@dataclass
class UpdateSpectrum:
    """One matrix's update Delta (m, n) = U diag(s) V^T, cut to its numerical rank r.

    Only the singular vectors of the short side are kept: V when m >= n, U when m < n. The other side
    is Delta's own: U diag(s') V^T = Delta V diag(s'/s) V^T = U diag(s'/s) U^T Delta.
    """

    s: Tensor  # (r,) descending, all > 0
    basis: Tensor  # (n, r) right singular vectors V, or (m, r) left ones U when `left`
    left: bool


def _numerical_rank(s: Tensor) -> Tensor:
    """Per row of s (B, q), descending: how many values exceed RANK_RTOL * s_1."""
    return (s > RANK_RTOL * s[:, :1]).sum(dim=1)


def _gram_svd(deltas: Tensor, left: bool) -> tuple[Tensor, Tensor]:
    """Singular values (B, q) and short-side singular vectors (B, q, q) from the float64 Gram matrix."""
    d = deltas.double()
    gram = d @ d.mT if left else d.mT @ d  # (B, q, q), q = the short side
    eigenvalues, vectors = torch.linalg.eigh(gram)  # ascending
    return eigenvalues.flip(-1).clamp(min=0).sqrt(), vectors.flip(-1)


def _sketch_svd(deltas: Tensor, width: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Randomized range finder: singular values (B, w) and right vectors (B, n, w), exact for rank < width."""
    d = deltas.double()
    b, m, n = d.shape
    omega = torch.randn(b, n, width, generator=generator, device=d.device, dtype=d.dtype)
    q, _ = torch.linalg.qr(d @ omega)  # (B, m, w) orthonormal basis of the sampled range
    _, s, vh = torch.linalg.svd(q.mT @ d, full_matrices=False)  # (B, w, n) = Q^T Delta
    return s, vh.mT


def _matrix_view(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


def _on_device(t: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(out, rest) view of `t` on `device` in `dtype`: moved in its stored dtype, widened there."""
    return _matrix_view(t).to(device).to(dtype)


def decompose_updates(old: StateDict, new: StateDict, *, rank: int | None = None,
                      device: str | torch.device | None = None,
                      log: Callable[[str], None] | None = None) -> dict[str, UpdateSpectrum]:
    """SVD of W_new - W_old for every floating tensor of two or more dimensions, batched by shape.

    `rank` is a hint that the updates have rank <= rank (a merged LoRA): each is then sketched with
    rank + 8 random columns, QR-orthonormalised and the small (rank+8, n) matrix decomposed, which is
    exact for such an update and far cheaper. An update the sketch does not capture (a matrix trained in
    full, or a low-rank update stored in bf16, whose rounding noise is full rank) gets the full path.
    `device` defaults to CUDA when available; the spectra stay there.
    """
    check_state_dicts(old, new)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    groups: dict[tuple[int, int, torch.dtype], list[str]] = {}
    for key, tensor in old.items():
        if tensor.is_floating_point() and tensor.dim() >= 2:
            rows, cols = _matrix_view(tensor).shape
            groups.setdefault((rows, cols, _compute_dtype(tensor.dtype)), []).append(key)
    generator = torch.Generator(device=device)
    generator.manual_seed(0)
    spectra: dict[str, UpdateSpectrum] = {}
    for (rows, cols, dtype), keys in groups.items():
        start = time.perf_counter()
        per_call = max(1, MAX_BATCH_ELEMENTS // (rows * cols))
        width = rank + SKETCH_OVERSAMPLING if rank is not None else None
        sketched = 0
        for first in range(0, len(keys), per_call):
            chunk = keys[first:first + per_call]
            deltas = torch.stack([_on_device(new[k], device, dtype) - _on_device(old[k], device, dtype)
                                  for k in chunk])  # (B, rows, cols)
            todo = list(range(len(chunk)))
            if width is not None and width < min(rows, cols):
                s, vectors = _sketch_svd(deltas, width, generator)
                ranks = _numerical_rank(s)
                for i in range(len(chunk)):
                    if ranks[i] < width:  # the sketch spans the whole update
                        r = int(ranks[i])
                        spectra[chunk[i]] = UpdateSpectrum(s[i, :r].to(dtype), vectors[i, :, :r].to(dtype), False)
                        todo.remove(i)
                        sketched += 1
            if todo:
                left = rows < cols
                s, vectors = _gram_svd(deltas[todo], left)
                ranks = _numerical_rank(s)
                for j, i in enumerate(todo):
                    r = int(ranks[j])
                    spectra[chunk[i]] = UpdateSpectrum(s[j, :r].to(dtype), vectors[j, :, :r].to(dtype), left)
            del deltas
        if log is not None:
            how = f", {sketched} by the low-rank sketch" if rank is not None else ""
            log(f"  svd of {len(keys)} update(s) of shape ({rows}, {cols}) on {device}{how}: "
                f"{time.perf_counter() - start:.1f} s")
    return spectra


def _rescale_update(delta: Tensor, spectrum: UpdateSpectrum, s_new: Tensor) -> Tensor:
    """U diag(s_new) V^T from Delta and its short-side vectors, in the cheaper order for the rank."""
    basis = spectrum.basis
    ratio = s_new / spectrum.s  # (r,) each in [0, 1]
    low_rank = 2 * basis.shape[1] <= basis.shape[0]
    if spectrum.left:  # basis U (m, r): U diag(ratio) U^T Delta
        return basis @ (ratio[:, None] * (basis.T @ delta)) if low_rank else ((basis * ratio) @ basis.T) @ delta
    return ((delta @ basis) * ratio) @ basis.T if low_rank else delta @ ((basis * ratio) @ basis.T)


def sac_from_spectra(old: StateDict, new: StateDict, spectra: Mapping[str, UpdateSpectrum],
                     alpha: float) -> dict[str, Tensor]:
    """The SAC model for one alpha from precomputed spectra; tensors without a spectrum get ModelMix."""
    _check_alpha(alpha)
    if alpha in (0.0, 1.0):  # s' = 0 and s' = s: the old and the new model, without round-off
        return modelmix(old, new, alpha)
    out = {}
    for key, tensor in old.items():
        spectrum = spectra.get(key)
        if spectrum is None:
            out[key] = _mix(tensor, new[key], alpha)
            continue
        device, dtype = spectrum.basis.device, spectrum.basis.dtype
        base = _on_device(tensor, device, dtype)  # (m, n)
        delta = _on_device(new[key], device, dtype) - base
        update = _rescale_update(delta, spectrum, consolidate_spectrum(spectrum.s, alpha))
        out[key] = (base + update).reshape(tensor.shape).to(tensor.dtype).to(tensor.device)
    return out


def sac(old: StateDict, new: StateDict, alpha: float, *, rank: int | None = None,
        device: str | torch.device | None = None) -> dict[str, Tensor]:
    """Spectral-Aware Consolidation (LLaVA-c section 4.1) of `new` into `old` with mix ratio `alpha`."""
    _check_alpha(alpha)
    if alpha in (0.0, 1.0):
        return modelmix(old, new, alpha)
    return sac_from_spectra(old, new, decompose_updates(old, new, rank=rank, device=device), alpha)
