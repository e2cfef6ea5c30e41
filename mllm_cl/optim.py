"""AdamW with per-prefix learning rates and no weight decay on biases and norms; warmup then cosine decay.

This is the LLaVA recipe (Hugging Face Trainer defaults): decay 2-D weights only, a linear warmup over
`warmup_ratio` of the steps, then a half cosine down to `min_ratio` of the base learning rate.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable

import torch
from torch import nn


def embedding_param_names(model: nn.Module) -> set[str]:
    """Names of the weights of every `nn.Embedding` in `model` (pass as `no_decay_names` to exempt them)."""
    return {f"{name}.weight" if name else "weight" for name, m in model.named_modules() if isinstance(m, nn.Embedding)}


def build_optimizer(named_params: Iterable[tuple[str, torch.Tensor]], groups: dict[str, float],
                    weight_decay: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                    no_decay_names: Collection[str] = (), fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over `named_params`, two param groups (decay / no decay) per prefix of `groups`.

    `groups` maps a parameter-name prefix to its learning rate, e.g. {"projector.": 2e-5, "llm.": 2e-5};
    a param takes the longest prefix it starts with ("" matches everything). Params with fewer than
    2 dims (biases, norm weights) and those in `no_decay_names` get no weight decay. `fused`: None
    picks the fused CUDA kernel when every param is on a GPU and the multi-tensor `foreach` path
    otherwise. Each group carries "prefix" and "base_lr" for `set_lr`.
    """
    named_params = [(n, p) for n, p in named_params if p.requires_grad]
    if not named_params:
        raise ValueError("build_optimizer: no trainable parameter was given")
    by_group: dict[tuple[str, bool], list[torch.Tensor]] = {}
    unmatched = []
    for name, p in named_params:
        prefixes = [prefix for prefix in groups if name.startswith(prefix)]
        if not prefixes:
            unmatched.append(name)
            continue
        decay = p.ndim >= 2 and name not in no_decay_names
        by_group.setdefault((max(prefixes, key=len), decay), []).append(p)
    if unmatched:
        raise ValueError(f"trainable params {unmatched[:5]}{' ...' if len(unmatched) > 5 else ''} match no "
                         f"learning-rate prefix in {sorted(groups)}; add their prefix (or \"\" for all the rest)")
    param_groups = [{"params": params, "lr": groups[prefix], "base_lr": groups[prefix], "prefix": prefix,
                     "weight_decay": weight_decay if decay else 0.0}
                    for (prefix, decay), params in by_group.items()]
    if fused is None:
        fused = all(p.is_cuda and p.is_floating_point() for _, p in named_params)
    if fused:
        return torch.optim.AdamW(param_groups, betas=betas, eps=eps, fused=True)
    return torch.optim.AdamW(param_groups, betas=betas, eps=eps, foreach=True)


def warmup_steps(total: int, warmup_ratio: float) -> int:
    return math.ceil(total * warmup_ratio)


def lr_at(step: int, total: int, base_lr: float, warmup_ratio: float, min_ratio: float = 0.0) -> float:
    """Learning rate of optimizer step `step` (0-based) of `total`.

    Warmup: base_lr * (step + 1) / W for the first W = ceil(total * warmup_ratio) steps (the first
    step already moves the weights). Then cosine: min + (base - min) * (1 + cos(pi * p)) / 2 with
    p = (step - W) / (total - W), going from base_lr at step W towards min_ratio * base_lr.
    """
    if not 0 <= step < total:
        raise ValueError(f"step {step} is outside 0..{total - 1}")
    warmup = warmup_steps(total, warmup_ratio)
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    min_lr = base_lr * min_ratio
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, step: int, total: int, warmup_ratio: float,
           min_ratio: float = 0.0) -> None:
    """Set every param group's lr for `step` from its own "base_lr"."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, total, group["base_lr"], warmup_ratio, min_ratio)
