"""O-LoRA (Wang et al., 2023, "Orthogonal Subspace Learning for Language Model Continual Learning").

Task t trains a new LoRA (A_t, B_t) on every linear layer of the LLM except the head; the LoRAs of tasks 1..t-1
stay in the forward pass, frozen, and the new one is pushed into a subspace orthogonal to theirs:

    h = W0 x + s * sum_{i<t} B_i A_i x' + s * B_t A_t x',   x' = dropout(x),  s = alpha / r  (plain LoRA scale)
    L = L_task + lambda1 * sum_layers sum_jk |(A_prev A_t^T)_jk| + lambda2 * sum_layers (||A_t||_2 + ||B_t||_2)

with A_prev the earlier tasks' A matrices stacked ((t-1) r x in) and ||.||_2 the Frobenius norm of each new
matrix, as the authors' code (cmnfriend/O-LoRA, uie_trainer_lora.py) computes them; lambda1 = 0.5 and
lambda2 = 0 are its scripts' values. Like that code, the earlier LoRAs are kept apart from W0 while a task trains
(stacked along the rank, frozen: they get no gradient) and the dropout mask falls on their input too. Merging
them into W0 instead would give the same forward pass without dropout and the same gradients (their update is a
constant and the penalty reads only their A's), so with dropout 0 the result would not change beyond float
rounding; with dropout it would, since the frozen updates then see the dropped-out input as the paper's do.

Saving: the continual stage saves and evaluates the model right after `after_task`, and no hook says which
task is the last, so `after_task` merges every LoRA into the weights each time (the saved folder is a plain
LLaVA, equal to the model evaluated) and keeps the stacked A's and B's here; `before_task` takes them out of
the weights again (W0 = W - s B_prev A_prev) to keep them apart. A resumed run cannot rebuild them from the
merged folders, so a task that ends with untrained adapters (the stage replaying a finished task) is an error.

Defaults: rank = hidden_size / 32 and alpha = 2 rank, paper 2's LoRA (r 128, alpha 256 on a width of 4096) at
the same r/d and alpha/r (4 and 8 on the demo's width 128, as its `lora` runs); not the `lora` method's d / 2,
since T tasks' subspaces are only orthogonal while T r <= d. Dropout 0.05, LLaVA-1.5's (the authors': 0.1).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from mllm_cl.errors import UserError
from mllm_cl.methods.base import Method, TaskContext
from mllm_cl.methods.lora_layers import wrap_linears


class OLoRAResumeError(UserError, RuntimeError):
    """O-LoRA's earlier subspaces were lost: the stage replayed a finished task on its saved, merged model."""


class OLoRALinear(nn.Module):
    """A frozen `nn.Linear` plus the frozen LoRAs of earlier tasks (stacked along the rank) and a trainable one."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 previous: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.rank, self.scale = rank, alpha / rank
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        if previous is None:
            previous = (torch.zeros(0, base.in_features), torch.zeros(base.out_features, 0))
        # frozen parameters rather than buffers: mixed precision casts them to the compute dtype with the weights
        self.previous_a = nn.Parameter(previous[0].to(**factory), requires_grad=False)  # ((t-1) r, in)
        self.previous_b = nn.Parameter(previous[1].to(**factory), requires_grad=False)  # (out, (t-1) r)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_a, a=5 ** 0.5)
        self.dropout = nn.Dropout(dropout)
        self.train(base.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropped = self.dropout(x)
        update = dropped @ self.previous_a.t() @ self.previous_b.t() + dropped @ self.lora_a.t() @ self.lora_b.t()
        return self.base(x) + self.scale * update

    def orthogonality(self) -> torch.Tensor:
        """sum_jk |(A_prev A_t^T)_jk|: zero when the new rows are orthogonal to every earlier task's."""
        return (self.previous_a @ self.lora_a.t()).abs().sum()

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every task's A and B so far, this one's last, as detached fp32 copies: ((t r, in), (out, t r))."""
        a = torch.cat([self.previous_a, self.lora_a]).detach().float()
        b = torch.cat([self.previous_b, self.lora_b], dim=1).detach().float()
        return a, b

    def merged(self) -> nn.Linear:
        """The base layer with every task's update folded in, as a plain trainable `nn.Linear`."""
        a, b = self.stacked()
        with torch.no_grad():
            weight = self.base.weight.float() + self.scale * (b @ a)
            self.base.weight.copy_(weight.to(self.base.weight.dtype))
        self.base.requires_grad_(True)
        return self.base


