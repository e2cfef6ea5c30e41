"""Next-token losses, averaged over supervised tokens only.

`causal_lm_loss` is the LLaVA recipe's cross-entropy. With `soft_target_a > 0` it is paper 1's Soft Targets
(Srivastava et al., 2024): the one-hot target becomes 1 - a on the target token and a / (N - 1) on each of
the other N - 1 tokens, so per token

    loss = -(1 - a) * log p_y  -  a / (N - 1) * sum_{i != y} log p_i
         = -(1 - a) * log p_y  -  a / (N - 1) * (S - log p_y),     S = sum_i log p_i.

That needs only log p_y and the row sum S, never an N-wide target tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mllm_cl.config import IGNORE_INDEX


class NoSupervisedTokensError(ValueError):
    """A batch whose labels are all IGNORE_INDEX: training on it would silently learn nothing."""


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """Position t is scored against token t+1: labels shifted left by one, IGNORE_INDEX at the end (B, T).

    Shifting the labels rather than slicing the logits keeps the (B, T, V) logits contiguous, so no copy of
    the largest tensor of the step is made.
    """
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, soft_target_a: float = 0.0) -> torch.Tensor:
    """Mean next-token loss over supervised positions; logits are upcast to fp32 for the log-softmax."""
    targets = next_token_labels(labels).reshape(-1)  # (B*T,)
    keep = targets != IGNORE_INDEX
    if not bool(keep.any()):
        raise NoSupervisedTokensError("the batch has no supervised token (every label is IGNORE_INDEX)")
    logits = logits.reshape(-1, logits.size(-1)).float()  # (B*T, V)
    if soft_target_a == 0.0:
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    log_probs = torch.log_softmax(logits, dim=-1)
    n_classes = log_probs.size(-1)
    target = log_probs.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)  # (B*T,); ignored rows masked below
    others = log_probs.sum(dim=-1) - target
    per_token = -(1.0 - soft_target_a) * target - soft_target_a / (n_classes - 1) * others
    return (per_token * keep).sum() / keep.sum()


def supervised_token_count(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
