"""The training engines of a multi-process run: torch's DistributedDataParallel, FSDP2's `fully_shard`, or none.

The trainer calls its loss through `LossModule`, the model and the loss function as one module, so that the
engine sees every forward a step makes (a CL method's extra pass, UIR's over the inquiries, included).

DDP and the hand-written mixed precision (`mllm_cl.precision`): the model's params are cast to the compute
dtype first and DDP wraps that model, so its buckets hold bf16/fp16 grads and reduce them (the mean over ranks)
in the last micro-batch's backward of each step; `MixedPrecision.step` then moves the reduced grads into the
per-rank fp32 masters, unscales and clips them. Every rank holds the same reduced grads, so the norm each rank
computes is already the global one, and every rank takes the same step.

FSDP2 and the hand-written mixed precision: every block of a `blocks` list that trains is one FSDP unit, the
rest of the trainable params one more (the root). The trainable params become fp32 shards, and these shards
are the masters (`MixedPrecision(sharded=True)`): FSDP's `MixedPrecisionPolicy` gathers them in the compute
dtype for each unit's forward and backward and reduce-scatters their grads in fp32, so the optimizer state is
sharded too. Frozen params (the vision tower, LoRA's base weights) are left out of the shards: each rank keeps
them whole, in the compute dtype. The global grad norm is all-reduced in `MixedPrecision`. After training,
`Engine.finish` gathers the full fp32 weights and gives the caller's model object a plain (unsharded) structure
again, so merging adapters, consolidation, saving and evaluation see an ordinary module.
Not under FSDP: EWC's penalty (it reads every parameter outside their unit's forward), torch.compile.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mllm_cl.llm import LanguageModel



def _fsdp2() -> tuple[Any, Any]:
    """(MixedPrecisionPolicy, fully_shard), imported on first use: the import takes about a second, which every
    process start (each CLI, each worker) would pay for an engine few runs use."""
    try:  # torch >= 2.6; 2.4 and 2.5 have FSDP2 under its first name
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # pragma: no cover
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return MixedPrecisionPolicy, fully_shard


def _dtensor_module() -> Any:
    """torch's DTensor module once anything has imported it (FSDP2 has, when a tensor is sharded), else None."""
    return sys.modules.get("torch.distributed.tensor") or sys.modules.get("torch.distributed._tensor")


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a DTensor (an FSDP2 shard), without importing DTensor where no tensor can be one."""
    module = _dtensor_module()
    return module is not None and isinstance(tensor, module.DTensor)


# Buffers (rotary tables) are the same on every rank: nothing to broadcast before each forward. torch 2.13
# renamed the setting, and older versions know only the first name.
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})


class LossModule(nn.Module):
    """`loss_fn(model, batch)` as the forward of one module (the unit an engine wraps).

    `every_param`: every trainable param that a micro-batch may skip joins each loss with weight 0. A LLaVA
    batch without images never reaches the projector, which would otherwise have no grad on one rank only: DDP
    would wait for it, FSDP2 would reduce-scatter a different set of tensors on each rank. Adding exactly 0
    changes neither the loss nor any gradient. Every forward runs the LLM and each transformer block whole, so
    their params are left out (the embedding and head are the largest: summing them costs 20% of a tiny step).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Any], every_param: bool = False) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.outside = _skippable_params(model) if every_param else []

    def forward(self, batch: Any) -> Any:
        result = self.loss_fn(self.model, batch)
        if not self.outside:
            return result
        sums = [getattr(module, name).sum(dtype=torch.float32) for module, name in self.outside]
        return result._replace(loss=result.loss + torch.stack(sums).sum() * 0.0)


