"""Hand-written activation checkpointing (Chen et al., 2016, "Training Deep Nets with Sublinear Memory Cost").

A checkpointed block keeps only its inputs during the forward pass, not the activations inside it.
In the backward pass it runs the block again, with the random number generators rewound to where
they were (so dropout draws the same masks), and backpropagates through that re-run. The cost is
one more forward per block; the saving is every intermediate activation of the block.
"""

from __future__ import annotations

import types
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def _rng_states(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[int], list[torch.Tensor]]:
    devices = sorted({torch.cuda.current_device() if t.device.index is None else t.device.index
                      for t in tensors if t.device.type == "cuda"})
    return torch.get_rng_state(), devices, [torch.cuda.get_rng_state(d) for d in devices]


class CheckpointFunction(torch.autograd.Function):
    """forward: run the block without recording a graph. backward: re-run it with one, then backpropagate.

    `args` are the block's positional args (tensors, some not requiring grad, or None). The
    parameters inside the block get their grads from the re-run's `torch.autograd.backward`;
    this function returns grads only for the tensor args.
    """

    @staticmethod
    def forward(ctx: Any, block: nn.Module, anchor: torch.Tensor | None, *args: Any) -> Any:
        ctx.block = block
        ctx.tensor_at = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        ctx.args = [None if isinstance(a, torch.Tensor) else a for a in args]
        tensors = [args[i] for i in ctx.tensor_at]
        ctx.save_for_backward(*tensors)
        ctx.rng = _rng_states(tensors)
        with torch.no_grad():
            return type(block).forward(block, *args)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = ctx.saved_tensors
        args = list(ctx.args)
        for i, t in zip(ctx.tensor_at, saved):
            args[i] = t.detach().requires_grad_(t.requires_grad)
        cpu_state, devices, cuda_states = ctx.rng
        with torch.random.fork_rng(devices=devices):  # rewind the generators, restore them afterwards
            torch.set_rng_state(cpu_state)
            for device, state in zip(devices, cuda_states):
                torch.cuda.set_rng_state(state, device)
            with torch.enable_grad():
                outputs = type(ctx.block).forward(ctx.block, *args)
        outputs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        grads: list[torch.Tensor | None] = [None] * len(args)
        for i in ctx.tensor_at:
            grads[i] = args[i].grad if args[i].requires_grad else None
        return (None, None, *grads)


def _checkpointed_forward(block: nn.Module, *args: Any) -> Any:
    """Installed as `block.forward`: checkpoint while a graph is being recorded, plain call otherwise."""
    if not torch.is_grad_enabled():
        return type(block).forward(block, *args)
    # When no input needs a grad (e.g. after a frozen embedding), autograd would never call our
    # backward and the block's own params would get no grads; this empty anchor makes it call it.
    needs_anchor = any(p.requires_grad for p in block.parameters())
    anchor = torch.empty(0, requires_grad=True) if needs_anchor else None
    return CheckpointFunction.apply(block, anchor, *args)


def enable_checkpointing(blocks: Iterable[nn.Module], enabled: bool | list[bool] = True) -> None:
    """Checkpoint each block (or those whose entry in `enabled` is True) by replacing `block.forward`.

    Only the instance's `forward` changes, so `state_dict()` keys stay the same. Blocks must take
    positional args only (tensors or None), e.g. `block(x, cos, sin, attn_bias)`.
    """
    blocks = list(blocks)
    flags = [enabled] * len(blocks) if isinstance(enabled, bool) else list(enabled)
    if len(flags) != len(blocks):
        raise ValueError(f"enabled has {len(flags)} entries for {len(blocks)} blocks")
    for block, flag in zip(blocks, flags):
        if flag:
            # a bound method (not a closure): copy.deepcopy(model) then re-binds it to the copied block
            block.forward = types.MethodType(_checkpointed_forward, block)
        else:
            block.__dict__.pop("forward", None)


def disable_checkpointing(blocks: Iterable[nn.Module]) -> None:
    for block in blocks:
        block.__dict__.pop("forward", None)


def is_checkpointed(block: nn.Module) -> bool:
    forward = block.__dict__.get("forward")
    return isinstance(forward, types.MethodType) and forward.__func__ is _checkpointed_forward
