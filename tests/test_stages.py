"""train.py's stages on a tiny synthetic world: each writes an HF-layout model and a log, and training helps."""

import json
from pathlib import Path

import pytest

import train
from mllm_cl.config import StageConfig, StageError, TrainConfig
from mllm_cl.stages import run_stage
from mllm_cl.synthetic import build_world
from mllm_cl.tokenizer import load_tokenizer
from mllm_cl.weights import load_llm, load_vision_tower


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("stages") / "world"
    build_world(folder, seed=0, size="smoke", train_per_task=48, test_per_task=4)
    return folder


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def run(stage: str, out: Path, steps: int, lr: float, **fields) -> Path:
    train_config = TrainConfig(steps=steps, global_batch_size=8, micro_batch_size=8, lrs={"": lr}, warmup_ratio=0.0,
                               log_every=1, device="cpu")
    return run_stage(StageConfig(stage=stage, out_dir=str(out), max_len=160, train=train_config, **fields))


def test_pretrain_then_align_then_finetune_lower_their_losses(world: Path, tmp_path: Path) -> None:
    tokenizer = str(world / "tokenizer.json")
    text = run("pretrain-text", tmp_path / "text", 12, 3e-3, llm="tiny", tokenizer=tokenizer,
               train_file=str(world / "text/train.txt"))
    vocab = load_llm(text).config.vocab_size  # the tokenizer's, padded to a multiple of 64
    assert vocab % 64 == 0 and 0 <= vocab - load_tokenizer(tokenizer).vocab_size < 64
    assert (text / "tokenizer.json").is_file()
    vision = run("pretrain-vision", tmp_path / "vision", 3, 1e-3, vision="clip-tiny", tokenizer=tokenizer,
                 train_file=str(world / "align.json"), image_folder=str(world))
    assert load_vision_tower(vision).config.image_size == 64
    aligned = run("align", tmp_path / "align", 12, 3e-3, llm=str(text), vision=str(vision),
                  train_file=str(world / "align.json"), image_folder=str(world))
    tuned = run("finetune", tmp_path / "finetune", 12, 1e-3, init=str(aligned), template="pythia",
                train_file=str(world / "tasks/color/train.json"), image_folder=str(world))
    for stage in ("text", "align", "finetune"):
        curve = losses(tmp_path / stage)
        assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3, (stage, curve)
    assert (tuned / "config.json").is_file() and (tuned / "llm/model.safetensors").is_file()


def test_bad_stage_settings_are_named(world: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(StageError, match="needs init"):
        run("finetune", tmp_path / "x", 1, 1e-3, train_file=str(world / "align.json"))
    code = train.main(["align", f"out_dir={tmp_path / 'y'}", "llm=tiny", "train_file=missing.json",
                       f"tokenizer={world / 'tokenizer.json'}"])
    assert code == 2 and "missing.json" in capsys.readouterr().err
    assert train.main(["finetune", "no_such_key=1"]) == 2
