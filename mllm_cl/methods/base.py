"""The one hook interface every CL method implements, and the per-task context it sees.

A method touches training only through these hooks, which the continual stage (`mllm_cl.continual`) calls
Avalanche-style, for each task t, every method in `order`:

    before_task(ctx)                  once, before training on task t (adapters, replayed samples)
    loss(ctx, batch, output, loss)    every micro-batch: returns the task loss plus the method's term
    after_task(ctx)                   once, after training on task t (merging, consolidation, Fisher, buffers)

The registry of methods by name is in `mllm_cl.methods` (the package's __init__).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn


@dataclass
class TaskContext:
    """What a method may read or change while one task is learned."""

    task_index: int  # 0 for the first continual task (the LLM's text pre-training is not in this list)
    task_name: str
    model: nn.Module  # the LlavaModel being trained
    train_samples: list[Any]  # rendered samples of this task; rehearsal appends replayed ones before training
    device: torch.device
    compute_dtype: torch.dtype = torch.float32
    loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None  # the task's cross-entropy on one batch
    task_batches: Callable[[int], Iterator[dict]] | None = None  # n batches of this task's data (for Fisher)
    inquiry_batches: Callable[[], Iterator[dict]] | None = None  # endless text-only inquiry batches (UIR)
    log: dict[str, float] = field(default_factory=dict)  # figures a method reports for this task
    start_state: dict[str, torch.Tensor] = field(default_factory=dict)  # theta_{t-1}, see take_start_state
    _previous: nn.Module | None = None

    def previous_model(self) -> nn.Module:
        """A frozen copy of the model as it was when the task began, in the compute dtype.

        Built once per task and shared by every method that needs it (UIR, LwF); the frozen vision tower is
        shared with the trained model, not copied.
        """
        if self._previous is None:
            raise RuntimeError("previous_model() is available only after snapshot_previous() in before_task")
        return self._previous

    def snapshot_previous(self) -> nn.Module:
        if self._previous is None:
            vision = getattr(self.model, "vision", None)
            memo = {id(vision): vision} if vision is not None else {}
            frozen = copy.deepcopy(self.model, memo)
            for name, module in frozen.named_children():
                if module is not vision:
                    module.to(self.compute_dtype)
            frozen.eval().requires_grad_(False)
            self._previous = frozen
        return self._previous

    def take_start_state(self) -> None:
        """Keep CPU copies of the LLM's and projector's weights as the task begins (before any adapter)."""
        self.start_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()
                            if not k.startswith("vision.")}


class Method:
    """Base class: every hook does nothing, which is exactly naive fine-tuning (the LLaVA recipe)."""

    name = "naive"
    needs_previous = False  # True: the stage builds ctx.previous_model() before any before_task hook
    needs_logits = False  # True: `loss` reads output.logits (otherwise they may be None: see losses.forward_loss)
    needs_inquiries = False  # True: the stage must name text-only `inquiries` (checked before anything runs)
    order = 50  # hooks run by increasing order: LoRA adapts (10) first, consolidation (90) after it has merged

    def before_task(self, ctx: TaskContext) -> None:
        pass

    def loss(self, ctx: TaskContext, batch: dict, output: Any, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def after_task(self, ctx: TaskContext) -> None:
        pass
