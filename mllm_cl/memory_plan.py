"""Per-GPU memory of a training step on paper, for choosing an engine and a GPU count before renting them.

The parameter counts are exact: the models are built from their presets on the meta device. Bytes per parameter
under this project's hand-written mixed precision (`mllm_cl.precision`, bf16 compute):

    trainable   bf16 param 2 + bf16 grad 2 + fp32 master 4 + fp32 master grad 4 + AdamW m and v 8   = 20
    frozen      bf16 param 2 (the fp32 originals wait on the CPU)

Engines over N GPUs:

    ddp    every rank holds all of the above, plus DDP's gradient buckets: one more bf16 copy of the grads (2)
    fsdp   FSDP2 `fully_shard` per block, as `mllm_cl.parallel` builds it: a trainable param is an fp32 shard that
           is its own master, with an fp32 grad shard and sharded AdamW state (4 + 4 + 8 = 16, / N); frozen
           params are not sharded (2 on every rank); a rank also holds the gathered bf16 params and grads of
           the blocks in flight (the current block and the prefetched one: 2 blocks x 4 bytes per parameter)

Activations kept for backward, per decoder layer, bf16, attention by SDPA's flash kernel (no s x s scores kept),
no dropout; s tokens, micro-batch b, width h, MLP width f (Korthikanti et al., 2022, Table 2, less the dropout
masks and the score term):

    attention and norms   14 s b h   (norm inputs 4, QKV input 2, Q K V 6, attention output 2)
    GELU MLP              2 s b h + 4 s b f        (fc1 input, fc1 output, GELU output)
    SwiGLU MLP            2 s b h + 8 s b f        (input, gate and up outputs, SiLU output, their product)

With activation checkpointing (one checkpoint per block) a layer keeps only its input (2 s b h) and one block's
full set is alive while it is recomputed. The frozen vision tower runs without gradients (it keeps nothing),
the output head is the chunked fused one (`losses.head_cross_entropy`: no full logits), and the CUDA context,
allocator fragmentation and communication buffers are not counted: leave about 10% headroom.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mllm_cl.config import llm_preset, vision_preset
from mllm_cl.llm import LanguageModel
from mllm_cl.projector import build_projector
from mllm_cl.vision import VisionTower

TRAINABLE_BYTES = 2 + 2 + 4 + 4 + 8  # bf16 param and grad, fp32 master and its grad, AdamW's two moments
FROZEN_BYTES = 2
DDP_BUCKET_BYTES = 2
FSDP_TRAINABLE_BYTES = 4 + 4 + 8  # the fp32 shard (the master), its fp32 grad, AdamW's two moments
GIB = 2 ** 30


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model: parameter counts and the decoder's shape."""

    name: str
    llm_params: int
    frozen_params: int  # the vision tower (0 for a text-only model)
    projector_params: int
    adapter_params: int  # LoRA's A and B on every linear layer of the LLM but the head (fused qkv: one), at `lora_rank`
    lora_rank: int
    n_layer: int
    d_model: int
    d_ff: int
    mlp: str  # "gelu" or "swiglu"

    @property
    def block_params(self) -> int:
        """Parameters of one decoder block (what FSDP2 gathers at a time), the embeddings and head left out."""
        return 4 * self.d_model ** 2 + (3 if self.mlp == "swiglu" else 2) * self.d_model * self.d_ff


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_shape(llm: str, vision: str | None = None, lora_rank: int = 128) -> ModelShape:
    """The shape of preset `llm` (with preset tower `vision` and LLaVA's mlp2x_gelu projector, if given)."""
    config = llm_preset(llm)
    with torch.device("meta"):
        decoder = LanguageModel(config)
        tower = VisionTower(vision_preset(vision)) if vision else None
        projector = build_projector("mlp2x_gelu", tower.config.d_model, config.d_model) if tower else None
    adapters = sum(lora_rank * (m.in_features + m.out_features) for name, m in decoder.named_modules()
                   if isinstance(m, nn.Linear) and not name.endswith("lm_head"))
    return ModelShape(name=f"{llm}" + (f" + {vision}" if vision else ""), llm_params=_count(decoder),
                      frozen_params=_count(tower) if tower else 0,
                      projector_params=_count(projector) if projector else 0, adapter_params=adapters,
                      lora_rank=lora_rank, n_layer=config.n_layer, d_model=config.d_model, d_ff=config.d_ff,
                      mlp=config.mlp)


