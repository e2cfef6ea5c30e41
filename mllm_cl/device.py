"""The one place where a device setting becomes a torch device."""

from __future__ import annotations

import torch

from mllm_cl.config import ConfigError


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """"auto" (or None) -> CUDA when available, else the CPU; any other name as torch reads it. Under torchrun,
    "auto" and "cuda" are this rank's GPU (LOCAL_RANK).

    A name torch does not know, or CUDA on a machine without it, is a ConfigError.
    """
    if name is None or name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and torch.cuda.is_available() and torch.distributed.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {name!r} is not a device torch knows (cpu, cuda, cuda:1, auto, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: this machine has no CUDA device; use device=cpu or auto")
    return device
