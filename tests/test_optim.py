"""AdamW groups (decay split, per-prefix learning rates) and the warmup + cosine schedule."""

import math

import pytest
import torch
from torch import nn

from mllm_cl.optim import build_optimizer, embedding_param_names, lr_at, set_lr


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.projector = nn.Linear(4, 8)
        self.embed = nn.Embedding(10, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 10, bias=False)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def _groups(opt: torch.optim.Optimizer, model: nn.Module) -> dict[str, tuple[str, float, float]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["prefix"], g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}


def test_decay_split_and_prefix_learning_rates() -> None:
    model = Model()
    opt = build_optimizer(model.named_parameters(), {"projector.": 1e-3, "": 2e-5}, weight_decay=0.1)
    assert _groups(opt, model) == {
        "projector.weight": ("projector.", 1e-3, 0.1), "projector.bias": ("projector.", 1e-3, 0.0),
        "embed.weight": ("", 2e-5, 0.1), "norm.weight": ("", 2e-5, 0.0), "norm.bias": ("", 2e-5, 0.0),
        "head.weight": ("", 2e-5, 0.1)}  # frozen params are left out
    assert opt.defaults["foreach"] and not opt.defaults["fused"]  # CPU: the multi-tensor path

    opt = build_optimizer(model.named_parameters(), {"": 1e-3}, 0.1, no_decay_names=embedding_param_names(model))
    assert _groups(opt, model)["embed.weight"] == ("", 1e-3, 0.0)


def test_weight_decay_only_moves_decayed_params() -> None:
    model = Model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model.named_parameters(), {"": 0.5}, weight_decay=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # zero grads: Adam's update is 0, only decoupled decay p *= 1 - lr * wd acts
    for name, p in model.named_parameters():
        factor = 1 - 0.5 * 0.1 if name in ("projector.weight", "embed.weight", "head.weight") else 1.0
        assert torch.allclose(p, before[name] * factor, rtol=1e-6, atol=0), name


def test_unmatched_param_is_an_error() -> None:
    with pytest.raises(ValueError, match="match no learning-rate prefix"):
        build_optimizer(Model().named_parameters(), {"projector.": 1e-3}, weight_decay=0.0)


def test_schedule_values() -> None:
    # total 10, warmup ceil(10 * 0.2) = 2 steps, then cosine over the remaining 8
    base = 1e-3
    expected = {0: 0.5e-3, 1: 1e-3, 2: 1e-3, 6: 0.5e-3, 9: 0.5e-3 * (1 + math.cos(math.pi * 7 / 8))}
    for step, value in expected.items():
        assert lr_at(step, 10, base, 0.2) == pytest.approx(value, rel=1e-12), step
    assert lr_at(6, 10, base, 0.2, min_ratio=0.1) == pytest.approx(0.55e-3, rel=1e-12)
    assert lr_at(0, 100, base, 0.0) == base  # no warmup: start at the peak
    assert lr_at(3, 100, base, 0.03) == pytest.approx(base)  # LLaVA recipe: 3 warmup steps in 100
    with pytest.raises(ValueError):
        lr_at(10, 10, base, 0.2)


def test_set_lr_per_group() -> None:
    model = Model()
    opt = build_optimizer(model.named_parameters(), {"projector.": 1e-3, "": 2e-5}, weight_decay=0.0)
    set_lr(opt, 0, 10, 0.2)
    lrs = {g["prefix"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"projector.": pytest.approx(0.5e-3), "": pytest.approx(1e-5)}
