"""Hand-written mixed precision: the model computes in bf16/fp16, the optimizer updates fp32 master weights.

How one step works (Micikevicius et al., 2018, "Mixed Precision Training"):

    model params (bf16/fp16) --forward/backward--> grads (bf16/fp16, times the loss scale)
        -> copied into fp32 master grads, divided by the loss scale
        -> any inf/nan? skip the step (fp16: halve the scale)
        -> clip the global norm of the fp32 grads
        -> optimizer.step() on the fp32 masters (its state, e.g. Adam's moments, is fp32 too)
        -> masters copied (rounded) back into the model's params

In code the unscaling and the clipping are one coefficient, multiplied into the fp32 grads, or handed to a
fused optimizer's kernel as its `grad_scale` (the protocol torch's GradScaler uses), which costs no pass.

Why fp32 masters: bf16 keeps 8 bits of mantissa, so a weight w only changes if the update is
larger than about w/256; the many small updates of fine-tuning (lr 2e-5) would round away. They
add up in the fp32 copy and reach the model once they matter.
Why loss scaling (fp16 only): fp16's smallest normal number is 6e-5, and small gradients underflow
to zero. Multiplying the loss by S (say 2^16) shifts every gradient up by S; dividing the fp32 copy
by S undoes it. The scale is dynamic: an inf/nan gradient means S overflowed, so that step is
skipped and S halved; after `growth_interval` clean steps S is doubled again. bf16 has fp32's
exponent range and needs no scaling. In fp32 nothing is copied: the optimizer works on the
params themselves. Frozen params (requires_grad=False) are cast to the compute dtype and get no
master. Buffers (e.g. rotary tables) keep their dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all `tensors` together, accumulated in fp32 whatever their dtype (0 for no tensors)."""
    if not tensors:
        return torch.zeros(())
    try:
        norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)  # one multi-tensor kernel
    except (TypeError, RuntimeError):  # older torch: no dtype argument
        norms = [torch.linalg.vector_norm(t, dtype=torch.float32) for t in tensors]
    return torch.linalg.vector_norm(torch.stack(norms))


