"""MoELoRA as CoIN uses it (Chen et al., 2024, "CoIN: A Benchmark of Continual Instruction tuNing for Multimodel
Large Language Model"; its code: zackschen/CoIN, peft/tuners/coinmoelora.py): a mixture of LoRA experts on every
linear layer of the LLM except the head, with a per-token softmax gate and every expert used:

    h = W0 x + s * sum_e g_e(x) B_e A_e dropout(x),   g(x) = softmax(W_g x),   s = alpha / r

E experts of rank r / E each (A_e ~ N(0, 0.01^2), B_e = 0, W_g: (E, in), nn.Linear's init, no bias); no top-k
and no balancing loss. The experts are stored stacked, A: (r, in) and B: (out, r), expert e owning rank rows
e r/E .. (e+1) r/E, so with one expert the layer is plain LoRA of rank r.

Between tasks CoIN keeps training the same experts and gate (each task's run loads the previous task's adapter
and goes on): nothing is merged (the gate depends on x, so no single W equals the layer), and `before_task`
adds the layers only once. The layer (`llava.MoELoRALinear`) is a part of the model, like L2P's prompt pool: a
saved folder holds the LLM's plain weights in llm/ and the experts beside it (moelora.safetensors), and
`load_llava` puts them back on the same layers, so evaluation and a resumed run see them; a later task that
starts without them is an error rather than a silent restart.

Defaults: CoIN's r 128, alpha 256, E 8 on Vicuna-7B's width 4096 is r/d = 1/32, alpha/r = 2, rank 16 per expert,
the same r/d and alpha/r as paper 2's LoRA; here rank = hidden_size / 32 and alpha = 2 rank (4 and 8 on the
demo's width 128, like its `lora` runs), and as many experts as divide the rank up to CoIN's 8 (4 experts of
rank 1 on the demo). Dropout 0.05, LLaVA-1.5's and CoIN's.
"""

from __future__ import annotations

import torch.nn as nn

from mllm_cl.errors import UserError
from mllm_cl.llava import MOELORA_FILE, MoELoRALinear, moelora_layers, moelora_settings
from mllm_cl.methods.base import Method, TaskContext
from mllm_cl.methods.lora_layers import wrap_linears

MOST_EXPERTS = 8  # CoIN's expert_num


class MoELoRAResumeError(UserError, RuntimeError):
    """A later task started from a model without MoELoRA experts (one saved by a run without them)."""


def add_moelora(llm: nn.Module, rank: int, alpha: float, experts: int, dropout: float = 0.0) -> list[MoELoRALinear]:
    """Wrap every linear layer of `llm` but the head in a `MoELoRALinear` with fresh experts; return the layers."""
    wrap_linears(llm, lambda name, layer: MoELoRALinear(layer, rank, alpha, experts, dropout))
    return moelora_layers(llm)


def default_experts(rank: int) -> int:
    """The most experts, up to CoIN's 8, that divide `rank`."""
    return max(e for e in range(1, MOST_EXPERTS + 1) if rank % e == 0)


class MoELoRA(Method):
    name = "moelora"
    order = 10

    def __init__(self, rank: int | None = None, alpha: float | None = None, experts: int | None = None,
                 dropout: float = 0.05) -> None:
        if rank is not None and not 1 <= rank < 2 ** 20:
            raise ValueError(f"moelora.rank must be a positive integer (or null: hidden_size / 32), got {rank}")
        if experts is not None and (experts < 1 or (rank is not None and rank % experts)):
            raise ValueError(f"moelora.experts must divide moelora.rank (or be null), got {experts} and {rank}")
        if (alpha is not None and not alpha > 0) or not 0 <= dropout < 1:
            raise ValueError(f"moelora.alpha must be > 0 (or null: 2 rank) and moelora.dropout in [0, 1), got "
                             f"{alpha} and {dropout}")
        self.rank, self.alpha, self.experts, self.dropout = rank, alpha, experts, dropout

    def settings(self, d_model: int) -> dict[str, float]:
        """The experts' rank, alpha and number for an LLM of width `d_model`, defaults resolved."""
        rank = self.rank or max(1, d_model // 32)
        return dict(rank=rank, alpha=self.alpha or 2.0 * rank, experts=self.experts or default_experts(rank))

    def before_task(self, ctx: TaskContext) -> None:
        llm = ctx.model.llm
        layers = moelora_layers(llm)
        if not layers and ctx.task_index > 0:
            raise MoELoRAResumeError(
                f"moelora: task {ctx.task_index + 1} ({ctx.task_name}) starts from a model without MoELoRA experts "
                f"(its folder has no {MOELORA_FILE}: was it saved by a run without moelora?); run the sequence "
                "again from the start in a new out_dir")
        llm.requires_grad_(False)
        wanted = self.settings(llm.config.d_model)
        if not layers:
            layers = add_moelora(llm, **wanted, dropout=self.dropout)
        found = moelora_settings(llm)
        if found != wanted:
            raise ValueError(f"the model's MoELoRA experts have {found}, but moelora is set to {wanted}: set "
                             "moelora's options to the experts'")
        for layer in layers:  # the same experts and gate go on training, task after task
            layer.dropout.p = self.dropout  # a loaded model's layers have none: dropout is not saved
            for p in (layer.lora_a, layer.lora_b, layer.gate):
                p.requires_grad_(True)
        ctx.log["moelora_rank"] = layers[0].rank
        ctx.log["moelora_experts"] = layers[0].experts

    def after_task(self, ctx: TaskContext) -> None:
        ctx.log["moelora_layers"] = len(moelora_layers(ctx.model.llm))
