"""Next-token losses, averaged over supervised tokens only.

`causal_lm_loss` is the LLaVA recipe's cross-entropy. With `soft_target_a > 0` it is paper 1's Soft Targets
(Srivastava et al., 2024): the one-hot target becomes 1 - a on the target token and a / (N - 1) on each of
the other N - 1 tokens, so per token

    loss = -(1 - a) * log p_y  -  a / (N - 1) * sum_{i != y} log p_i
         = -(1 - a) * log p_y  -  a / (N - 1) * (S - log p_y),     S = sum_i log p_i.

That needs only log p_y and the row sum S, never an N-wide target tensor.

`head_cross_entropy` is the same hard-target loss fused with the output head: it takes the final hidden
states and the head's weight instead of the logits, and never holds the (B, T, V) logits (1.6 GB in bf16
and twice that in fp32 for 16 x 1024 tokens of a 50k vocabulary). Rows are processed a chunk at a time,
and since the loss is a mean of per-row terms, each chunk's gradient is known as soon as its logits are:

    d loss / d logits_r = (softmax(logits_r) - onehot(y_r)) / n_supervised
    d loss / d h_r = (d loss / d logits_r) @ W          d loss / d W = sum_r (d loss / d logits_r)^T h_r

so the forward pass computes both and the backward pass only scales them by the incoming gradient. Rows
whose label is ignored (prompts, image tokens) never reach the head at all.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

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


def _summed_cross_entropy(logits32: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over rows of -log softmax(logits)[target], the rows' logsumexp) of fp32 logits (rows, V)."""
    lse = torch.logsumexp(logits32, dim=-1)
    return (lse - logits32.gather(1, targets[:, None]).squeeze(1)).sum(), lse


def chunk_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor,
                        inv_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's summed cross-entropy and d(mean loss)/d logits = (softmax - onehot) * inv_n, in the logits'
    dtype. Eager, it works in place on one fp32 copy of the chunk; compiled, it becomes about two passes."""
    logits32 = logits.float()  # (rows, V)
    loss, lse = _summed_cross_entropy(logits32, targets)
    probs = logits32.sub_(lse[:, None]).exp_()  # softmax, in place of the fp32 logits
    probs[torch.arange(targets.size(0), device=targets.device), targets] -= 1.0
    return loss, probs.mul_(inv_n).to(logits.dtype)


@functools.cache
def compiled_chunk_loss_and_grad(backend: str) -> Callable:
    # inv_n is a tensor, not a number, so a new count of supervised tokens does not recompile
    return torch.compile(chunk_loss_and_grad, backend=backend, dynamic=True)


class _HeadCrossEntropy(torch.autograd.Function):
    """mean_r CE(h_r @ W^T, y_r) over the rows given, gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk_rows: int, compile_backend: str) -> torch.Tensor:
        n = hidden.size(0)
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        chunk_fn = compiled_chunk_loss_and_grad(compile_backend) if compile_backend else chunk_loss_and_grad
        inv_n = torch.full((), 1.0 / n, dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_rows):
            h, y = hidden[start:start + chunk_rows], targets[start:start + chunk_rows]
            logits = h @ weight.T  # (rows, V), in the compute dtype like the plain head
            if grad_hidden is None and grad_weight is None:
                total += _summed_cross_entropy(logits.float(), y)[0]
                continue
            loss, grad_logits = chunk_fn(logits, y, inv_n)
            total += loss
            if grad_hidden is not None:
                torch.matmul(grad_logits, weight, out=grad_hidden[start:start + chunk_rows])
            if grad_weight is not None:
                grad_weight += grad_logits.T @ h
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype))
        return total / n

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors  # a 0-dim grad_output keeps their dtype in the products
        return (None if grad_hidden is None else grad_hidden * grad_output,
                None if grad_weight is None else grad_weight * grad_output, None, None, None)


def head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                       chunk_elements: int = 2 ** 27, compile_backend: str = "") -> torch.Tensor:
    """`causal_lm_loss(hidden @ weight.T, labels)` without the full logits (see the module docstring).

    hidden (B, T, D) is the final normed hidden state, weight (V, D) the output head's. A chunk holds about
    `chunk_elements` fp32 logits (512 MB at the default). fp16 is refused: its gradients would need the loss
    scale before rounding, which this function only sees in backward; use `causal_lm_loss` there.
    `compile_backend` ("inductor"): run each chunk's softmax and gradient as one compiled kernel set.
    """
    if hidden.dtype == torch.float16:
        raise ValueError("head_cross_entropy does not support fp16 (loss scaling); use causal_lm_loss")
    targets = next_token_labels(labels).reshape(-1)
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # one host sync, as the check below needs anyway
    if rows.numel() == 0:
        raise NoSupervisedTokensError("the batch has no supervised token (every label is IGNORE_INDEX)")
    flat = hidden.reshape(-1, hidden.size(-1))
    if rows.numel() < flat.size(0):
        flat, targets = flat.index_select(0, rows), targets.index_select(0, rows)
    chunk_rows = max(1, chunk_elements // weight.size(0))
    return _HeadCrossEntropy.apply(flat, weight, targets, chunk_rows, compile_backend)


def supervised_token_count(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
