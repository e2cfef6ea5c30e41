"""The two ablations of UIR in LLaVA-c's Figure 10 (Liu et al. 2025, "Comparison with data-replay and FKL").

Both draw the same text-only inquiry batch as UIR at every step and change only the term added to the task loss:

    uir_replay:  L = weight * CE(theta; q, a(q))       a(q): theta_{t-1}'s greedy answer to inquiry q
    uir_fkl:     L = weight * mean_t KL( p(. | q_<=t; theta_{t-1}) || p(. | q_<=t; theta) )

Replay needs answers, and the inquiry files hold questions only (as paper 2's did: it "assigns them synthetic
target labels"), so the synthetic label of an inquiry is the frozen previous model's greedy answer, generated
once per inquiry and task and kept for the task. The KL is over the next-token distributions at every real
(non-padding) inquiry token, averaged over those tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mllm_cl.config import IGNORE_INDEX
from mllm_cl.data import collate
from mllm_cl.generation import generate
from mllm_cl.losses import causal_lm_loss
from mllm_cl.methods.base import TaskContext
from mllm_cl.methods.uir import UIR


def forward_kl(new_logits: torch.Tensor, old_logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """KL(softmax(old) || softmax(new)) per real token, averaged; logits (B, T, V), attention_mask (B, T)."""
    keep = attention_mask.bool()
    new = F.log_softmax(new_logits[keep].float(), dim=-1)  # (n_real, V)
    old = F.log_softmax(old_logits[keep].float(), dim=-1)
    return F.kl_div(new, old, log_target=True, reduction="batchmean")


class UIRForwardKL(UIR):
    name = "uir_fkl"

    def inquiry_term(self, ctx: TaskContext, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        current = ctx.model.llm(input_ids, mask).logits  # (B, T, V)
        with torch.no_grad():
            previous = ctx.previous_model().llm(input_ids, mask).logits
        return forward_kl(current, previous, mask)


class UIRReplay(UIR):
    name = "uir_replay"

    def __init__(self, weight: float = 1.0, max_answer_tokens: int = 32) -> None:
        super().__init__(weight)
        if max_answer_tokens < 1:
            raise ValueError(f"uir_replay.max_answer_tokens must be >= 1, got {max_answer_tokens}")
        self.max_answer_tokens = max_answer_tokens
        self.answers: dict[tuple[int, ...], torch.Tensor] = {}  # inquiry ids -> theta_{t-1}'s answer ids

    def before_task(self, ctx: TaskContext) -> None:
        super().before_task(ctx)
        self.answers = {}  # a new theta_{t-1}: its answers are generated again

    def inquiry_term(self, ctx: TaskContext, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        prompts = [row[keep.bool()] for row, keep in zip(input_ids, mask)]
        self.answer_new_inquiries(ctx, prompts)
        samples = []
        for prompt in prompts:
            answer = self.answers[tuple(prompt.tolist())]
            samples.append({"input_ids": torch.cat([prompt, answer]), "pixel_values": None,
                            "labels": torch.cat([torch.full_like(prompt, IGNORE_INDEX), answer])})
        batch = collate(samples, pad_id=0)  # the pad id is never attended to nor scored
        logits = ctx.model.llm(batch["input_ids"].to(ctx.device), batch["attention_mask"].to(ctx.device)).logits
        return causal_lm_loss(logits, batch["labels"].to(ctx.device))

    def answer_new_inquiries(self, ctx: TaskContext, prompts: list[torch.Tensor]) -> None:
        """Greedy answers of the frozen previous model to the prompts not answered yet in this task."""
        new = list({tuple(p.tolist()): p for p in prompts if tuple(p.tolist()) not in self.answers}.items())
        if not new:
            return
        batch = collate([{"input_ids": p, "pixel_values": None} for _, p in new], pad_id=0)
        llm = ctx.previous_model().llm
        eos = llm.config.eos_token_id
        out = generate(llm, batch["input_ids"].to(ctx.device), batch["attention_mask"].to(ctx.device),
                       max_new_tokens=self.max_answer_tokens, stop_ids=() if eos is None else (eos,))
        for (key, _), tokens, length in zip(new, out.tokens, out.lengths.tolist()):
            self.answers[key] = tokens[:length].clone()
