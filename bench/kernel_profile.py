"""Where a training step's time goes: `torch.profiler` over a few steps, summed by kernel and by kind.

On a GPU it sums device (kernel) time; the gap between the step's wall time and the kernels' sum is
time the GPU sat idle (waiting on the CPU: launches, Python, host syncs). On the CPU it sums the
self time of each operator. Used by `bench/train_speed.py --profile`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import torch
from torch.autograd import DeviceType

# (kind, pattern over the lower-cased kernel/op name); the first match wins
KINDS = [
    ("attention", r"flash|fmha|attention|sdpa|cudnn_sdp"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|sm80_|sm90_|cublas|matmul|\bmm\b|addmm|bmm|linear"),
    ("loss/softmax", r"softmax|logsumexp|cross_entropy|nll"),
    ("embedding", r"embedding|index_select|index_add|scatter|gather"),
    ("compiled (triton)", r"^triton_"),
    ("norm", r"layer_norm|rms_norm|layernorm"),
    ("copy/cast", r"copy|cast|to_copy|contiguous|fill|zero|memset|memcpy"),
]


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, lowered):
            return kind
    return "other elementwise"


def _self_time_us(event, on_gpu: bool) -> float:
    if not on_gpu:
        return float(event.self_cpu_time_total)
    if event.device_type == DeviceType.CPU:  # an operator: its kernels are counted as events of their own
        return 0.0
    # the attribute was renamed from cuda to device in torch 2.4/2.5
    return float(getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0))


def print_kernel_profile(step: Callable[[], None], device: torch.device, steps: int = 3, top: int = 15,
                         label: str = "") -> None:
    """Run `step` `steps` times under the profiler and print per-step ms by kind and the `top` kernels."""
    on_gpu = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU]
    if on_gpu:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if on_gpu:
            torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    rows = []
    for event in prof.key_averages():
        ms = _self_time_us(event, on_gpu) / 1e3 / steps
        if ms > 0:
            rows.append((ms, event.count // steps, event.key))
    rows.sort(reverse=True)
    total = sum(ms for ms, _, _ in rows)
    by_kind: dict[str, float] = {}
    for ms, _, name in rows:
        by_kind[kind_of(name)] = by_kind.get(kind_of(name), 0.0) + ms
    what = "kernel" if on_gpu else "operator self"
    print(f"  profile {label}: {wall_ms:.1f} ms/step wall (with profiler), {total:.1f} ms of {what} time"
          + (f", {max(0.0, wall_ms - total):.1f} ms GPU idle" if on_gpu else ""), flush=True)
    for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"    {kind:18s} {ms:8.2f} ms {ms / total:6.1%}", flush=True)
    print(f"    top {top} {what}s (ms/step, calls/step):", flush=True)
    for ms, count, name in rows[:top]:
        print(f"      {ms:8.2f} {count:5d}  {name[:110]}", flush=True)
