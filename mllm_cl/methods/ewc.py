"""Elastic Weight Consolidation (Kirkpatrick et al., 2017), online variant (Schwarz et al., 2018).

After each task the diagonal Fisher information is estimated from squared gradients of the task loss
(empirical Fisher, averaged over `fisher_batches` batches) and folded into a running estimate,
F <- decay * F + F_task; the anchor theta* becomes the weights at the end of the task. While later tasks are
learned the loss gains  weight / 2 * sum_i F_i (theta_i - theta*_i)^2.
"""

from __future__ import annotations

from typing import Any

import torch

from mllm_cl.methods.base import Method, TaskContext


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


class EWC(Method):
    name = "ewc"
    order = 60  # after LoRA has merged, so the Fisher is estimated on plain weights

    def __init__(self, weight: float = 100.0, decay: float = 0.9, fisher_batches: int = 16) -> None:
        self.weight, self.decay, self.fisher_batches = weight, decay, fisher_batches
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def loss(self, ctx: TaskContext, batch: dict, output: Any, loss: torch.Tensor) -> torch.Tensor:
        if not self.fisher:
            return loss
        params = dict(ctx.model.named_parameters())
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
        for batch in ctx.task_batches(self.fisher_batches):
            ctx.model.zero_grad(set_to_none=True)
            ctx.loss_fn(ctx.model, batch).backward()
            for n, p in params.items():
                if p.grad is not None:
                    estimate[n] += p.grad.float().pow(2)
            count += 1
        ctx.model.zero_grad(set_to_none=True)
        ctx.model.train(was_training)
        if count == 0:
            raise ValueError(f"ewc: task {ctx.task_name!r} gave no batch to estimate the Fisher")
        for n, value in estimate.items():
            value /= count
            self.fisher[n] = self.decay * self.fisher[n] + value if n in self.fisher else value
            self.anchor[n] = params[n].detach().float().clone()
        ctx.log["ewc_fisher_mean"] = float(torch.cat([f.flatten() for f in self.fisher.values()]).mean())
