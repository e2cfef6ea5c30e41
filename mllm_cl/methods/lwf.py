"""Learning without Forgetting (Li & Hoiem, 2017), the classic distillation baseline.

On the current task's inputs, the trained model's next-token distribution is pulled towards the frozen
previous model's, with temperature T:  L = weight * T^2 * KL( softmax(z_old / T) || softmax(z_new / T) ),
averaged over the supervised positions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mllm_cl.config import IGNORE_INDEX
from mllm_cl.methods.base import Method, TaskContext


def distillation_kl(new_logits: torch.Tensor, old_logits: torch.Tensor, labels: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """T^2 * KL(p_old || p_new) per supervised next-token position, averaged; logits (B, T, V), labels (B, T)."""
    keep = labels[:, 1:] != IGNORE_INDEX
    new = new_logits[:, :-1][keep].float() / temperature
    old = old_logits[:, :-1][keep].float() / temperature
    kl = F.kl_div(F.log_softmax(new, -1), F.log_softmax(old, -1), log_target=True, reduction="batchmean")
    return kl * temperature**2


class LwF(Method):
    name = "lwf"
    needs_previous = True
    needs_logits = True

    def __init__(self, weight: float = 1.0, temperature: float = 2.0) -> None:
        if weight < 0 or not temperature > 0:
            raise ValueError(f"lwf needs weight >= 0 and temperature > 0, got {weight} and {temperature}")
        self.weight, self.temperature = weight, temperature

    def loss(self, ctx: TaskContext, batch: dict, output: Any, loss: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            old = ctx.previous_model()(batch["input_ids"], attention_mask=batch["attention_mask"],
                                       pixel_values=batch.get("pixel_values")).logits
        term = distillation_kl(output.logits, old, batch["labels"], self.temperature)
        ctx.log["lwf_last"] = float(term.detach())
        return loss + self.weight * term
