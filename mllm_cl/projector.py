"""LLaVA's projector from vision features to the LLM's embedding width (`mm_projector`).

`linear` is LLaVA-1's single Linear; `mlp{N}x_gelu` is Linear(d_vision, d_llm) then N-1 times
(GELU, Linear(d_llm, d_llm)); LLaVA-1.5 uses `mlp2x_gelu`. Parameter names follow nn.Sequential
numbering (`0.weight`, `2.weight`, ...), the same as LLaVA's `mm_projector.*` keys.
"""

from __future__ import annotations

import re

import torch.nn as nn


class Projector(nn.Sequential):
    """An nn.Sequential that remembers its `kind`, so a saved LLaVA folder can name it."""

    def __init__(self, kind: str, *layers: nn.Module) -> None:
        super().__init__(*layers)
        self.kind = kind


MAX_DEPTH = 16  # mlp{N}x_gelu with N above this is a typo, not a projector (LLaVA uses N <= 2)


def projector_depth(kind: str) -> int:
    """The number of Linear layers of projector `kind`; ValueError for a kind we do not build."""
    if kind == "linear":
        return 1
    match = re.fullmatch(r"mlp(\d{1,6})x_gelu", kind) if isinstance(kind, str) else None
    if match is None or not 1 <= int(match.group(1)) <= MAX_DEPTH:
        raise ValueError(f"unknown projector kind {kind!r}: use 'linear' or 'mlp{{N}}x_gelu' with 1 <= N <= "
                         f"{MAX_DEPTH} (LLaVA-1.5: 'mlp2x_gelu')")
    return int(match.group(1))


def build_projector(kind: str, d_vision: int, d_llm: int) -> Projector:
    depth = projector_depth(kind)
    if kind == "linear":
        return Projector(kind, nn.Linear(d_vision, d_llm))
    layers: list[nn.Module] = [nn.Linear(d_vision, d_llm)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(d_llm, d_llm)]
    return Projector(kind, *layers)
