"""LLaVA's training stages, driven by one `StageConfig` (train.py's command line).

    pretrain-text    task 1: a language model from scratch on a text corpus      -> out/model (HF LLM folder)
    pretrain-vision  a small CLIP tower from scratch, contrastive image/caption    -> out/model (HF CLIP folder)
    align            projector only; LLM and vision tower frozen (template plain)  -> out/model (multimodal)
    finetune         projector + LLM; vision tower frozen                         -> out/model (multimodal)
    continual        a list of tasks one after another, CL methods plugged in     -> out/task_k/model, results.json
                     (in `mllm_cl.continual`)

The settings are `mllm_cl.config.StageConfig`; `run_stage` seeds the stage's initialisation from
(train.seed, stage) and dispatches. Every stage writes its model folder in the Hugging Face layout next to the trainer's `log.jsonl` and
checkpoint, so an interrupted stage resumes with `resume=true`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mllm_cl.clip_text import CLIPContrastive, TextTowerConfig, clip_config_hf, save_clip
from mllm_cl.config import (LLM_PRESETS, STAGES, VISION_PRESETS, StageConfig, StageError, llm_preset, require,
                            to_dict, vision_preset)
from mllm_cl.continual import run_continual
from mllm_cl.data import DataError, TextCorpus, load_image, multimodal_dataset, read_records, validate_entry
from mllm_cl.llava import LlavaModel, load_llava, save_llava
from mllm_cl.llm import LanguageModel
from mllm_cl.losses import LossResult, forward_loss
from mllm_cl.model_folder import atomic_write_text
from mllm_cl.projector import build_projector
from mllm_cl.seeding import derive_seed, seed_everything
from mllm_cl.tokenizer import Tokenizer, load_tokenizer
from mllm_cl.trainer import train_on
from mllm_cl.vision import VisionTower
from mllm_cl.weights import load_llm, load_vision_tower, save_llm


def run_stage(cfg: StageConfig) -> Path:
    """Run the configured stage; return the folder of the model it wrote (continual: the last task's)."""
    if cfg.stage not in STAGES:
        raise StageError(f"stage must be one of {', '.join(STAGES)}; got {cfg.stage!r}")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "stage_config.json", json.dumps(to_dict(cfg), indent=2) + "\n")
    seed_everything(derive_seed(cfg.train.seed, "init", cfg.stage))  # the stage's fresh weights, if any
    runner = {"pretrain-text": pretrain_text, "pretrain-vision": pretrain_vision, "align": align,
              "finetune": finetune, "continual": run_continual}[cfg.stage]
    return runner(cfg)


# ---------------------------------------------------------------- building models

