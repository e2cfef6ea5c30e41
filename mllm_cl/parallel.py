"""The training engines of a multi-process run: torch's DistributedDataParallel, or none.

The trainer calls its loss through `LossModule`, the model and the loss function as one module, so that the
engine sees every forward a step makes (a CL method's extra pass, UIR's over the inquiries, included).

DDP and the hand-written mixed precision (`mllm_cl.precision`): the model's params are cast to the compute
dtype first and DDP wraps that model, so its buckets hold bf16/fp16 grads and reduce them (the mean over ranks)
in the last micro-batch's backward of each step; `MixedPrecision.step` then moves the reduced grads into the
per-rank fp32 masters, unscales and clips them. Every rank holds the same reduced grads, so the norm each rank
computes is already the global one, and every rank takes the same step.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel


# Buffers (rotary tables) are the same on every rank: nothing to broadcast before each forward. torch 2.13
# renamed the setting, and older versions know only the first name.
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})


class LossModule(nn.Module):
    """`loss_fn(model, batch)` as the forward of one module (the unit an engine wraps)."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Any]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Any:
        return self.loss_fn(self.model, batch)


class Engine:
    """What the trainer runs each micro-batch through: `engine(batch)` is loss_fn(model, batch), and
    `engine.sync(last)` the context a micro-batch runs in: only a step's last one reduces gradients."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Any], kind: str,
                 device: torch.device) -> None:
        self.kind = kind
        module = LossModule(model, loss_fn)
        if kind == "ddp":
            module = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                             **_NO_BUFFER_SYNC)
        elif kind != "none":
            raise ValueError(f"unknown engine {kind!r}")
        self.module = module

    def __call__(self, batch: Any) -> Any:
        return self.module(batch)

    def sync(self, last: bool) -> contextlib.AbstractContextManager:
        if self.kind == "ddp" and not last:
            return self.module.no_sync()
        return contextlib.nullcontext()
