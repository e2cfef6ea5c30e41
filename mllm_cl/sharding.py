"""Batched evaluation shared out over the ranks of a torchrun world, with every rank ending with all the results.

A one-process evaluation cuts its work into consecutive batches; rank r of W computes batches r, r+W, r+2W, ...
of that very partition (`my_batches`), so every item is computed in the batch it has in one process, with
bit-identical numbers, and `gather_results` gives every rank the results of all. In a world of 1 both are the
plain loop over the batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

from mllm_cl.distributed import gather_objects, rank, world_size

T = TypeVar("T")
R = TypeVar("R")


def my_batches(items: Sequence[T], batch_size: int) -> Iterator[Sequence[T]]:
    """This rank's batches of `items` cut into slices of `batch_size`: batches r, r+W, r+2W, ... (all with W=1)."""
    for start in range(rank() * batch_size, len(items), world_size() * batch_size):
        yield items[start:start + batch_size]


def gather_results(results: list[R], mine: Sequence[int]) -> list[R]:
    """`results`, of which this rank computed the entries at indices `mine`, with every rank's entries filled in,
    on every rank (a collective: every rank calls it). In a world of 1, `results` as it is."""
    if world_size() <= 1:
        return results
    for indices, values in gather_objects((list(mine), [results[i] for i in mine])):
        for i, value in zip(indices, values):
            results[i] = value
    return results
