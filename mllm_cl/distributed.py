"""Several processes under torchrun: the process group, which rank writes, and the few collectives the package uses.

    torchrun --nproc_per_node N train.py <stage> ...

torchrun starts N copies of the script with RANK, WORLD_SIZE and LOCAL_RANK set; `setup` joins them into one
process group (nccl on CUDA, gloo on the CPU) and gives each rank its own GPU. Everything else is torch's own
engine: `DistributedDataParallel` or FSDP2's `fully_shard` (in `mllm_cl.parallel`), `torch.distributed`
collectives here. Without torchrun (or with one process) nothing here does anything: rank 0 of a world of 1.

Who does what:
  * every rank builds the same model (same seeds) and trains on its share of each global batch;
  * files are written by rank 0 only (`on_main`), the others wait at a barrier and then read them;
  * only rank 0 prints progress: the others' stdout goes nowhere, while their stderr (warnings, errors, each
    error message starting with its rank: `mllm_cl.errors.rank_prefix`) stays.
"""

from __future__ import annotations

import datetime
import gc
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from mllm_cl.config import ConfigError
from mllm_cl.errors import UserError

T = TypeVar("T")


class OtherRankError(UserError, RuntimeError):
    """Rank 0 failed at something the other ranks were waiting for; its message is in this one."""


def launched() -> bool:
    """Whether a launcher (torchrun) started this process: it sets RANK and MASTER_ADDR."""
    return "RANK" in os.environ and "MASTER_ADDR" in os.environ


def setup(device: str = "auto") -> None:
    """Join the process group torchrun prepared (once per process; a plain `python` run has none to join).

    The backend follows the device: nccl for CUDA, gloo for the CPU. Each rank takes GPU LOCAL_RANK.
    """
    if dist.is_initialized() or not launched():
        return
    if not dist.is_available():
        raise ConfigError("launched by torchrun, but this torch build has no torch.distributed")
    cuda = torch.cuda.is_available() if device == "auto" else torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")  # one progress log, rank 0's


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def engine(setting: str) -> str:
    """The engine a `train.distributed` setting means in this world: "auto" is "ddp" with several processes,
    "none" with one. "none" with several processes would train N separate models: refused. (`TrainConfig`
    has checked that `setting` is one of DISTRIBUTED_ENGINES.)"""
    size = world_size()
    if setting == "auto":
        return "ddp" if size > 1 else "none"
    if setting == "none" and size > 1:
        raise ConfigError(f"train.distributed=none, but {size} processes were launched: each would train a model "
                          "of its own. Use ddp or fsdp, or launch one process")
    if setting != "none" and not dist.is_initialized():
        raise ConfigError(f"train.distributed={setting} needs a process group: launch with torchrun "
                          "(torchrun --nproc_per_node N train.py ...)")
    return setting


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks, in place (and return it)."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_tensors(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Give every rank rank `src`'s values of `tensors` (in place)."""
    if world_size() > 1:
        for tensor in tensors:
            dist.broadcast(tensor, src)


def broadcast_object(value: T, src: int = 0) -> T:
    """Rank `src`'s `value` (any picklable object) on every rank."""
    if world_size() <= 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src)
    return holder[0]


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if world_size() <= 1:
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only (it writes files), then let every rank go on with its result.

    An error on rank 0 reaches the other ranks as an error too, so no rank waits forever at the barrier.
    """
    result: Any = None
    error: str | None = None
    if is_main():
        try:
            result = fn()
        except BaseException as e:
            if world_size() <= 1:
                raise
            error = f"{type(e).__name__}: {e}"
            broadcast_object((None, error))
            raise
    result, error = broadcast_object((result, error))
    if error is not None:
        raise OtherRankError(f"rank 0 stopped with {error}")
    return result


def shard_stream(items: Iterator[T], chunk: int) -> Iterator[T]:
    """This rank's part of a stream shared out in turns of `chunk` items: rank r takes items
    [r*chunk, (r+1)*chunk) of every W*chunk. With chunk = micro-batches per rank per step, a stream of one item
    per micro-batch (UIR's inquiry batches) reaches each rank in the order the one-process run uses them."""
    size, here = world_size(), rank()
    while True:
        for turn in range(size):
            for _ in range(chunk):
                try:
                    item = next(items)
                except StopIteration:
                    return
                if turn == here:
                    yield item


def shutdown(clean: bool = True) -> None:
    """Leave the process group. After a run that went well every rank waits for the others first (none tears
    down its connections while another still uses them); after a failure it leaves at once, and the launcher
    stops the rest."""
    if dist.is_initialized():
        if clean:
            dist.barrier()
        gc.collect()  # FSDP's leftover state and its device mesh go while their process group still exists
        dist.destroy_process_group()
