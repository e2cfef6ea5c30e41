"""Hand-written mixed precision: the model computes in bf16/fp16, the optimizer updates fp32 master weights.

One step (Micikevicius et al., 2018, "Mixed Precision Training"), g the grads of the loss times the scale S:

    model params (bf16/fp16) --forward/backward--> g (bf16/fp16)
    1. unscale and clip: g is copied into the fp32 masters' grads, and one coefficient
           c = f * min(1, max_grad_norm / (|f| ||g|| + 1e-6)),   f = grad_multiplier / S
       unscales and clips them; an inf/nan norm (or loss) skips the step and backs S off
    2. optimizer step on the fp32 masters, their grads times c (a fused Adam/AdamW/SGD takes c in its
       kernel through `grad_scale`, the protocol of torch's GradScaler; other optimizers get it multiplied in)
    3. copy back: the masters, rounded to the compute dtype, into the model's params

Why fp32 masters: bf16 keeps 8 bits of mantissa, so a weight w only changes if the update is larger than
about w/256; the many small updates of fine-tuning (lr 2e-5) would round away. They add up in the fp32
copy and reach the model once they matter.
Why loss scaling (fp16 only): fp16's smallest normal number is 6e-5, and small gradients underflow to zero.
Multiplying the loss by S (say 2^16) shifts every gradient up by S; the coefficient divides it out again.
`DynamicLossScaler` halves S after an overflow and doubles it after `growth_interval` clean steps. bf16 has
fp32's exponent range and needs no scaling. In fp32 nothing is copied: the optimizer works on the params
themselves; unscaled and unweighted, a step is clip_grad_norm_ then optimizer.step(), bit for bit. Frozen params
(requires_grad=False) are cast to the compute dtype and get no master; `release()` after training gives
every param back its full-precision value (the masters, the frozen originals). Buffers (e.g. rotary tables)
keep their dtype.

Under FSDP2 (`sharded=True`, see `mllm_cl.parallel`) the trainable params are FSDP's fp32 shards, and they are
the masters: FSDP casts them to the compute dtype when it gathers them for a forward and reduces their grads in
fp32 into shards. So nothing is copied here; frozen params are cast as above, and step 1's norm is the square
root of the sum, over the ranks, of each rank's sum of squares of its shards (one all-reduce).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mllm_cl import distributed

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

Coefficient = float | torch.Tensor  # what the fp32 grads are multiplied by: a 0-dim tensor when clipping


@dataclass
class StepResult:
    taken: bool  # False when an inf/nan gradient (or loss, if given) made us skip the optimizer step
    grad_norm: float  # global norm of the unscaled fp32 gradients, before clipping
    scale: float  # the loss scale used for this step
    loss: float | None = None  # the `loss` given to `step`, read at the same host sync as the norm


def resolve_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """"auto" -> bf16 on a CUDA device that supports it (fp16 on older ones), fp32 on the CPU."""
    if precision == "auto":
        if torch.device(device).type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision not in DTYPES:
        raise ValueError(f"precision must be 'auto', 'fp32', 'bf16' or 'fp16', got {precision!r}")
    return DTYPES[precision]


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) tensor's shard on this rank; any other tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all `tensors` together, accumulated in fp32 whatever their dtype (0 for no tensors)."""
    if not tensors:
        return torch.zeros(())
    try:
        norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)  # one multi-tensor kernel
    except (TypeError, RuntimeError):  # older torch: no dtype argument
        norms = [torch.linalg.vector_norm(t, dtype=torch.float32) for t in tensors]
    return torch.linalg.vector_norm(torch.stack(norms))


