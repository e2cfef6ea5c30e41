"""The training loss: next-token cross-entropy, averaged over supervised tokens only.

`forward_loss(model, batch)` is the one entry point every stage and the continual loop train with: it runs
the model and returns a `LossResult` (the mean loss, how many supervised tokens it covers, the model's
output for methods that read it). Below it sit two ways to compute the same number:

`causal_lm_loss` is the LLaVA recipe's cross-entropy from the logits.

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
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from mllm_cl.config import IGNORE_INDEX
from mllm_cl.errors import UserError
from mllm_cl.llava import LlavaModel


class NoSupervisedTokensError(UserError, ValueError):
    """A batch whose labels are all IGNORE_INDEX: training on it would silently learn nothing."""


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """Position t is scored against token t+1: labels shifted left by one, IGNORE_INDEX at the end (B, T).

    Shifting the labels rather than slicing the logits keeps the (B, T, V) logits contiguous, so no copy of
    the largest tensor of the step is made.
    """
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over supervised positions; logits are upcast to fp32 for the softmax."""
    targets = next_token_labels(labels).reshape(-1)  # (B*T,)
    if not bool((targets != IGNORE_INDEX).any()):
        raise NoSupervisedTokensError("the batch has no supervised token (every label is IGNORE_INDEX)")
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets, ignore_index=IGNORE_INDEX)


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


class LossResult(NamedTuple):
    """What a training loss function returns to the trainer."""

    loss: torch.Tensor  # mean over the batch's supervised tokens (or samples)
    n_tokens: int  # how many: the trainer weighs micro-batches by it
    output: Any = None  # the model's output, for methods that read it (logits None under the fused head)


def forward_loss(model: torch.nn.Module, batch: dict, need_logits: bool = False) -> LossResult:
    """The model's next-token loss on a (multimodal) batch, over its supervised tokens.

    The loss goes through `head_cross_entropy` (no full logits; `output.logits` is then None) unless
    `need_logits` or the head is one it cannot fuse (an adapter on it, fp16): then the plain head and
    `causal_lm_loss`. Both give the same number.
    """
    kwargs = {"pixel_values": batch["pixel_values"]} if batch.get("pixel_values") is not None else {}
    llm = language_model(model)
    head = fused_head_weight(llm)
    n_tokens = supervised_token_count(batch["labels"])
    if need_logits or head is None:
        output = model(batch["input_ids"], attention_mask=batch.get("attention_mask"), **kwargs)
        return LossResult(causal_lm_loss(output.logits, batch["labels"]), n_tokens, output)
    output = model(batch["input_ids"], attention_mask=batch.get("attention_mask"), compute_logits=False, **kwargs)
    loss = head_cross_entropy(output.hidden, head, batch["labels"], compile_backend=llm.compile_backend)
    return LossResult(loss, n_tokens, output)


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder LLM of a LlavaModel, or the model itself."""
    return model.llm if isinstance(model, LlavaModel) else model


def fused_head_weight(llm: torch.nn.Module) -> torch.Tensor | None:
    """The output head's weight when it is a plain bias-free Linear in bf16/fp32 (what head_cross_entropy
    computes); None otherwise (an adapter on the head, fp16)."""
    head = getattr(llm, "lm_head", None)
    if type(head) is not torch.nn.Linear or head.bias is not None or head.weight.dtype == torch.float16:
        return None
    return head.weight
