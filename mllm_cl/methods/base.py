"""The hook interface every CL method implements, the per-task context it sees, and composition by name.

Hooks are called by the continual stage (Avalanche-style) in this order for each task t:

    before_task(ctx)                  once, before training on task t
    loss(ctx, batch, output, loss)    every micro-batch: may replace or add to the task loss
    after_task(ctx)                   once, after training on task t (merging, consolidation, Fisher, buffers)
"""

from __future__ import annotations

import copy
import inspect
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
    loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None  # plain task loss of one batch
    task_batches: Callable[[int], Iterator[dict]] | None = None  # n batches of this task's data (for Fisher)
    inquiry_batches: Callable[[], Iterator[dict]] | None = None  # endless text-only inquiry batches (UIR)
    soft_target_a: float = 0.0  # set by soft_targets; read by the task loss
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
    needs_logits = False  # True: `loss` reads output.logits (otherwise they may be None: see stages.forward_loss)
    order = 50  # after_task hooks run by increasing order: LoRA merges (10) before consolidation (90)

    def before_task(self, ctx: TaskContext) -> None:
        pass

    def loss(self, ctx: TaskContext, batch: dict, output: Any, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def after_task(self, ctx: TaskContext) -> None:
        pass


def _registry() -> dict[str, type[Method]]:
    from mllm_cl.methods.consolidation_methods import ModelMixMethod, SACMethod
    from mllm_cl.methods.ewc import EWC
    from mllm_cl.methods.lora import LoRA
    from mllm_cl.methods.lwf import LwF
    from mllm_cl.methods.rehearsal import Rehearsal
    from mllm_cl.methods.soft_targets import SoftTargets
    from mllm_cl.methods.uir import UIR

    return {cls.name: cls for cls in (Method, LoRA, SoftTargets, Rehearsal, UIR, EWC, LwF, ModelMixMethod, SACMethod)}


# mSGM (paper 1) is SGM without its weight-init and output-layer-freezing parts: LoRA + Soft Targets.
COMPOSITES = {"msgm": ("lora", "soft_targets")}
METHOD_NAMES = ("naive", "lora", "soft_targets", "rehearsal", "msgm", "uir", "ewc", "lwf", "modelmix", "sac")


def build_methods(names: list[str], options: dict[str, dict[str, Any]] | None = None) -> list[Method]:
    """Instantiate methods by name (composites expanded, duplicates dropped) with per-method options."""
    options = options or {}
    registry = _registry()
    expanded: list[str] = []
    for name in names:
        for part in COMPOSITES.get(name, (name,)):
            if part not in registry:
                raise ValueError(f"unknown CL method {part!r}; known: {', '.join(METHOD_NAMES)}")
            if part not in expanded:
                expanded.append(part)
    unknown_options = sorted(set(options) - set(expanded))
    if unknown_options:
        raise ValueError(f"options given for method(s) {unknown_options} that are not in methods={expanded}; "
                         f"a composite's options go under its parts' names ({COMPOSITES})")
    methods = []
    for name in expanded:
        accepted = list(inspect.signature(registry[name]).parameters)
        given = options.get(name, {})
        if not isinstance(given, dict) or set(given) - set(accepted):
            takes = f"only {', '.join(accepted)}" if accepted else "no option"
            raise ValueError(f"method_options[{name!r}] = {given!r}: {name} takes {takes}")
        methods.append(registry[name](**given))
    return sorted(methods, key=lambda m: m.order)
