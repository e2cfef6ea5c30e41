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


def build_projector(kind: str, d_vision: int, d_llm: int) -> Projector:
    if kind == "linear":
        return Projector(kind, nn.Linear(d_vision, d_llm))
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"unknown projector kind {kind!r}: use 'linear' or 'mlp{{N}}x_gelu' with N >= 1 "
                         f"(LLaVA-1.5: 'mlp2x_gelu')")
    layers: list[nn.Module] = [nn.Linear(d_vision, d_llm)]
    for _ in range(int(match.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(d_llm, d_llm)]
    return Projector(kind, *layers)
