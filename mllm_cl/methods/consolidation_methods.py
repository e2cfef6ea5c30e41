"""ModelMix and Spectral-Aware Consolidation (LLaVA-c) as CL methods: after each task, the weights the task
produced are consolidated with the weights it started from, theta_t = consolidate(theta_{t-1}, theta_hat_t,
alpha). The maths is in `mllm_cl.consolidation` (SAC runs on the fast engine, `mllm_cl.spectral`); the frozen
vision tower is never touched. Under torchrun rank 0 consolidates (on the full fp32 weights every rank holds) and
sends the result to the others.
"""

from __future__ import annotations

import torch

from mllm_cl import consolidation, distributed, spectral
from mllm_cl.methods.base import Method, TaskContext


class ModelMixMethod(Method):
    name = "modelmix"
    order = 90  # last: after LoRA has merged its adapters into the weights

    def __init__(self, alpha: float = 0.2) -> None:
        try:
            consolidation.check_alpha(alpha)
        except ValueError:
            raise ValueError(f"{self.name}.alpha must be in [0, 1], got {alpha}") from None
        self.alpha = alpha

    def consolidate(self, old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return consolidation.modelmix(old, new, self.alpha)

    def after_task(self, ctx: TaskContext) -> None:
        if not ctx.start_state:
            raise RuntimeError(f"{self.name}: the stage did not record the weights the task started from")
        state = ctx.model.state_dict()
        new = {k: state[k].detach() for k in ctx.start_state}
        if distributed.is_main():
            # the trainer hands the model back in full precision (its fp32 masters), so nothing here is rounded
            old = {k: v.to(new[k].device, new[k].dtype) for k, v in ctx.start_state.items()}
            merged = self.consolidate(old, new)
            with torch.no_grad():
                for key, value in merged.items():
                    state[key].copy_(value)
        distributed.broadcast_tensors(list(new.values()))
        ctx.log[f"{self.name}_alpha"] = self.alpha


class SACMethod(ModelMixMethod):
    """`rule`: which reading of LLaVA-c eq 7 picks the window, "nuclear" or "top" (see mllm_cl.consolidation)."""

    name = "sac"

    def __init__(self, alpha: float = 0.2, rule: str = "nuclear") -> None:
        super().__init__(alpha)
        if rule not in consolidation.RULES:
            raise ValueError(f"sac.rule must be one of {', '.join(consolidation.RULES)}, got {rule!r}")
        self.rule = rule

    def consolidate(self, old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return spectral.sac(old, new, self.alpha, self.rule)
