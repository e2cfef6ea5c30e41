"""Elastic Weight Consolidation (Kirkpatrick et al., 2017), online variant (Schwarz et al., 2018).

After each task the diagonal Fisher information is estimated from squared gradients of the task loss
(empirical Fisher, averaged over `fisher_batches` batches) and folded into a running estimate,
F <- decay * F + F_task; the anchor theta* becomes the weights at the end of the task. While later tasks are
learned the loss gains  weight / 2 * sum_i F_i (theta_i - theta*_i)^2.

Under torchrun the Fisher's batches are shared out over the ranks (rank r takes batches r, r+W, ...) and the
squared gradients summed over them: every rank ends with the estimate one process computes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from mllm_cl import distributed
from mllm_cl.methods.base import Method, TaskContext
from mllm_cl.methods.lora_layers import LoRALinear


def ewc_penalty(named_params: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor],
                anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    """sum_i F_i (theta_i - theta*_i)^2 over the parameters that have a Fisher estimate (fp32)."""
    total = None
    for name, f in fisher.items():
        term = (f * (named_params[name].float() - anchor[name]).pow(2)).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("ewc_penalty: empty Fisher estimate")
    return total


def plain_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters under their plain (unadapted) names. A LoRA-wrapped layer gives its effective
    weight W + scale * B A, so the penalty on a later LoRA task reaches the adapters."""
    params = {n: p for n, p in model.named_parameters() if not n.endswith((".lora_a", ".lora_b"))}
    for name, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            params[f"{name}.weight"] = params.pop(f"{name}.base.weight") + layer.delta_weight()
            if layer.base.bias is not None:
                params[f"{name}.bias"] = params.pop(f"{name}.base.bias")
    return params


class EWC(Method):
    name = "ewc"
    # After LoRA merges (10) and consolidation (90): the Fisher and the anchor are taken on the weights the next
    # task starts from, the same weights a resumed run replays this hook on.
    order = 95

    def __init__(self, weight: float = 100.0, decay: float = 0.9, fisher_batches: int = 16) -> None:
        if weight < 0 or not 0 <= decay <= 1 or fisher_batches < 1:
            raise ValueError(f"ewc needs weight >= 0, decay in [0, 1] and fisher_batches >= 1, got {weight}, {decay} "
                             f"and {fisher_batches}")
        self.weight, self.decay, self.fisher_batches = weight, decay, fisher_batches
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def loss(self, ctx: TaskContext, batch: dict, output: Any, loss: torch.Tensor) -> torch.Tensor:
        if not self.fisher:
            return loss
        params = plain_parameters(ctx.model)
        term = 0.5 * self.weight * ewc_penalty(params, self.fisher, self.anchor)
        ctx.log["ewc_last"] = float(term.detach())
        return loss + term

    def after_task(self, ctx: TaskContext) -> None:
        if ctx.loss_fn is None or ctx.task_batches is None:
            raise ValueError("ewc needs the task's loss_fn and task_batches to estimate the Fisher")
        params = {n: p for n, p in ctx.model.named_parameters() if p.requires_grad}
        estimate = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        was_training = ctx.model.training
        ctx.model.eval()
        count = 0
        for i, batch in enumerate(ctx.task_batches(self.fisher_batches)):
            if i % distributed.world_size() != distributed.rank():
                continue
            ctx.model.zero_grad(set_to_none=True)
            ctx.loss_fn(ctx.model, batch).backward()
            for n, p in params.items():
                if p.grad is not None:
                    estimate[n] += p.grad.float().pow(2)
            count += 1
        ctx.model.zero_grad(set_to_none=True)
        ctx.model.train(was_training)
        for value in estimate.values():
            distributed.all_reduce_sum(value)
        count = int(distributed.all_reduce_sum(torch.tensor(count)))
        if count == 0:
            raise ValueError(f"ewc: task {ctx.task_name!r} gave no batch to estimate the Fisher")
        for n, value in estimate.items():
            value /= count
            self.fisher[n] = self.decay * self.fisher[n] + value if n in self.fisher else value
            self.anchor[n] = params[n].detach().float().clone()
        ctx.log["ewc_fisher_mean"] = float(torch.cat([f.flatten() for f in self.fisher.values()]).mean())