def layer_activation_bytes(shape: ModelShape, tokens: int, batch: int) -> int:
    """Bytes one decoder layer keeps for backward (module docstring), bf16."""
    sb = tokens * batch
    mlp = 2 * sb * shape.d_model + (8 if shape.mlp == "swiglu" else 4) * sb * shape.d_ff
    return 14 * sb * shape.d_model + mlp


def activation_bytes(shape: ModelShape, tokens: int, batch: int, checkpointing: bool) -> int:
    full = layer_activation_bytes(shape, tokens, batch)
    if not checkpointing:
        return shape.n_layer * full
    return shape.n_layer * 2 * tokens * batch * shape.d_model + full


def per_gpu_bytes(shape: ModelShape, mode: str, engine: str, gpus: int, tokens: int, batch: int,
                  checkpointing: bool) -> dict[str, int]:
    """Bytes per GPU by kind: `mode` "full" (LLM and projector trained) or "lora" (adapters and projector);
    `engine` "ddp" or "fsdp" over `gpus` ranks; a micro-batch of `batch` sequences of `tokens` tokens."""
    if mode not in ("full", "lora") or engine not in ("ddp", "fsdp") or gpus < 1:
        raise ValueError(f"mode must be full or lora, engine ddp or fsdp, gpus >= 1; got {mode}, {engine}, {gpus}")
    trainable = shape.projector_params + (shape.llm_params if mode == "full" else shape.adapter_params)
    frozen = shape.frozen_params + (0 if mode == "full" else shape.llm_params)
    if engine == "ddp":
        parts = {"weights and optimizer": trainable * TRAINABLE_BYTES + frozen * FROZEN_BYTES,
                 "ddp buckets": trainable * DDP_BUCKET_BYTES}
    else:
        in_flight = 2 * shape.block_params * (2 + 2) if gpus > 1 else 0  # gathered bf16 params and grads
        sharded = -(-trainable * FSDP_TRAINABLE_BYTES // gpus)
        parts = {"weights and optimizer": sharded + frozen * FROZEN_BYTES, "fsdp blocks in flight": in_flight}
    parts["activations"] = activation_bytes(shape, tokens, batch, checkpointing)
    parts["total"] = sum(parts.values())
    return parts


PLAN_MODELS = (("pythia-1.4b", None), ("pythia-2.8b", None), ("vicuna-7b", "clip-vit-l-14-336"))


def plan_table(tokens: int = 2048, batch: int = 1, gpu_gib: float = 80.0, gpus: tuple[int, ...] = (1, 2, 4, 8),
               lora_rank: int = 128) -> str:
    """A markdown table: GiB per GPU for every model, mode, checkpointing and engine, per GPU count; a cell over
    `gpu_gib` less 10% headroom is marked as not fitting."""
    rows = [f"| model | training | checkpointing | engine | {' | '.join(f'{n} x {gpu_gib:.0f} GB' for n in gpus)} |",
            "|---|---|---|---|" + "---|" * len(gpus)]
    for llm, vision in PLAN_MODELS:
        shape = model_shape(llm, vision, lora_rank)
        for mode in ("full", "lora"):
            for checkpointing in (False, True):
                for engine in ("ddp", "fsdp"):
                    cells = []
                    for n in gpus:
                        gib = per_gpu_bytes(shape, mode, engine, n, tokens, batch, checkpointing)["total"] / GIB
                        cells.append(f"{gib:.1f}" + ("" if gib <= 0.9 * gpu_gib else " (no)"))
                    label = "full" if mode == "full" else f"LoRA r={lora_rank}"
                    rows.append(f"| {shape.name} | {label} | {'on' if checkpointing else 'off'} | {engine} | "
                                f"{' | '.join(cells)} |")
    return "\n".join(rows)
