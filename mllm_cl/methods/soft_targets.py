"""Soft Targets (paper 1, Srivastava et al. 2024, section 3): the one-hot next-token target becomes 1 - a on the
target token y and a / (N - 1) on each of the other N - 1 tokens. Per supervised token, with p = softmax(z):

    L_soft = -(1 - a) log p_y - a / (N - 1) sum_{i != y} log p_i
           = L_CE + a * ( log p_y - (S - log p_y) / (N - 1) ),        S = sum_i log p_i,  L_CE = -log p_y

so the method adds the second term to the task's cross-entropy; it needs only log p_y and the row sum S,
never an N-wide target tensor. Default a = 0.01 (the paper searched 0.1, 0.01, 0.001).
"""

from __future__ import annotations

from typing import Any

import torch

from mllm_cl.config import IGNORE_INDEX
from mllm_cl.losses import NoSupervisedTokensError, next_token_labels
from mllm_cl.methods.base import Method, TaskContext


def soft_target_term(logits: torch.Tensor, labels: torch.Tensor, a: float) -> torch.Tensor:
    """L_soft - L_CE, averaged over the supervised next-token positions; logits (B, T, N), labels (B, T)."""
    targets = next_token_labels(labels).reshape(-1)
    keep = targets != IGNORE_INDEX
    if not bool(keep.any()):
        raise NoSupervisedTokensError("the batch has no supervised token (every label is IGNORE_INDEX)")
    log_probs = torch.log_softmax(logits.reshape(-1, logits.size(-1)).float(), dim=-1)  # (B*T, N)
    target = log_probs.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)  # ignored rows are masked below
    others = (log_probs.sum(dim=-1) - target) / (log_probs.size(-1) - 1)
    return a * ((target - others) * keep).sum() / keep.sum()


class SoftTargets(Method):
    name = "soft_targets"
    needs_logits = True

    def __init__(self, a: float = 0.01) -> None:
        if not 0.0 <= a < 1.0:
            raise ValueError(f"soft_targets.a must be in [0, 1), got {a}")
        self.a = a

    def loss(self, ctx: TaskContext, batch: dict, output: Any, loss: torch.Tensor) -> torch.Tensor:
        return loss + soft_target_term(output.logits, batch["labels"], self.a)
