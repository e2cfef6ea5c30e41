"""Continual-learning methods, each a small plug-in with hooks at fixed points of the task loop (`base.Method`).

The registry is built from the method classes themselves; `build_methods(["msgm", "rehearsal"], options)`
returns the composed list in hook order. Adding a method: subclass `Method` in a file of its own, give it a
`name`, and add the class to `_METHODS` below.
"""

from __future__ import annotations

import inspect
import math
import typing
from typing import Any

from mllm_cl.config import ConfigError, coerce_value
from mllm_cl.methods.base import Method, TaskContext
from mllm_cl.methods.consolidation_methods import ModelMixMethod, SACMethod
from mllm_cl.methods.ewc import EWC
from mllm_cl.methods.l2p import L2P
from mllm_cl.methods.lora import LoRA
from mllm_cl.methods.lwf import LwF
from mllm_cl.methods.moelora import MoELoRA
from mllm_cl.methods.olora import OLoRA
from mllm_cl.methods.rehearsal import Rehearsal
from mllm_cl.methods.soft_targets import SoftTargets
from mllm_cl.methods.uir import UIR
from mllm_cl.methods.uir_variants import UIRForwardKL, UIRReplay

_METHODS: tuple[type[Method], ...] = (Method, LoRA, SoftTargets, Rehearsal, UIR, EWC, LwF, ModelMixMethod, SACMethod,
                                      OLoRA, L2P, UIRReplay, UIRForwardKL, MoELoRA)
REGISTRY: dict[str, type[Method]] = {cls.name: cls for cls in _METHODS}

# mSGM (paper 1) is SGM without its weight-init and output-layer-freezing parts: LoRA + Soft Targets.
# LLaVA-c (paper 2) is LoRA fine-tuning (merged after each task) + UIR + SAC; its LoRA differs from paper 1's
# (rank 128, alpha 256, plain alpha / rank scaling), so a grid sets that run's `lora` options.
COMPOSITES: dict[str, tuple[str, ...]] = {"msgm": ("lora", "soft_targets"), "llava_c": ("lora", "uir", "sac")}
METHOD_NAMES: tuple[str, ...] = (*REGISTRY, *COMPOSITES)


def expand_methods(names: list[str]) -> list[str]:
    """Method names with composites replaced by their parts, duplicates dropped, first occurrence kept."""
    expanded: list[str] = []
    for name in names:
        for part in COMPOSITES.get(name, (name,)):
            if part not in REGISTRY:
                raise ConfigError(f"unknown CL method {part!r}; known: {', '.join(METHOD_NAMES)}")
            if part not in expanded:
                expanded.append(part)
    return expanded


def build_methods(names: list[str], options: dict[str, dict[str, Any]] | None = None) -> list[Method]:
    """Instantiate methods by name (composites expanded) with per-method options, sorted by hook order."""
    options = options or {}
    expanded = expand_methods(names)
    unknown_options = sorted(set(options) - set(expanded))
    if unknown_options:
        raise ConfigError(f"options given for method(s) {unknown_options} that are not in methods={expanded}; "
                          f"a composite's options go under its parts' names ({COMPOSITES})")
    methods = []
    for name in expanded:
        accepted = list(inspect.signature(REGISTRY[name]).parameters)
        given = options.get(name, {})
        if not isinstance(given, dict) or set(given) - set(accepted):
            takes = f"only {', '.join(accepted)}" if accepted else "no option"
            raise ConfigError(f"method_options[{name!r}] = {given!r}: {name} takes {takes}")
        hints = typing.get_type_hints(REGISTRY[name].__init__)
        given = {key: coerce_value(hints.get(key, Any), value, f"method_options[{name!r}].{key}")
                 for key, value in given.items()}
        bad = [key for key, value in given.items() if isinstance(value, float) and not math.isfinite(value)]
        if bad:
            raise ConfigError(f"method_options[{name!r}].{bad[0]} must be a finite number, got {given[bad[0]]}")
        try:
            methods.append(REGISTRY[name](**given))
        except ValueError as e:  # a method's own range check
            raise ConfigError(f"method_options[{name!r}]: {e}") from None
    return sorted(methods, key=lambda m: m.order)


__all__ = ["COMPOSITES", "METHOD_NAMES", "REGISTRY", "Method", "TaskContext", "build_methods", "expand_methods"]