def build_llm(spec: str, tokenizer: Tokenizer | None) -> LanguageModel:
    """A preset name builds a fresh model sized to the tokenizer; anything else is an HF folder to load."""
    if spec in LLM_PRESETS:
        if tokenizer is None:
            raise StageError(f"building the LLM from preset {spec!r} needs `tokenizer`")
        vocab = -(-tokenizer.vocab_size // 64) * 64  # padded to a multiple of 64, as Pythia's 50304
        config = llm_preset(spec, vocab_size=vocab, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                            pad_token_id=tokenizer.pad_id)
        return LanguageModel(config)
    return load_llm(spec)


def build_vision(spec: str) -> VisionTower:
    return VisionTower(vision_preset(spec)) if spec in VISION_PRESETS else load_vision_tower(spec)


def stage_tokenizer(cfg: StageConfig) -> Tokenizer:
    source = cfg.tokenizer or (cfg.llm if cfg.llm not in LLM_PRESETS else "")
    if not source:
        raise StageError(f"stage {cfg.stage!r}: set `tokenizer` (a folder or tokenizer.json)")
    return load_tokenizer(source)


# ---------------------------------------------------------------- the stages

def pretrain_text(cfg: StageConfig) -> Path:
    require(cfg, "train_file")
    tokenizer = stage_tokenizer(cfg)
    model = build_llm(cfg.llm, tokenizer)
    corpus = TextCorpus(cfg.train_file, tokenizer, block_len=cfg.max_len)
    print(f"pretrain-text: {corpus.num_documents} documents -> {len(corpus)} blocks of {cfg.max_len} tokens; "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    out = Path(cfg.out_dir)
    train_on(model, corpus, forward_loss, cfg.train, out)
    return save_llm(model, out / "model", tokenizer_from=_tokenizer_folder(cfg.tokenizer))


def _tokenizer_folder(source: str) -> Path:
    path = Path(source)
    return path.parent if path.is_file() else path


class CaptionImages(torch.utils.data.Dataset):
    """(image, caption ids) pairs from a LLaVA alignment file, for contrastive pre-training."""

    def __init__(self, path: str, image_folder: str, tokenizer: Tokenizer, image_size: int, max_len: int) -> None:
        self.image_size, self.pad_id = image_size, tokenizer.pad_id
        self.items = []
        for where, record in read_records(path):
            if isinstance(record, DataError):
                raise record
            entry = validate_entry(record, where, Path(path), Path(image_folder))
            if entry.image is None:
                continue
            caption = entry.messages[-1][1]
            ids = (tokenizer.encode(caption)[: max_len - 1]) + [tokenizer.eos_id]
            self.items.append((entry.image, torch.tensor(ids)))
        if not self.items:
            raise DataError(f"{path} has no entry with an image to pre-train the vision tower on", "no_images")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, ids = self.items[index]
        return {"input_ids": ids, "pixel_values": load_image(image, self.image_size)}


def pretrain_vision(cfg: StageConfig) -> Path:
    require(cfg, "train_file", "image_folder")
    if cfg.vision not in VISION_PRESETS:
        raise StageError(f"pretrain-vision builds a tower from a preset ({', '.join(VISION_PRESETS)}), "
                         f"got {cfg.vision!r}")
    tokenizer = stage_tokenizer(cfg)
    vision_config = vision_preset(cfg.vision)
    text_config = TextTowerConfig(vocab_size=tokenizer.vocab_size, max_seq_len=64, d_model=vision_config.d_model,
                                  n_layer=max(1, vision_config.n_layer // 2), n_head=vision_config.n_head,
                                  d_ff=vision_config.d_ff, eos_token_id=tokenizer.eos_id,
                                  pad_token_id=tokenizer.pad_id)
    model = CLIPContrastive(VisionTower(vision_config), text_config)
    try:
        clip_config_hf(model)  # a config transformers would read differently fails here, before any training
    except ValueError as e:
        raise StageError(f"pretrain-vision with tokenizer {cfg.tokenizer or cfg.llm}: {e}") from None
    data = CaptionImages(cfg.train_file, cfg.image_folder, tokenizer, vision_config.image_size, text_config.max_seq_len)
    out = Path(cfg.out_dir)

    def contrastive_loss(model: torch.nn.Module, batch: dict) -> LossResult:
        return LossResult(model(batch["pixel_values"], batch["input_ids"]), batch["input_ids"].size(0))

    train_on(model, data, contrastive_loss, cfg.train, out)
    return save_clip(model, out / "model")


def align(cfg: StageConfig) -> Path:
    require(cfg, "train_file")
    tokenizer = stage_tokenizer(cfg)
    llm = build_llm(cfg.llm, tokenizer)
    vision = build_vision(cfg.vision)
    model = LlavaModel(vision, build_projector(cfg.projector, vision.config.d_model, llm.config.d_model), llm)
    model.llm.requires_grad_(False)
    data = multimodal_dataset(cfg, cfg.train_file, cfg.image_folder, tokenizer, "plain", vision.config)
    out = Path(cfg.out_dir)
    train_on(model, data, forward_loss, cfg.train, out)
    return save_llava(model, out / "model", tokenizer_from=_tokenizer_folder(cfg.tokenizer or cfg.llm))


def finetune(cfg: StageConfig) -> Path:
    require(cfg, "init", "train_file")
    model = load_llava(cfg.init)
    tokenizer = load_tokenizer(Path(cfg.init) / "llm")
    data = multimodal_dataset(cfg, cfg.train_file, cfg.image_folder, tokenizer, cfg.template, model.vision.config)
    out = Path(cfg.out_dir)
    train_on(model, data, forward_loss, cfg.train, out)
    return save_llava(model, out / "model", tokenizer_from=Path(cfg.init) / "llm")
