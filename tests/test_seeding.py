"""The same seed gives the same run: every stage's initialisation and a LoRA task's adapters are seeded from the
config, stage by stage, so two runs in one process (the global RNG in another state) write identical weights."""

import hashlib
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mllm_cl.config import EvalSpec, StageConfig, TaskSpec, TrainConfig
from mllm_cl.seeding import derive_seed
from mllm_cl.stages import run_stage
from mllm_cl.synthetic import build_world


def test_derived_seeds_are_stable_and_distinct() -> None:
    assert derive_seed(0, "init", "align") == derive_seed(0, "init", "align")
    seeds = {derive_seed(s, "init", stage) for s in (0, 1) for stage in ("pretrain-text", "align")}
    assert len(seeds) == 4 and all(0 <= s < 2 ** 63 for s in seeds)
    digest = hashlib.sha256(b"0/task/1").digest()  # a hash of the labels, not Python's salted hash()
    assert derive_seed(0, "task", 1) == int.from_bytes(digest[:8], "little") >> 1


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("seeding") / "world"
    build_world(folder, seed=0, size="smoke", image_size=16, train_per_task=16, test_per_task=4)
    return folder


def weights(folder: Path) -> dict:
    return {f"{path.relative_to(folder)}:{k}": v for path in sorted(folder.rglob("*.safetensors"))
            for k, v in load_file(path).items()}


def pipeline(world: Path, out: Path, seed: int) -> dict[str, dict]:
    """pretrain-text -> align -> one LoRA task, 2 steps each; the weights each stage wrote."""
    train = TrainConfig(steps=2, global_batch_size=4, micro_batch_size=4, lrs={"": 1e-3}, log_every=1, device="cpu",
                        seed=seed)
    common = dict(max_len=160, train=train, vision="clip-tiny", tokenizer=str(world / "tokenizer.json"))
    text = run_stage(StageConfig(stage="pretrain-text", out_dir=str(out / "text"), llm="tiny",
                                 train_file=str(world / "text/train.txt"), **common))
    aligned = run_stage(StageConfig(stage="align", out_dir=str(out / "align"), llm=str(text),
                                    train_file=str(world / "align.json"), image_folder=str(world), **common))
    task = TaskSpec(name="color", train=str(world / "tasks/color/train.json"),
                    test=str(world / "tasks/color/test.json"), image_folder=str(world))
    last = run_stage(StageConfig(stage="continual", out_dir=str(out / "lora"), init=str(aligned), tasks=[task],
                                 methods=["lora"], method_options={"lora": {"rank": 4}},
                                 eval=EvalSpec(nl_files=[str(world / "nl/facts_mc.jsonl")], nl_limit=2, vl_limit=2,
                                               batch_size=4, max_new_tokens=2), **common))
    return {"pretrain-text": weights(text), "align": weights(aligned), "lora": weights(last)}


def test_same_seed_same_weights_other_seed_other_weights(world: Path, tmp_path: Path) -> None:
    first, second = pipeline(world, tmp_path / "a", seed=3), pipeline(world, tmp_path / "b", seed=3)
    other = pipeline(world, tmp_path / "c", seed=4)
    for stage in first:
        assert first[stage].keys() == second[stage].keys()
        differ = [k for k in first[stage] if not (first[stage][k] == second[stage][k]).all()]
        assert not differ, f"{stage}: the same seed gave other weights in {differ[:3]}"
        assert any(not (first[stage][k] == other[stage][k]).all() for k in first[stage]), stage
