"""The spectrum of a task's update, per matrix type: how many singular values carry most of it.

Spectral-Aware Consolidation (LLaVA-c, Liu et al., 2025, paper 2, section 4.1) acts on the singular values of
each weight matrix's update Delta = W_new - W_old. How concentrated those values are decides how far SAC can
differ from ModelMix: an update carried by a few directions leaves SAC's windows much to reshape, a flat one
(every window the same) makes SAC equal ModelMix. For every 2-D weight of the LLM and projector (the vision
tower is frozen and left out), with s the update's singular values (descending, cut to the numerical rank of
`mllm_cl.consolidation.numerical_rank`):

    k = the smallest k with s_1 + ... + s_k >= NUCLEAR_SHARE * (s_1 + ... + s_r)    (0 for an all-zero update)

and per matrix type (the parameter name with its layer index replaced by `*`, so the same weight of every
layer is one type): how many matrices, their shape, the mean, min and max of k and the mean numerical rank.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from mllm_cl.consolidation import StateDict, Tensor, check_state_dicts
from mllm_cl.spectral import UpdateSpectrum, decompose_updates

NUCLEAR_SHARE = 0.9  # the share of the update's nuclear norm that k singular values must carry
FROZEN_PREFIXES = ("vision.",)  # the vision tower is never trained nor consolidated
_LAYER_INDEX = re.compile(r"(?<![^.])(blocks|layers)\.\d+(?=\.)")  # "blocks.3" / "layers.3" as whole names


def matrix_type(name: str) -> str:
    """The parameter name with its layer index replaced by `*`: llm.blocks.3.attn.qkv.weight ->
    llm.blocks.*.attn.qkv.weight. Other indices (projector.0 vs projector.2, different layers) are kept."""
    return _LAYER_INDEX.sub(r"\1.*", name)


def update_matrices(state: StateDict) -> dict[str, tuple[int, int]]:
    """Name -> shape of every 2-D floating weight outside the vision tower: the matrices whose spectrum counts."""
    return {name: (int(t.shape[0]), int(t.shape[1])) for name, t in state.items()
            if t.is_floating_point() and t.dim() == 2 and not name.startswith(FROZEN_PREFIXES)}


def directions_for_share(s: Tensor, share: float = NUCLEAR_SHARE) -> int:
    """The smallest k with sum(s[:k]) >= share * sum(s), for descending singular values s; 0 when they are all
    zero (or there are none)."""
    s = s.detach().double().cpu()
    total = float(s.sum())
    if total <= 0.0:
        return 0
    return min(s.numel(), int((torch.cumsum(s, 0) < share * total).sum()) + 1)


def spectrum_stats(spectra: Mapping[str, UpdateSpectrum], shapes: Mapping[str, tuple[int, int]],
                   share: float = NUCLEAR_SHARE) -> dict[str, dict[str, Any]]:
    """Per matrix type of the matrices in `shapes` (name -> shape): {"matrices", "shape", "k_mean", "k_min",
    "k_max", "rank_mean"}, k by `directions_for_share`, the rank that of the spectra (already cut to the
    numerical rank by `decompose_updates`). A matrix without a spectrum or with an all-zero update has k = 0
    and rank 0. A type whose matrices differ in shape is split, the shape appended to its name."""
    found: dict[str, dict[str, Any]] = {}
    for name, shape in shapes.items():
        s = spectra[name].s if name in spectra else torch.zeros(0)
        kind = matrix_type(name)
        group = found.setdefault(kind, {"shape": list(shape), "k": [], "rank": []})
        if group["shape"] != list(shape):
            group = found.setdefault(f"{kind} ({shape[0]}x{shape[1]})", {"shape": list(shape), "k": [], "rank": []})
        group["k"].append(directions_for_share(s, share))
        group["rank"].append(int(s.numel()))
    return {kind: {"matrices": len(g["k"]), "shape": g["shape"], "k_mean": sum(g["k"]) / len(g["k"]),
                   "k_min": min(g["k"]), "k_max": max(g["k"]), "rank_mean": sum(g["rank"]) / len(g["rank"])}
            for kind, g in sorted(found.items())}


def update_spectrum(old: StateDict, new: StateDict, share: float = NUCLEAR_SHARE,
                    device: str | torch.device | None = None) -> dict[str, dict[str, Any]]:
    """`spectrum_stats` of the update new - old (name -> tensor each) over the matrices of `update_matrices`,
    with the SVDs of `mllm_cl.spectral.decompose_updates` (on `device`, by default CUDA when available)."""
    check_state_dicts(old, new)
    shapes = update_matrices(old)
    spectra = decompose_updates({k: old[k] for k in shapes}, {k: new[k] for k in shapes}, device=device)
    return spectrum_stats(spectra, shapes, share)
