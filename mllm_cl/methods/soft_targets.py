"""Soft Targets (paper 1, Srivastava et al. 2024): the one-hot target becomes 1 - a / a/(N-1).

The loss itself is `mllm_cl.losses.causal_lm_loss(..., soft_target_a=a)`; this method only sets `a` for the
task. Default a = 0.01 (the paper searched 0.1, 0.01, 0.001).
"""

from __future__ import annotations

from mllm_cl.methods.base import Method, TaskContext


class SoftTargets(Method):
    name = "soft_targets"

    def __init__(self, a: float = 0.01) -> None:
        if not 0.0 <= a < 1.0:
            raise ValueError(f"soft_targets.a must be in [0, 1), got {a}")
        self.a = a

    def before_task(self, ctx: TaskContext) -> None:
        ctx.soft_target_a = self.a
