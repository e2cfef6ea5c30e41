"""LoRA as a CL method (paper 1): adapters on every linear layer of the LLM except the output head; only the
adapters and the projector train; merged after each task so the next task starts from a plain model.

Defaults from paper 1's code: rank = hidden_size / 2, rsLoRA scaling alpha / sqrt(rank) with alpha = 8,
dropout 0.05. The adapter maths is in `lora_layers.py`.
"""

from __future__ import annotations

from mllm_cl.methods.base import Method, TaskContext
from mllm_cl.methods.lora_layers import add_lora, merge_lora


class LoRA(Method):
    name = "lora"
    order = 10

    def __init__(self, rank: int | None = None, alpha: float = 8.0, dropout: float = 0.05, rslora: bool = True) -> None:
        if rank is not None and not 1 <= rank < 2 ** 20:
            raise ValueError(f"lora.rank must be a positive integer (or null: hidden_size / 2), got {rank}")
        if not alpha > 0 or not 0 <= dropout < 1:
            raise ValueError(f"lora.alpha must be > 0 and lora.dropout in [0, 1), got {alpha} and {dropout}")
        self.rank, self.alpha, self.dropout, self.rslora = rank, alpha, dropout, rslora

    def before_task(self, ctx: TaskContext) -> None:
        llm = ctx.model.llm
        rank = self.rank or max(1, llm.config.d_model // 2)
        llm.requires_grad_(False)
        add_lora(llm, rank, self.alpha, self.dropout, self.rslora)
        ctx.log["lora_rank"] = rank

    def after_task(self, ctx: TaskContext) -> None:
        merged = merge_lora(ctx.model.llm)
        ctx.model.llm.requires_grad_(True)
        ctx.log["lora_merged_layers"] = merged