def _skippable_params(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(owner, name) of every trainable param outside the LLM and the blocks: those a micro-batch may not reach.
    Named rather than held: FSDP swaps in the gathered param for each forward."""
    always_used = [*blocks_of(model), *(m for m in model.modules() if isinstance(m, LanguageModel))]
    used = {id(p) for module in always_used for p in module.parameters()}
    return [(module, name) for module in model.modules() for name, p in module._parameters.items()
            if p is not None and p.requires_grad and id(p) not in used]


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The blocks of every nn.ModuleList named `blocks` (the transformer layers of the LLM and the tower)."""
    return [block for name, module in model.named_modules()
            if name.rsplit(".", 1)[-1] == "blocks" and isinstance(module, nn.ModuleList) for block in module]


class Engine:
    """What the trainer runs each micro-batch through: `engine(batch)` is loss_fn(model, batch), and
    `engine.sync(last)` the context a micro-batch runs in: only a step's last one reduces gradients.

    `kind`: "none", "ddp" (cast `model` to the compute dtype first) or "fsdp" (shards `model` in place; build
    `MixedPrecision(model, dtype, sharded=True)` after, and call `finish()` after training).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Any], kind: str,
                 device: torch.device, compute_dtype: torch.dtype = torch.float32) -> None:
        self.kind, self.model = kind, model
        module = LossModule(model, loss_fn, every_param=kind != "none")
        if kind == "ddp":
            module = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                             **_NO_BUFFER_SYNC)
        elif kind == "fsdp":
            self.plain = _skeleton(model)
            frozen = {p for p in model.parameters() if not p.requires_grad}
            MixedPrecisionPolicy, fully_shard = _fsdp2()
            policy = MixedPrecisionPolicy(param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
                                          reduce_dtype=torch.float32)
            for block in blocks_of(model):
                if any(p.requires_grad for p in block.parameters()):
                    fully_shard(block, mp_policy=policy, ignored_params=frozen & set(block.parameters()))
            fully_shard(module, mp_policy=policy, ignored_params=frozen)
        elif kind != "none":
            raise ValueError(f"unknown engine {kind!r}")
        self.module = module

    def __call__(self, batch: Any) -> Any:
        return self.module(batch)

    def sync(self, last: bool) -> contextlib.AbstractContextManager:
        if self.kind == "ddp" and not last:
            return self.module.no_sync()
        if self.kind == "fsdp":
            self.module.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def finish(self) -> None:
        """FSDP: gather the full fp32 weights on every rank and give the model a plain structure holding them (the
        same object the caller holds). The other engines leave the model as it is."""
        if self.kind != "fsdp":
            return
        trained = {name: full_tensor(p).detach() for name, p in self.model.named_parameters() if p.requires_grad}
        skeleton = dict(self.plain.named_parameters())
        placed = {id(skeleton[name]): nn.Parameter(tensor) for name, tensor in trained.items()}
        for module in self.plain.modules():  # every place a param sits: a tied one sits in two
            for key, param in module._parameters.items():
                if param is not None and id(param) in placed:
                    module._parameters[key] = placed[id(param)]
        self.model.__dict__ = self.plain.__dict__
        self.module = self.plain = None


def _skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model`'s structure that shares its frozen params and buffers and holds its trainable params only
    as meta tensors (no memory): the plain module `Engine.finish` fills with the trained weights."""
    memo: dict[int, Any] = {id(t): t for t in model.buffers()}
    for p in model.parameters():
        memo[id(p)] = p if not p.requires_grad else nn.Parameter(torch.empty_like(p, device="meta"))
    return copy.deepcopy(model, memo)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered whole on every rank (a collective); any other tensor itself."""
    if not is_sharded(tensor):
        return tensor
    whole = tensor.full_tensor()
    # the gather may still be in flight (an AsyncCollectiveTensor): wait for it here, also on the ranks that never
    # read the result (only rank 0 writes a checkpoint), or the process aborts at exit with the work unfinished
    return whole.wait() if hasattr(whole, "wait") else whole


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` cut into the shards `like` has, when `like` is sharded; `full` itself otherwise."""
    if not is_sharded(like):
        return full
    return _dtensor_module().distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements)