def olora_layers(module: nn.Module) -> dict[str, OLoRALinear]:
    return {name: m for name, m in module.named_modules() if isinstance(m, OLoRALinear)}


class OLoRA(Method):
    name = "olora"
    order = 10

    def __init__(self, rank: int | None = None, alpha: float | None = None, dropout: float = 0.05,
                 orthogonal_weight: float = 0.5, l2_weight: float = 0.0) -> None:
        if rank is not None and not 1 <= rank < 2 ** 20:
            raise ValueError(f"olora.rank must be a positive integer (or null: hidden_size / 32), got {rank}")
        if (alpha is not None and not alpha > 0) or not 0 <= dropout < 1:
            raise ValueError(f"olora.alpha must be > 0 (or null: 2 rank) and olora.dropout in [0, 1), got {alpha} "
                             f"and {dropout}")
        if orthogonal_weight < 0 or l2_weight < 0:
            raise ValueError(f"olora.orthogonal_weight and olora.l2_weight must be >= 0, got {orthogonal_weight} "
                             f"and {l2_weight}")
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.orthogonal_weight, self.l2_weight = orthogonal_weight, l2_weight
        self.previous: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # layer name -> every finished task's A, B

    def before_task(self, ctx: TaskContext) -> None:
        llm = ctx.model.llm
        rank = self.rank or max(1, llm.config.d_model // 32)
        alpha = self.alpha or 2.0 * rank

        def wrap(name: str, layer: nn.Linear) -> OLoRALinear:
            previous = self.previous.get(name)
            if previous is not None:  # take the earlier tasks' LoRAs back out of the merged weight: W0 = W - s B A
                a, b = (t.to(layer.weight.device) for t in previous)
                with torch.no_grad():
                    layer.weight.copy_((layer.weight.float() - alpha / rank * (b @ a)).to(layer.weight.dtype))
            return OLoRALinear(layer, rank, alpha, self.dropout, previous)

        llm.requires_grad_(False)
        wrapped = wrap_linears(llm, wrap)
        missing = sorted(set(self.previous) - set(wrapped))
        if missing:
            raise ValueError(f"olora: the model has lost the adapted layers {missing[:3]} of earlier tasks")
        ctx.log["olora_rank"] = rank

    def loss(self, ctx: TaskContext, batch: dict, output: Any, loss: torch.Tensor) -> torch.Tensor:
        layers = olora_layers(ctx.model.llm).values()
        orthogonal = sum(layer.orthogonality() for layer in layers)
        l2 = sum(layer.lora_a.norm() + layer.lora_b.norm() for layer in layers)
        ctx.log["olora_orthogonal_last"] = float(orthogonal.detach())
        ctx.log["olora_l2_last"] = float(l2.detach())
        return loss + self.orthogonal_weight * orthogonal + self.l2_weight * l2

    def after_task(self, ctx: TaskContext) -> None:
        layers = olora_layers(ctx.model.llm)
        if all(not bool(layer.lora_b.any()) for layer in layers.values()):
            raise OLoRAResumeError(
                f"olora: task {ctx.task_index + 1} ({ctx.task_name}) ended with untrained adapters (every B is 0): "
                "a resumed run replays finished tasks on their saved models, where the earlier tasks' LoRAs are "
                "merged and their A's lost; O-LoRA cannot resume, so run it again from the start in a new out_dir")
        for name, layer in layers.items():
            self.previous[name] = tuple(t.cpu() for t in layer.stacked())
        for parent in list(ctx.model.llm.modules()):
            for child_name, layer in list(parent.named_children()):
                if isinstance(layer, OLoRALinear):
                    setattr(parent, child_name, layer.merged())
        ctx.model.llm.requires_grad_(True)
        ctx.log["olora_merged_layers"] = len(layers)
        ctx.log["olora_rank_total"] = next(iter(self.previous.values()))[0].shape[0]
