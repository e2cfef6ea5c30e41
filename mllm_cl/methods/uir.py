"""Unsupervised Inquiry Regularization (LLaVA-c, Liu et al. 2025).

While task t is learned, each training step also draws a batch of unlabeled text-only inquiries q (questions
without answers) and adds

    L_UIR = mean_q || h(q; theta) - h(q; theta_{t-1}) ||^2

where h is the LLM's final hidden layer and theta_{t-1} the frozen model from the end of the previous task.
The squared distance is averaged over the real (non-padding) tokens and the hidden dimensions, i.e. a mean
squared error; weight 1 as in the paper.
"""

from __future__ import annotations

from typing import Any

import torch

from mllm_cl.config import IMAGE_PLACEHOLDER_ID
from mllm_cl.methods.base import Method, TaskContext


def hidden_state_distance(current: torch.Tensor, previous: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens and hidden dims of (current - previous)^2; (B, T, D), (B, T, D), (B, T)."""
    keep = attention_mask.bool()
    diff = current.float()[keep] - previous.float()[keep]  # (n_real, D)
    return diff.pow(2).mean()


class UIR(Method):
    name = "uir"
    needs_previous = True
    needs_inquiries = True

    def __init__(self, weight: float = 1.0) -> None:
        if weight < 0:
            raise ValueError(f"{self.name}.weight must be >= 0, got {weight}")
        self.weight = weight
        self.inquiries = None

    def before_task(self, ctx: TaskContext) -> None:
        if ctx.inquiry_batches is None:
            raise ValueError(f"{self.name} needs text-only inquiries: set the stage's `inquiries` data file")
        self.inquiries = ctx.inquiry_batches()

    def loss(self, ctx: TaskContext, batch: dict, output: Any, loss: torch.Tensor) -> torch.Tensor:
        inquiry = next(self.inquiries)
        input_ids = inquiry["input_ids"].to(ctx.device)
        mask = inquiry["attention_mask"].to(ctx.device)
        if bool((input_ids == IMAGE_PLACEHOLDER_ID).any()):
            raise ValueError(f"{self.name} inquiries must be text-only, but a batch holds image placeholders")
        if not bool(mask.bool().any()):
            raise ValueError(f"{self.name}: an inquiry batch has no real (non-padding) token; check the inquiries file "
                             "and the template (one that drops the user's text, like 'plain', leaves every inquiry "
                             "empty)")
        term = self.inquiry_term(ctx, input_ids, mask)
        ctx.log[f"{self.name}_last"] = float(term.detach())
        return loss + self.weight * term

    def inquiry_term(self, ctx: TaskContext, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The regulariser on one inquiry batch (B, T); the ablations in `uir_variants` replace it."""
        current = ctx.model.llm.hidden_states(input_ids, mask)  # (B, T, D); no output head needed
        with torch.no_grad():
            previous = ctx.previous_model().llm.hidden_states(input_ids, mask)
        return hidden_state_distance(current, previous, mask)
