"""Rehearsal (paper 1): keep a share (default 1%) of every earlier VL task's samples and mix them into every
later task. Task 1 (the LLM's text pre-training) is never replayed: its data is not available, and it is not
in the continual task list this method sees.

The kept samples are chosen by a seeded permutation per task, so a run is reproducible. At least one sample
of each earlier task is kept when the share is positive.
"""

from __future__ import annotations

from typing import Any

import torch

from mllm_cl.methods.base import Method, TaskContext


def choose_replay(n_samples: int, share: float, seed: int, task_index: int) -> list[int]:
    """Indices of the samples of task `task_index` to keep, sorted; deterministic in (seed, task_index)."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"rehearsal share must be in [0, 1], got {share}")
    count = min(n_samples, max(1, round(share * n_samples))) if share > 0 and n_samples else 0
    generator = torch.Generator().manual_seed(seed * 1_000_003 + task_index)
    return sorted(torch.randperm(n_samples, generator=generator)[:count].tolist())


class Rehearsal(Method):
    name = "rehearsal"

    def __init__(self, share: float = 0.01, seed: int = 0) -> None:
        if not 0 <= share <= 1:
            raise ValueError(f"rehearsal.share must be in [0, 1], got {share}")
        self.share, self.seed = share, seed
        self.buffer: dict[str, list[Any]] = {}  # task name -> kept samples
        self.own_count = 0

    def before_task(self, ctx: TaskContext) -> None:
        self.own_count = len(ctx.train_samples)
        replayed = [sample for name, kept in self.buffer.items() if name != ctx.task_name for sample in kept]
        ctx.train_samples.extend(replayed)
        ctx.log["rehearsal_replayed"] = len(replayed)

    def after_task(self, ctx: TaskContext) -> None:
        own = ctx.train_samples[: self.own_count]
        keep = choose_replay(len(own), self.share, self.seed, ctx.task_index)
        self.buffer[ctx.task_name] = [own[i] for i in keep]
        ctx.log["rehearsal_kept"] = len(keep)
