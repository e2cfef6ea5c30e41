"""LLaVA's training stages, driven by one `StageConfig` (train.py's command line).

    pretrain-text    task 1: a language model from scratch on a text corpus      -> out/model (HF LLM folder)
    pretrain-vision  a small CLIP tower from scratch, contrastive image/caption    -> out/model (HF CLIP folder)
    align            projector only; LLM and vision tower frozen (template plain)  -> out/model (multimodal)
    finetune         projector + LLM; vision tower frozen                         -> out/model (multimodal)
    continual        a list of tasks one after another, CL methods plugged in     -> out/task_k/model, results.json
                     (in `mllm_cl.continual`)

The settings are `mllm_cl.config.StageConfig`. `run_stage` checks that `out_dir` may take the run (nothing
the user owns is replaced), seeds the stage's initialisation from (train.seed, stage) and dispatches. Every
stage writes its model folder in the Hugging Face layout next to the trainer's `log.jsonl` and checkpoint, so
an interrupted stage resumes with `resume=true`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mllm_cl import distributed
from mllm_cl.clip_text import CLIPContrastive, TextTowerConfig, clip_config_hf, save_clip
from mllm_cl.config import (LLM_PRESETS, RESUMABLE_TRAIN_FIELDS, STAGES, VISION_PRESETS, StageConfig, StageError,
                            llm_preset, require, to_dict, vision_preset)
from mllm_cl.continual import load_init, run_continual
from mllm_cl.data import (DataError, TextCorpus, check_fits, load_image, multimodal_dataset, read_records,
                          validate_entry)
from mllm_cl.device import resolve_device
from mllm_cl.json_files import read_json
from mllm_cl.llava import LlavaModel, save_llava, tokenizer_folder
from mllm_cl.llm import LanguageModel
from mllm_cl.losses import LossResult, forward_loss
from mllm_cl.model_folder import (ModelFolderError, atomic_write_text, check_not_an_input, check_replaceable,
                                  remove_stale_staging)
from mllm_cl.projector import build_projector
from mllm_cl.run_lock import out_dir_lock
from mllm_cl.run_state import find_checkpoint
from mllm_cl.seeding import derive_seed, seed_everything
from mllm_cl.tokenizer import Tokenizer, load_tokenizer
from mllm_cl.trainer import LOG_FILE, micro_batch_for, train_on
from mllm_cl.vision import VisionTower
from mllm_cl.weights import load_llm, load_vision_tower, save_llm


def run_stage(cfg: StageConfig) -> Path:
    """Run the configured stage; return the folder of the model it wrote (continual: the last task's)."""
    if cfg.stage not in STAGES:
        raise StageError(f"stage must be one of {', '.join(STAGES)}; got {cfg.stage!r}")
    resolve_device(cfg.train.device)  # an unknown or missing device fails here, before anything is written
    if distributed.world_size() > 1:  # before the settings are recorded: they say what runs
        cfg = replace(cfg, train=micro_batch_for(cfg.train, distributed.world_size()))
    if not cfg.out_dir.strip():
        raise StageError("out_dir is empty: name the folder this stage writes into (out_dir=runs/...)")
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise StageError(f"out_dir {out} is a file, not a folder")
    runner = {"pretrain-text": pretrain_text, "pretrain-vision": pretrain_vision, "align": align,
              "finetune": finetune, "continual": run_continual}[cfg.stage]
    created = not out.exists()
    try:  # one run at a time in out_dir (rank 0 holds it for all ranks), from the look at what is there to the end
        with out_dir_lock(out) if distributed.is_main() else contextlib.nullcontext():
            distributed.on_main(lambda: claim_out_dir(cfg))
            seed_everything(derive_seed(cfg.train.seed, "init", cfg.stage))  # the stage's fresh weights, if any
            return runner(cfg)
    finally:
        if created and distributed.is_main() and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # refused before writing anything: leave no trace


SETTINGS_FILE = "stage_config.json"
RESUMABLE_CHANGES = {"train": RESUMABLE_TRAIN_FIELDS}  # per section: settings a resumed run may change


def claim_out_dir(cfg: StageConfig) -> Path:
    """Check that `out_dir` may take this run, then record its settings there (SETTINGS_FILE).

    Refused, before anything is written: an `out_dir` whose outputs would replace a model this stage reads, or
    an `initial_eval` that would replace an input; an earlier run there with other settings or on other training
    data; an earlier run (or a model, or scores, it did not write) without `train.resume=true`. A run that
    stopped before writing anything (bad input) leaves only its settings, which the next run replaces. Called
    under the out_dir's lock (run_stage), so it also removes what a killed save left.
    """
    out = Path(cfg.out_dir)
    outputs = [out / "model"] if cfg.stage != "continual" else [out / f"task_{i + 1}_{t.name}"
                                                                 for i, t in enumerate(cfg.tasks)]
    if cfg.stage == "continual":  # its scores too: a finished experiment's results are not replaced either
        outputs += [out / "results.json"] + ([] if cfg.initial_eval else [out / "initial_eval.json"])
        if cfg.initial_eval:
            inputs = {name: getattr(cfg, name) for name in ("init", "llm", "vision", "tokenizer", "inquiries")}
            inputs |= {f"the NL file {path}": path for path in cfg.eval.nl_files}
            tests = [*cfg.tasks, *cfg.eval.general_vl]
            inputs |= {f"{t.name}'s {split} file": getattr(t, split) for t in tests for split in ("train", "test")}
            inputs |= {f"{t.name}'s image folder": t.image_folder for t in tests}
            try:
                check_not_an_input(cfg.initial_eval, inputs, "initial_eval")
                if Path(cfg.initial_eval).name != "initial_eval.json":  # a damaged cache of that name is made again
                    check_replaceable(cfg.initial_eval, lambda value: isinstance(value, dict) and "setup" in value,
                                      "initial_eval", "a cache of initial scores (initial_eval.json)")
            except ModelFolderError as e:
                raise StageError(str(e)) from None
    for name in ("init", "llm", "vision", "tokenizer", "train_file"):
        source = getattr(cfg, name)
        if source and any(_inside(Path(source), output) for output in outputs):
            raise StageError(f"{name}={source} lies inside {out}, where this stage writes its model: that would "
                             "replace it; choose another out_dir")
    settings, earlier = out / SETTINGS_FILE, _earlier_outputs(out, outputs)
    if earlier and settings.is_file():
        changed = changed_settings(out, cfg)
        data = sorted(key.removeprefix(f"{DATA_KEY}.") for key in changed if key.startswith(f"{DATA_KEY}."))
        changed = {key: value for key, value in changed.items() if not key.startswith(f"{DATA_KEY}.")}
        if data and not changed:  # the same settings, other data: say which file
            raise StageError(f"the training data changed since the run in {out} began: {', '.join(data)} (sha256 "
                             "differs); resuming would continue on other data. Restore the file, or start afresh "
                             "in another out_dir")
        if changed:
            raise StageError(f"{out} holds an earlier run with other settings (saved, now): {changed}; use another "
                             "out_dir, or the same settings to continue it")
    elif earlier:
        shown = earlier[0].name + ("/" if earlier[0].is_dir() else "")
        raise StageError(f"{out} holds {shown} from something other than a run of this stage (no "
                         f"{SETTINGS_FILE}); refusing to replace it: choose another out_dir")
    if earlier and not cfg.train.resume:
        raise StageError(f"{out} holds an earlier run ({', '.join(p.name for p in earlier)}): set train.resume=true "
                         "to continue it, or choose another out_dir")
    if not earlier:  # a resumed run keeps the record of the run it continues
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(settings, json.dumps(recorded_settings(cfg), indent=2) + "\n")
    models = [out / "model"] if cfg.stage != "continual" else [task / "model" for task in outputs[:len(cfg.tasks)]]
    for model in models:  # a model folder's staging copy that a killed swap left: ours to remove, under the lock
        for stale in remove_stale_staging(model):
            print(f"removed {stale}, left by a run killed while it saved {model}")
    return out


def changed_settings(folder: Path, cfg: StageConfig, ignore: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved, now)} for every setting of `cfg` that differs from those an earlier run recorded in
    `folder` (its SETTINGS_FILE), except out_dir (a run folder may move), the `ignore`d sections and the
    settings a resumed run may change."""
    settings = folder / SETTINGS_FILE
    try:
        saved = read_json(settings, StageError, dict)
    except StageError as e:
        raise StageError(f"{e}; it records an earlier run of {folder}: repair or delete it, or choose another "
                         "out_dir") from None
    now = recorded_settings(cfg)
    if DATA_KEY not in saved:  # recorded before the data's hashes were
        del now[DATA_KEY]
    saved.update({key: now[key] for key in ("out_dir", *ignore)})
    return _changed_settings(saved, now)


DATA_KEY = "data_sha256"  # in SETTINGS_FILE beside the settings: the training data a run began on


def recorded_settings(cfg: StageConfig) -> dict[str, Any]:
    """What SETTINGS_FILE records: the settings, and the sha256 of every training data file (the images aside),
    so that a resume on data changed since (a reordered train.txt) is refused rather than silently continued."""
    files = [cfg.train_file, cfg.inquiries, *(task.train for task in cfg.tasks)]
    hashes = {file: hashlib.sha256(Path(file).read_bytes()).hexdigest() for file in files
              if file and Path(file).is_file()}
    return {**to_dict(cfg), DATA_KEY: hashes}


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _earlier_outputs(out: Path, outputs: list[Path]) -> list[Path]:
    checkpoint = find_checkpoint(out) if out.is_dir() else None
    return [p for p in [*outputs, out / LOG_FILE] if p.exists()] + ([checkpoint] if checkpoint else [])


def _changed_settings(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved, now)} for every setting that differs, except RESUMABLE_CHANGES."""
    changed = {}
    for key in sorted(set(saved) | set(now)):
        before, after = saved.get(key), now.get(key)
        if isinstance(before, dict) and isinstance(after, dict) and key in RESUMABLE_CHANGES:
            ignore = RESUMABLE_CHANGES[key]
            before = {k: v for k, v in before.items() if k not in ignore}
            after = {k: v for k, v in after.items() if k not in ignore}
        if before != after:
            if isinstance(before, dict) and isinstance(after, dict):
                changed.update({f"{key}.{k}": v for k, v in _changed_settings(before, after).items()})
            else:
                changed[key] = (before, after)
    return changed


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
    check_fits(cfg.max_len, tokenizer, model.config, f"llm={cfg.llm}")
    corpus = TextCorpus(cfg.train_file, tokenizer, block_len=cfg.max_len)
    print(f"pretrain-text: {corpus.num_documents} documents -> {len(corpus)} blocks of {cfg.max_len} tokens; "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    out = Path(cfg.out_dir)
    train_on(model, corpus, forward_loss, cfg.train, out)
    return distributed.on_main(lambda: save_llm(model, out / "model",
                                                tokenizer_from=_tokenizer_folder(cfg.tokenizer or cfg.llm)))


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
    return distributed.on_main(lambda: save_clip(model, out / "model"))


def align(cfg: StageConfig) -> Path:
    require(cfg, "train_file")
    tokenizer = stage_tokenizer(cfg)
    llm = build_llm(cfg.llm, tokenizer)
    check_fits(cfg.max_len, tokenizer, llm.config, f"llm={cfg.llm}")
    vision = build_vision(cfg.vision)
    model = LlavaModel(vision, build_projector(cfg.projector, vision.config.d_model, llm.config.d_model), llm)
    model.llm.requires_grad_(False)
    data = multimodal_dataset(cfg, cfg.train_file, cfg.image_folder, tokenizer, "plain", vision.config)
    out = Path(cfg.out_dir)
    train_on(model, data, forward_loss, cfg.train, out)
    return distributed.on_main(lambda: save_llava(model, out / "model",
                                                  tokenizer_from=_tokenizer_folder(cfg.tokenizer or cfg.llm)))


def finetune(cfg: StageConfig) -> Path:
    require(cfg, "init", "train_file")
    model, tokenizer, cfg = load_init(cfg)
    data = multimodal_dataset(cfg, cfg.train_file, cfg.image_folder, tokenizer, cfg.template, model.vision.config)
    out = Path(cfg.out_dir)
    train_on(model, data, forward_loss, cfg.train, out)
    return distributed.on_main(lambda: save_llava(model, out / "model", tokenizer_from=tokenizer_folder(cfg.init),
                                                  template=cfg.template))