# The update rule of torch.amp.GradScaler, fairseq's and Megatron's DynamicLossScaler.
class DynamicLossScaler:
    """The loss scale S, and how many steps were clean or skipped.

    After an inf/nan gradient S is multiplied by `backoff_factor`; after `growth_interval` clean steps in
    a row, by `growth_factor`. With `dynamic=False` S is a constant (1.0: no scaling).
    """

    def __init__(self, scale: float = 2.0 ** 16, dynamic: bool = True, growth_interval: int = 2000,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5) -> None:
        self.scale = float(scale)
        self.dynamic = dynamic
        self.growth_interval = growth_interval
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.clean_steps = 0  # finite steps in a row (since the scale last changed, when dynamic)
        self.skipped_steps = 0

    def update(self, finite: bool) -> None:
        """Count a step whose gradients were `finite` (it was taken) or not (it was skipped); move the scale."""
        if not finite:
            self.skipped_steps += 1
            self.clean_steps = 0
            if self.dynamic:
                self.scale *= self.backoff_factor
            return
        self.clean_steps += 1
        if self.dynamic and self.clean_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {"dynamic": self.dynamic, "scale": self.scale, "growth_interval": self.growth_interval,
                "clean_steps": self.clean_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the scale and the counts; the growth and backoff settings are this scaler's own."""
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
        self.skipped_steps = int(state["skipped_steps"])


class MixedPrecision:
    """Casts `model` to `dtype` and keeps fp32 masters of its trainable params.

    `loss_scale`: "dynamic", a number (a static scale) or None (no scaling); left at "default" it is
    "dynamic" for fp16 and None for bf16 and fp32. Dynamic scaling starts at `init_scale`. `sharded`: the
    trainable params are FSDP2's fp32 shards (see the module's docstring).
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, loss_scale: str | float | None = "default",
                 init_scale: float = 2.0 ** 16, growth_interval: int = 2000, sharded: bool = False) -> None:
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {list(DTYPES.values())}, got {dtype}")
        if loss_scale == "default":
            loss_scale = "dynamic" if dtype == torch.float16 else None
        if not (loss_scale is None or loss_scale == "dynamic" or isinstance(loss_scale, (int, float))):
            raise ValueError(f"loss_scale must be 'dynamic', a number or None, got {loss_scale!r}")
        self.model = model
        self.dtype = dtype
        self.sharded = sharded
        dynamic = loss_scale == "dynamic"
        self.scaler = DynamicLossScaler(init_scale if dynamic else (loss_scale or 1.0), dynamic, growth_interval)
        self.params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameter (every requires_grad is False): nothing to train")
        if not self.copies:
            self.masters = [p for _, p in self.params]  # no copies: the optimizer updates the params
        else:
            # masters from the params' current values, before they are rounded to the compute dtype
            self.masters = [nn.Parameter(p.detach().float().clone()) for _, p in self.params]
        # frozen params are rounded to the compute dtype too; their originals wait on the CPU for `release`
        self.frozen = [(p, p.detach().to("cpu", copy=True)) for p in model.parameters()
                       if not p.requires_grad and p.is_floating_point() and p.dtype != dtype]
        with torch.no_grad():
            for p in model.parameters():
                if p.is_floating_point() and p.dtype != dtype and not (sharded and p.requires_grad):
                    p.data = p.data.to(dtype)

    def release(self) -> None:
        """Hand the model back in full precision: trainable params take their fp32 masters' values (shared, not
        copied), frozen ones their original values. What follows training (merging adapters, consolidation,
        saving, the next task) then starts from exact weights, never from the rounded compute copy."""
        with torch.no_grad():
            if self.copies:
                for (_, p), master in zip(self.params, self.masters):
                    p.data = master.detach()
            for p, original in self.frozen:
                p.data = original.to(p.device)
        self.frozen = []

    @property
    def copies(self) -> bool:
        return self.dtype != torch.float32 and not self.sharded

    @property
    def scale(self) -> float:
        return self.scaler.scale

    @property
    def dynamic(self) -> bool:
        return self.scaler.dynamic

    @property
    def skipped_steps(self) -> int:
        return self.scaler.skipped_steps

    def named_master_params(self) -> list[tuple[str, torch.Tensor]]:
        """(name, fp32 master) for each trainable param: give these to the optimizer."""
        return [(name, m) for (name, _), m in zip(self.params, self.masters)]

    def master_params(self) -> list[torch.Tensor]:
        return list(self.masters)

    def backward(self, loss: torch.Tensor) -> None:
        (loss.float() * self.scale).backward()

    def step(self, optimizer: torch.optim.Optimizer, max_grad_norm: float | None,
             grad_multiplier: float = 1.0, loss: torch.Tensor | None = None) -> StepResult:
        """Unscale and clip, update the masters, copy them into the model. Grads are cleared after.

        `grad_multiplier` multiplies the gradients on top of unscaling (the trainer uses it to
        weight gradient accumulation by token counts). `loss` (a tensor, optional) is read at the
        norm's host sync, which costs nothing more, and a non-finite one skips the step too.
        """
        scale = self.scale
        with torch.no_grad():
            coefficient, grad_norm, loss_value = self._unscale_and_clip(grad_multiplier / scale, max_grad_norm, loss)
            taken = coefficient is not None
            if taken:
                self._optimizer_step(optimizer, coefficient)
                self._copy_masters_to_params()
        self.zero_grad()
        self.scaler.update(taken)
        return StepResult(taken=taken, grad_norm=grad_norm, scale=scale, loss=loss_value)

    def _unscale_and_clip(self, factor: float, max_grad_norm: float | None,
                          loss: torch.Tensor | None) -> tuple[Coefficient | None, float, float | None]:
        """Moves the grads into the masters and returns (coefficient, grad norm, loss), read at one host sync.

        `factor` (grad_multiplier / loss scale) unscales the grads; the coefficient is `factor` times the
        clip coefficient, or None when the norm or the loss is inf/nan: the step must be skipped.
        """
        # the norm of the compute-dtype grads, accumulated in fp32, is that of their exact fp32 copies
        norm = global_norm([local_part(p.grad) for _, p in self.params if p.grad is not None])
        if self.sharded:
            norm = distributed.all_reduce_sum(norm.to(self.params[0][1].device).square()).sqrt()
        self._move_grads_to_masters()  # queued before the host sync: the GPU copies while the CPU waits
        if factor != 1.0:
            norm = norm * abs(factor)
        grad_norm = float(norm)  # the host sync
        loss_value = None if loss is None else float(loss)
        if not (math.isfinite(grad_norm) and (loss_value is None or math.isfinite(loss_value))):
            return None, grad_norm, loss_value
        if max_grad_norm is None or max_grad_norm <= 0:
            return factor, grad_norm, loss_value
        # the clip coefficient as torch.nn.utils.clip_grad_norm_ computes it
        return (max_grad_norm / (norm + 1e-6)).clamp(max=1.0) * factor, grad_norm, loss_value

    def _move_grads_to_masters(self) -> None:
        """Each master gets the fp32 copy of its param's grad (one multi-tensor kernel); the param's is freed."""
        if not self.copies:
            return  # the masters are the params: their grads are already fp32
        pairs = [(p, m) for (_, p), m in zip(self.params, self.masters) if p.grad is not None]
        if not pairs:
            return
        master_grads = [torch.empty_like(m) for _, m in pairs]
        torch._foreach_copy_(master_grads, [p.grad for p, _ in pairs])
        for (p, m), g in zip(pairs, master_grads):
            m.grad, p.grad = g, None

    def _optimizer_step(self, optimizer: torch.optim.Optimizer, coefficient: Coefficient) -> None:
        """optimizer.step() on the masters, their fp32 grads multiplied by `coefficient`."""
        grads = [local_part(m.grad) for m in self.masters if m.grad is not None]
        if grads and (isinstance(coefficient, torch.Tensor) or coefficient != 1.0):
            # fused Adam/AdamW/SGD divide each grad by `optimizer.grad_scale` inside their own kernel (the
            # protocol torch's GradScaler uses): the coefficient costs no pass over the grads. Not in fp32, where
            # the grads are multiplied as clip_grad_norm_ does it, so the step is the plain loop's bit for bit.
            if self.copies and getattr(optimizer, "_step_supports_amp_scaling", False):
                optimizer.grad_scale = 1.0 / torch.as_tensor(coefficient, dtype=torch.float32,
                                                             device=grads[0].device)
            else:
                torch._foreach_mul_(grads, coefficient)  # one multi-tensor kernel instead of a launch per param
        try:
            optimizer.step()
        finally:
            optimizer.__dict__.pop("grad_scale", None)

    def _copy_masters_to_params(self) -> None:
        if self.copies:
            torch._foreach_copy_([p for _, p in self.params], self.masters)  # rounds to the compute dtype

    def zero_grad(self) -> None:
        for _, p in self.params:
            p.grad = None
        for m in self.masters:
            m.grad = None

    @property
    def _dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")  # "bfloat16": the name checkpoints store

    def state_dict(self) -> dict[str, Any]:
        """{"masters": {name: fp32 tensor} (empty in fp32), "scaler": {...}} - everything a resume needs."""
        masters = {name: m.detach() for name, m in self.named_master_params()} if self.copies else {}
        return {"masters": masters, "scaler": {"dtype": self._dtype_name, **self.scaler.state_dict()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        scaler = state["scaler"]
        if scaler["dtype"] != self._dtype_name:
            raise ValueError(f"saved precision state is for {scaler['dtype']}, this run uses "
                             f"{self._dtype_name}: resume with the same precision")
        self.scaler.load_state_dict(scaler)
        if self.copies:
            self._load_masters(state["masters"])

    def _load_masters(self, masters: dict[str, torch.Tensor]) -> None:
        names = [name for name, _ in self.params]
        if sorted(masters) != sorted(names):
            missing, extra = sorted(set(names) - set(masters)), sorted(set(masters) - set(names))
            raise ValueError(f"saved fp32 masters do not match the trainable params: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}")
        with torch.no_grad():
            for (name, p), m in zip(self.params, self.masters):
                if masters[name].shape != m.shape:
                    raise ValueError(f"saved master {name!r} has shape {tuple(masters[name].shape)}, "
                                     f"the param has {tuple(m.shape)}")
                m.copy_(masters[name])
                p.copy_(m)