class MixedPrecision:
    """Casts `model` to `dtype` and keeps fp32 masters of its trainable params.

    `loss_scale`: "dynamic", a number (a static scale) or None (no scaling); left at "default" it is
    "dynamic" for fp16 and None for bf16 and fp32. Dynamic scaling starts at `init_scale`.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, loss_scale: str | float | None = "default",
                 init_scale: float = 2.0 ** 16, growth_interval: int = 2000) -> None:
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {list(DTYPES.values())}, got {dtype}")
        if loss_scale == "default":
            loss_scale = "dynamic" if dtype == torch.float16 else None
        if not (loss_scale is None or loss_scale == "dynamic" or isinstance(loss_scale, (int, float))):
            raise ValueError(f"loss_scale must be 'dynamic', a number or None, got {loss_scale!r}")
        self.model = model
        self.dtype = dtype
        self.dynamic = loss_scale == "dynamic"
        self.scale = float(init_scale if self.dynamic else (loss_scale or 1.0))
        self.growth_interval = growth_interval
        self.clean_steps = 0  # steps since the scale last changed
        self.skipped_steps = 0
        self.params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameter (every requires_grad is False): nothing to train")
        if dtype == torch.float32:
            self.masters = [p for _, p in self.params]  # no copies: the optimizer updates the params
        else:
            # masters from the params' current values, before they are rounded to the compute dtype
            self.masters = [nn.Parameter(p.detach().float().clone()) for _, p in self.params]
        with torch.no_grad():
            for p in model.parameters():
                if p.is_floating_point() and p.dtype != dtype:
                    p.data = p.data.to(dtype)

    @property
    def copies(self) -> bool:
        return self.dtype != torch.float32

    def named_master_params(self) -> list[tuple[str, torch.Tensor]]:
        """(name, fp32 master) for each trainable param: give these to the optimizer."""
        return [(name, m) for (name, _), m in zip(self.params, self.masters)]

    def master_params(self) -> list[torch.Tensor]:
        return list(self.masters)

    def backward(self, loss: torch.Tensor) -> None:
        (loss.float() * self.scale).backward()

    def step(self, optimizer: torch.optim.Optimizer, max_grad_norm: float | None,
             grad_multiplier: float = 1.0, loss: torch.Tensor | None = None) -> StepResult:
        """Unscale, check, clip, update the masters, copy them into the model. Grads are cleared after.

        `grad_multiplier` multiplies the gradients on top of unscaling (the trainer uses it to
        weight gradient accumulation by token counts). `loss` (a tensor, optional) is read at the
        norm's host sync, which costs nothing more, and a non-finite one skips the step too.
        """
        scale = self.scale
        factor = grad_multiplier / scale
        with torch.no_grad():
            pairs = [(p.grad, m) for (_, p), m in zip(self.params, self.masters) if p.grad is not None]
            # The norm of the compute-dtype grads, accumulated in fp32, is that of their exact fp32 copies.
            norm = global_norm([g for g, _ in pairs])
            master_grads = []
            if self.copies and pairs:
                # the fp32 copies are queued before the host sync below (one multi-tensor kernel), so a GPU makes
                # them while the CPU waits for the norm instead of sitting idle through a launch per param
                master_grads = [torch.empty_like(m) for _, m in pairs]
                torch._foreach_copy_(master_grads, [g for g, _ in pairs])
            if factor != 1.0:
                norm = norm * abs(factor)
            grad_norm = float(norm)
            loss_value = None if loss is None else float(loss)
            finite = math.isfinite(grad_norm) and (loss_value is None or math.isfinite(loss_value))
            if finite:
                # unscaling, accumulation weights and clipping folded into one coefficient of the fp32 grads;
                # the clip coefficient is computed as torch.nn.utils.clip_grad_norm_ computes it
                coef: float | torch.Tensor = factor
                if max_grad_norm is not None and max_grad_norm > 0:
                    coef = (max_grad_norm / (norm + 1e-6)).clamp(max=1.0) * factor
                if self.copies:
                    for (_, m), g in zip(pairs, master_grads):
                        m.grad = g
                    for _, p in self.params:
                        p.grad = None
                grads = [m.grad for _, m in pairs]
                if grads and (isinstance(coef, torch.Tensor) or coef != 1.0):
                    if self.copies and getattr(optimizer, "_step_supports_amp_scaling", False):
                        # fused Adam/AdamW/SGD divide each grad by `optimizer.grad_scale` inside their own kernel
                        # (the protocol torch's GradScaler uses): the coefficient costs no pass over the grads
                        optimizer.grad_scale = 1.0 / torch.as_tensor(coef, dtype=torch.float32,
                                                                     device=grads[0].device)
                    else:
                        torch._foreach_mul_(grads, coef)  # one multi-tensor kernel instead of a launch per param
                try:
                    optimizer.step()
                finally:
                    optimizer.__dict__.pop("grad_scale", None)
                if self.copies:
                    torch._foreach_copy_([p for _, p in self.params], self.masters)  # rounds to the compute dtype
        self.zero_grad()
        self._update_scale(finite)
        return StepResult(taken=finite, grad_norm=grad_norm, scale=scale, loss=loss_value)

    def _update_scale(self, finite: bool) -> None:
        if not finite:
            self.skipped_steps += 1
            self.clean_steps = 0
            if self.dynamic:
                self.scale /= 2.0
            return
        self.clean_steps += 1
        if self.dynamic and self.clean_steps >= self.growth_interval:
            self.scale *= 2.0
            self.clean_steps = 0

    def zero_grad(self) -> None:
        for _, p in self.params:
            p.grad = None
        for m in self.masters:
            m.grad = None

    def scaler_state(self) -> dict[str, Any]:
        return {"dtype": str(self.dtype).removeprefix("torch."), "dynamic": self.dynamic, "scale": self.scale,
                "growth_interval": self.growth_interval, "clean_steps": self.clean_steps,
                "skipped_steps": self.skipped_steps}

    def state_dict(self) -> dict[str, Any]:
        """{"masters": {name: fp32 tensor} (empty in fp32), "scaler": {...}} - everything a resume needs."""
        masters = {name: m.detach() for name, m in self.named_master_params()} if self.copies else {}
        return {"masters": masters, "scaler": self.scaler_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        scaler = state["scaler"]
        if scaler["dtype"] != self.scaler_state()["dtype"]:
            raise ValueError(f"saved precision state is for {scaler['dtype']}, this run uses "
                             f"{self.scaler_state()['dtype']}: resume with the same precision")
        self.scale, self.clean_steps = float(scaler["scale"]), int(scaler["clean_steps"])
        self.skipped_steps = int(scaler["skipped_steps"])
        if not self.copies:
            return
        masters = state["masters"]
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
