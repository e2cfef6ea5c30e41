"""The fast engine for Spectral-Aware Consolidation: the rule of `mllm_cl.consolidation`, with batched SVDs.

The SVDs do not depend on alpha: `decompose_updates` computes them once (on the GPU when there is one,
batched over parameters of the same shape) and `sac_from_spectra` turns them into a model for any alpha,
so an alpha sweep costs one set of SVDs. Each SVD comes from the eigendecomposition of the Gram matrix of
the update's short side (n x n for an (m, n) update with m >= n), formed in float64 (much cheaper than a
full SVD of the update; `bench/consolidate_speed.py` times it), and in float64 the squaring loses nothing
that matters (singular values are exact to ~1e-7 of s_1; the numerical
rank is cut at RANK_RTOL of s_1, and the directions below it, round-off, are left out of the update). The new
weights are rebuilt in float32 (float64 for float64 parameters) and cast back to each parameter's dtype.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from mllm_cl.consolidation import (StateDict, Tensor, check_state_dicts, compute_dtype, consolidate_model,
                                   consolidate_spectrum, is_matrix, matrix_view, mix, numerical_rank)
from mllm_cl.device import resolve_device

# Extra sketch columns for the low-rank path: the sketch of a rank-r update has r + 8 columns.
SKETCH_OVERSAMPLING = 8
# The largest stack of same-shaped updates decomposed in one batched call, in elements (512 MiB in float64).
MAX_BATCH_ELEMENTS = 2**26


@dataclass
class UpdateSpectrum:
    """One matrix's update Delta (m, n) = U diag(s) V^T, cut to its numerical rank r.

    Only the singular vectors of the short side are kept: V when m >= n, U when m < n. The other side
    is Delta's own: U diag(s') V^T = Delta V diag(s'/s) V^T = U diag(s'/s) U^T Delta.
    """

    s: Tensor  # (r,) descending, all > 0
    basis: Tensor  # (n, r) right singular vectors V, or (m, r) left ones U when `left`
    left: bool


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


def _on_device(t: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(out, rest) view of `t` on `device` in `dtype`: moved in its stored dtype, widened there."""
    return matrix_view(t).to(device).to(dtype)


def _decompose_batch(deltas: Tensor, dtype: torch.dtype, width: int | None,
                     generator: torch.Generator) -> tuple[list[UpdateSpectrum], int]:
    """The spectra of same-shaped updates (B, m, n), and how many came from the sketch of `width` columns."""
    spectra: list[UpdateSpectrum | None] = [None] * len(deltas)
    if width is not None and width < min(deltas.shape[1:]):
        s, vectors = _sketch_svd(deltas, width, generator)
        for i, r in enumerate(numerical_rank(s).tolist()):
            if r < width:  # the sketch spans the whole update
                spectra[i] = UpdateSpectrum(s[i, :r].to(dtype), vectors[i, :, :r].to(dtype), False)
    todo = [i for i, spectrum in enumerate(spectra) if spectrum is None]
    if todo:
        left = deltas.shape[1] < deltas.shape[2]
        s, vectors = _gram_svd(deltas[todo], left)
        for j, (i, r) in enumerate(zip(todo, numerical_rank(s).tolist())):
            spectra[i] = UpdateSpectrum(s[j, :r].to(dtype), vectors[j, :, :r].to(dtype), left)
    return spectra, len(deltas) - len(todo)


def _decompose(old: StateDict, new: StateDict, rank: int | None, device: str | torch.device | None,
               log: Callable[[str], None] | None) -> dict[str, UpdateSpectrum]:
    """`decompose_updates` on state dicts already checked."""
    device = resolve_device(device)
    groups: dict[tuple[int, int, torch.dtype], list[str]] = {}
    for key, tensor in old.items():
        if is_matrix(tensor):
            rows, cols = matrix_view(tensor).shape
            groups.setdefault((rows, cols, compute_dtype(tensor.dtype)), []).append(key)
    generator = torch.Generator(device=device)
    generator.manual_seed(0)
    width = rank + SKETCH_OVERSAMPLING if rank is not None else None
    spectra: dict[str, UpdateSpectrum] = {}
    for (rows, cols, dtype), keys in groups.items():
        start = time.perf_counter()
        per_call = max(1, MAX_BATCH_ELEMENTS // (rows * cols))
        sketched = 0
        for first in range(0, len(keys), per_call):
            chunk = keys[first:first + per_call]
            deltas = torch.stack([_on_device(new[k], device, dtype) - _on_device(old[k], device, dtype)
                                  for k in chunk])  # (B, rows, cols)
            chunk_spectra, chunk_sketched = _decompose_batch(deltas, dtype, width, generator)
            spectra.update(zip(chunk, chunk_spectra))
            sketched += chunk_sketched
            del deltas
        if log is not None:
            how = f", {sketched} by the low-rank sketch" if rank is not None else ""
            log(f"  svd of {len(keys)} update(s) of shape ({rows}, {cols}) on {device}{how}: "
                f"{time.perf_counter() - start:.1f} s")
    return spectra


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
    return _decompose(old, new, rank, device, log)


def _rescale_update(delta: Tensor, spectrum: UpdateSpectrum, s_new: Tensor) -> Tensor:
    """U diag(s_new) V^T from Delta and its short-side vectors, in the cheaper order for the rank."""
    basis = spectrum.basis
    ratio = s_new / spectrum.s  # (r,) each in [0, 1]
    low_rank = 2 * basis.shape[1] <= basis.shape[0]
    if spectrum.left:  # basis U (m, r): U diag(ratio) U^T Delta
        return basis @ (ratio[:, None] * (basis.T @ delta)) if low_rank else ((basis * ratio) @ basis.T) @ delta
    return ((delta @ basis) * ratio) @ basis.T if low_rank else delta @ ((basis * ratio) @ basis.T)


def _consolidate_matrix(old: Tensor, new: Tensor, spectrum: UpdateSpectrum | None, alpha: float,
                        rule: str) -> Tensor:
    """W_old + U diag(s') V^T rebuilt where the spectrum lives; a matrix without a spectrum gets ModelMix."""
    if spectrum is None:
        return mix(old, new, alpha)
    device, dtype = spectrum.basis.device, spectrum.basis.dtype
    base = _on_device(old, device, dtype)  # (m, n)
    delta = _on_device(new, device, dtype) - base
    update = _rescale_update(delta, spectrum, consolidate_spectrum(spectrum.s, alpha, rule))
    return (base + update).reshape(old.shape).to(old.dtype).to(old.device)


def sac_from_spectra(old: StateDict, new: StateDict, spectra: Mapping[str, UpdateSpectrum],
                     alpha: float, rule: str = "nuclear") -> dict[str, Tensor]:
    """The SAC model for one alpha from precomputed spectra; tensors without a spectrum get ModelMix."""
    return consolidate_model(old, new, alpha,
                             lambda key: _consolidate_matrix(old[key], new[key], spectra.get(key), alpha, rule))


def sac(old: StateDict, new: StateDict, alpha: float, rule: str = "nuclear", *, rank: int | None = None,
        device: str | torch.device | None = None) -> dict[str, Tensor]:
    """`mllm_cl.consolidation.sac` with the SVDs of `decompose_updates` (`rank`: its low-rank hint)."""
    check_state_dicts(old, new)
    spectra = functools.cache(lambda: _decompose(old, new, rank, device, None))  # not needed at alpha 0 or 1
    return consolidate_model(old, new, alpha,
                             lambda key: _consolidate_matrix(old[key], new[key], spectra().get(key), alpha,
                                                             rule))
