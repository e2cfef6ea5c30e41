"""LoRA adapters (Hu et al., 2021) with rsLoRA scaling (Kalajdzievski, 2023), as paper 1 uses them.

    x ──► W x + b ───────────────────────────┐
    │                                         (+) ──► y
    └─► dropout ─► A (r x in) ─► B (out x r) ─┘ × alpha / sqrt(r)   (rsLoRA; plain LoRA: alpha / r)

B starts at zero, so a fresh adapter leaves the model's outputs unchanged. After a task the adapter is
merged, W <- W + scale * B A, and the layer becomes a plain `nn.Linear` again.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = True) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.base.requires_grad_(False)
        self.rank = rank
        self.scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)
        self.train(base.training)  # a layer wrapped in an eval-mode model must not start dropping out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.dropout(x) @ self.lora_a.t() @ self.lora_b.t()
        return self.base(x) + self.scale * update

    def delta_weight(self) -> torch.Tensor:
        """scale * B A in fp32: the (out, in) update this adapter adds to the base weight."""
        return self.scale * (self.lora_b.float() @ self.lora_a.float())

    def merged(self) -> nn.Linear:
        """The base layer with the update folded in, as a plain trainable `nn.Linear`."""
        with torch.no_grad():
            weight = self.base.weight.float() + self.delta_weight()
            self.base.weight.copy_(weight.to(self.base.weight.dtype))
        self.base.requires_grad_(True)
        return self.base


def add_lora(module: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = True,
             exclude: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Wrap every `nn.Linear` below `module` (except names ending in `exclude`) in place; return their names."""
    wrapped = []
    for name, child in list(module.named_modules()):
        for child_name, layer in list(child.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(layer, nn.Linear) and not full.endswith(exclude):
                setattr(child, child_name, LoRALinear(layer, rank, alpha, dropout, rslora))
                wrapped.append(full)
    if not wrapped:
        raise ValueError(f"no nn.Linear layer found to adapt in {type(module).__name__}")
    return wrapped


def merge_lora(module: nn.Module) -> int:
    """Fold every adapter below `module` into its base weight in place; return how many were merged."""
    count = 0
    for child in list(module.modules()):
        for child_name, layer in list(child.named_children()):
            if isinstance(layer, LoRALinear):
                setattr(child, child_name, layer.merged())
                count += 1
    return count


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for m in module.modules() if isinstance(m, LoRALinear) for p in (m.lora_a, m.lora_b)]


def wrap_linears(module: nn.Module, wrap: Callable[[str, nn.Linear], nn.Module],
                 exclude: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Replace every `nn.Linear` below `module` (except names ending in `exclude`) by `wrap(name, layer)` in place,
    as `add_lora` does for plain adapters; return their names. Layers the wrappers create are not visited."""
    wrapped = []
    for name, child in list(module.named_modules()):
        for child_name, layer in list(child.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(layer, nn.Linear) and not full.endswith(exclude):
                setattr(child, child_name, wrap(full, layer))
                wrapped.append(full)
    if not wrapped:
        raise ValueError(f"no nn.Linear layer found to adapt in {type(module).__name__}")
    return wrapped
