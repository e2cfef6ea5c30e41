"""A tiny fp32 LLaVA with seeded random weights, hand-made batches and a TaskContext, for the CL-method tests."""

from __future__ import annotations

from typing import Iterator

import torch

from mllm_cl.config import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID, LLMConfig, VisionConfig
from mllm_cl.data import collate
from mllm_cl.llava import LlavaModel
from mllm_cl.llm import LanguageModel
from mllm_cl.losses import causal_lm_loss
from mllm_cl.methods.base import TaskContext
from mllm_cl.projector import build_projector
from mllm_cl.vision import VisionTower

P = 4  # image tokens: (16 / 8) ** 2 patches, class token dropped
VOCAB = 64
D_MODEL = 32
PAD = 0


def tiny_llava(arch: str = "gpt_neox", seed: int = 0) -> LlavaModel:
    """Vision 16x16 pixels -> 4 tokens of width 24; LLM of 2 layers, width 32; mlp2x_gelu projector."""
    torch.manual_seed(seed)
    vision = VisionTower(VisionConfig(image_size=16, patch_size=8, d_model=24, n_layer=1, n_head=2, d_ff=48))
    if arch == "gpt_neox":
        llm_config = LLMConfig(vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=4, d_model=D_MODEL, d_ff=64,
                               rotary_pct=0.5, max_seq_len=64)
    else:  # LLaMA layout: RMSNorm, SwiGLU (fused gate/up), grouped-query attention, no biases
        llm_config = LLMConfig(arch="llama", vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, d_model=D_MODEL,
                               d_ff=64, norm="rmsnorm", mlp="swiglu", bias=False, parallel_residual=False,
                               max_seq_len=64)
    llm = LanguageModel(llm_config)
    for p in llm.parameters():  # the default init (std 0.02) gives near-uniform logits; make them informative
        torch.nn.init.normal_(p, std=0.3)
    return LlavaModel(vision, build_projector("mlp2x_gelu", 24, D_MODEL), llm).eval()


def text_batch(rows: list[list[int]]) -> dict[str, torch.Tensor | None]:
    """Collated text-only rows (labels = the ids; padding ignored)."""
    samples = [{"input_ids": torch.tensor(r), "labels": torch.tensor(r), "pixel_values": None} for r in rows]
    return collate(samples, PAD)


def image_batch(seed: int = 1) -> dict[str, torch.Tensor | None]:
    """Row 0 text only, row 1 one image; image positions and the prompt are left out of the labels."""
    generator = torch.Generator().manual_seed(seed)
    rows = [[5, 6, 7, 8, 9, 10, 11], [5] + [IMAGE_PLACEHOLDER_ID] * P + [12, 13, 14]]
    samples = []
    for r in rows:
        ids = torch.tensor(r)
        labels = torch.where(ids == IMAGE_PLACEHOLDER_ID, IGNORE_INDEX, ids)
        labels[0] = IGNORE_INDEX
        image = torch.randn(3, 16, 16, generator=generator) if IMAGE_PLACEHOLDER_ID in r else None
        samples.append({"input_ids": ids, "labels": labels, "pixel_values": image})
    return collate(samples, PAD)


def batch_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    output = model(batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])
    return causal_lm_loss(output.logits, batch["labels"])


def logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"]).logits


def endless_inquiries(rows: list[list[int]]) -> Iterator[dict]:
    """Collated text-only inquiry batches (no labels), the same batch again and again."""
    batch = collate([{"input_ids": torch.tensor(r), "pixel_values": None} for r in rows], PAD)
    while True:
        yield batch


def context(model: LlavaModel, index: int = 0, name: str = "task", **kwargs) -> TaskContext:
    return TaskContext(task_index=index, task_name=name, model=model, train_samples=[], device=torch.device("cpu"),
                       **kwargs)


def perturb_(module: torch.nn.Module, scale: float = 0.05, seed: int = 7) -> None:
    """Add seeded noise to every floating parameter of `module` in place (a stand-in for training)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
