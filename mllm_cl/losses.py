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


def shift_for_next_token(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position t predicts token t+1: (B, T, V), (B, T) -> (B*(T-1), V), (B*(T-1),)."""
    logits = logits[:, :-1].reshape(-1, logits.size(-1))
    labels = labels[:, 1:].reshape(-1)
    return logits, labels


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, soft_target_a: float = 0.0) -> torch.Tensor:
    """Mean next-token loss over supervised positions; logits are upcast to fp32 for the log-softmax."""
    logits, labels = shift_for_next_token(logits, labels)
    keep = labels != IGNORE_INDEX
    if not bool(keep.any()):
        raise NoSupervisedTokensError("the batch has no supervised token (every label is IGNORE_INDEX)")
    logits, labels = logits[keep].float(), labels[keep]
    if soft_target_a == 0.0:
        return F.cross_entropy(logits, labels)
    log_probs = torch.log_softmax(logits, dim=-1)  # (n, V)
    n_classes = log_probs.size(-1)
    target = log_probs.gather(1, labels[:, None]).squeeze(1)  # (n,)
    others = log_probs.sum(dim=-1) - target
    per_token = -(1.0 - soft_target_a) * target - soft_target_a / (n_classes - 1) * others
    return per_token.mean()


def supervised_token_count(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
