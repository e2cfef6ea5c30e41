"""One seed per run, and a separate, stable seed for each thing drawn at random from it.

A stage's model initialisation, a task's adapters and a trainer's loop each get their own seed derived from
the config's `seed` and a label, so adding or reordering a stage does not shift the random numbers of another.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(seed: int, *labels: object) -> int:
    """A 63-bit seed that depends only on `seed` and the labels (stable across runs and Python versions)."""
    text = "/".join([str(seed), *map(str, labels)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
