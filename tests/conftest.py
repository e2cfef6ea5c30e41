"""Shared test set-up: fixed seeds, one CPU thread, and the repository root on the import path."""

import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _fixed_seeds() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread avoids thread-pool overhead (much of the run time, and 3x on a busy CPU),
    here and in the processes the tests start (OMP_NUM_THREADS); torchrun's ranks have one each as well."""
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = omp


@pytest.fixture(scope="module")
def sequence_start(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny_sequence_start(tmp_path_factory.mktemp("sequence"), test_per_task=6)


@pytest.fixture(scope="module")
def world(sequence_start: tuple[Path, Path]) -> Path:
    """The task-sequence tests' world (test_continual, test_distributed); a module's own `world` replaces it."""
    return sequence_start[0]


@pytest.fixture(scope="module")
def init_model(sequence_start: tuple[Path, Path]) -> Path:
    """A small untrained LLaVA (16x16 images -> 4 tokens) saved as a task sequence's starting point."""
    return sequence_start[1]


def tiny_sequence_start(folder: Path, test_per_task: int) -> tuple[Path, Path]:
    """(world, init): a smoke-size synthetic world of 16x16 images in folder/world, and an untrained small LLaVA
    (16x16 images -> 4 tokens) saved in folder/init as the start of a continual task sequence."""
    from mllm_cl.config import LLMConfig, VisionConfig
    from mllm_cl.llava import LlavaModel, save_llava
    from mllm_cl.llm import LanguageModel
    from mllm_cl.projector import build_projector
    from mllm_cl.synthetic import build_world
    from mllm_cl.tokenizer import load_tokenizer
    from mllm_cl.vision import VisionTower

    world = folder / "world"
    build_world(world, seed=0, size="smoke", image_size=16, train_per_task=16, test_per_task=test_per_task)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(world / "tokenizer.json")
    vision = VisionTower(VisionConfig(image_size=16, patch_size=8, d_model=32, n_layer=2, n_head=2, d_ff=64))
    llm = LanguageModel(LLMConfig(vocab_size=-(-tokenizer.vocab_size // 64) * 64, n_layer=2, n_head=2, n_kv_head=2,
                                  d_model=32, d_ff=64, rotary_pct=0.25, max_seq_len=256, pad_token_id=1))
    init = save_llava(LlavaModel(vision, build_projector("mlp2x_gelu", 32, 32), llm), folder / "init",
                      tokenizer_from=world)
    return world, init
