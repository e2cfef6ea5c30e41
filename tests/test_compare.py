"""`make compare` (paper 2's comparison, continual fine-tuning) at smoke size: every method of its tables runs and
writes its row, with the CL libraries' figures, on the stages of a finished experiment (`shared_dir`)."""

import json
from dataclasses import replace
from pathlib import Path

from mllm_cl.config import ExperimentConfig, load_json
from mllm_cl.experiment import run_experiment, run_options
from mllm_cl.methods import build_methods

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("avg_acc", "mean_acc", "bwt", "fwt", "mean_forgetting", "general_after_task", "nl_delta")


def test_the_compare_config_holds_paper_2s_comparison() -> None:
    cfg = load_json(ExperimentConfig, ROOT / "configs/experiments/compare.json")
    demo = load_json(ExperimentConfig, ROOT / "configs/experiments/paper2-demo.json")
    assert cfg.protocol == "paper2" and cfg.shared_dir == "runs/demo"
    used = {m.name for run in cfg.methods for m in build_methods(cfg.methods[run], run_options(cfg, run))}
    assert {"lora", "ewc", "lwf", "modelmix", "sac", "olora", "moelora", "l2p", "uir", "uir_replay", "uir_fkl"} <= used
    for field in ("world", "llm", "vision", "template", "max_len", "pretrain_text", "pretrain_vision", "align",
                  "finetune", "task_train", "eval", "inquiries"):  # the demo's paper-2 model and training
        assert getattr(cfg, field) == getattr(demo, field), field


def test_a_tiny_compare_writes_every_methods_row_and_the_new_figures(tmp_path: Path) -> None:
    full = load_json(ExperimentConfig, ROOT / "configs/experiments/compare.json")
    smoke = load_json(ExperimentConfig, ROOT / "configs/experiments/smoke.json")
    first = replace(smoke, out_dir=str(tmp_path / "first"), world=str(tmp_path / "world"), methods={"naive": ["naive"]},
                    world_tasks=["color", "size"], run_train={})
    run_experiment(first)  # the finished experiment whose stages compare reuses
    options = {**full.method_options, "lora": {"rank": 2, "alpha": 4.0, "rslora": False}, "olora": {"rank": 2},
               "l2p": {"pool_size": 4, "prompt_length": 2, "top_n": 2}}
    cfg = replace(first, name="compare", out_dir=str(tmp_path / "compare"), shared_dir=first.out_dir,
                  protocol="paper2", methods=full.methods, method_options=options, ablation=full.ablation,
                  inquiries=str(tmp_path / "world" / "text_inquiries.json"), workers=2)
    results = run_experiment(cfg)
    assert list(results["methods"]) == list(full.methods)
    for name, run in results["methods"].items():
        assert all(run.get(figure) is not None for figure in FIGURES), name
    report = (tmp_path / "compare" / "REPORT.md").read_text()
    assert all(f"| {name} |" in report for name in full.methods)
    assert "| final avg acc | mean acc | BWT | FWT | mean forgetting |" in report
    assert not (tmp_path / "compare" / "align" / "model").exists()  # shared, not trained again
    reused = json.loads((tmp_path / "compare" / "align" / "reused.json").read_text())  # for experiments sharing these
    assert Path(reused["stage"]) == tmp_path / "first" / "align"
    saved = json.loads((tmp_path / "compare" / "methods" / "l2p" / "task_2_size" / "model" / "config.json").read_text())
    assert saved["prompt_pool_top_n"] == 2  # L2P's pool is saved with each task's model


def test_the_pretraining_config_learns_the_mix_the_finetune_stage_learns_at_once() -> None:
    cfg = load_json(ExperimentConfig, ROOT / "configs/experiments/compare-pretrain.json")
    compare = load_json(ExperimentConfig, ROOT / "configs/experiments/compare.json")
    assert cfg.protocol == "paper2-pretrain" and compare.then == ["configs/experiments/compare-pretrain.json"]
    assert cfg.task_train == cfg.finetune == compare.finetune  # the same epochs per record, task by task or at once
    used = {m.name for run in cfg.methods for m in build_methods(cfg.methods[run], run_options(cfg, run))}
    assert {"naive", "lwf", "ewc", "l2p", "olora", "moelora", "modelmix", "sac", "uir"} <= used


def test_a_tiny_continual_pretraining_scores_each_part_and_the_mix_at_once(tmp_path: Path) -> None:
    full = load_json(ExperimentConfig, ROOT / "configs/experiments/compare-pretrain.json")
    smoke = load_json(ExperimentConfig, ROOT / "configs/experiments/smoke.json")
    options = {**full.method_options, "lora": {"rank": 2, "alpha": 4.0, "rslora": False}, "olora": {"rank": 2},
               "l2p": {"pool_size": 4, "prompt_length": 2, "top_n": 2}}
    cfg = replace(smoke, name="pretrain", out_dir=str(tmp_path / "pretrain"), world=str(tmp_path / "world"),
                  protocol="paper2-pretrain", methods=full.methods, method_options=options, ablation=full.ablation,
                  inquiries=str(tmp_path / "world" / "text_inquiries.json"), world_tasks=[], run_train={},
                  task_train=replace(smoke.finetune, epochs=1), workers=2)
    results = run_experiment(cfg)
    assert results["tasks"] == ["language", "describe", "pair"]  # the text-only part first, as paper 2's tqa
    world = json.loads((tmp_path / "world" / "general" / "train.json").read_text())
    parts = {task: json.loads((tmp_path / "pretrain" / "mix_parts" / task / "train.json").read_text())
             for task in results["tasks"]}
    assert sorted(r["id"] for part in parts.values() for r in part) == sorted(r["id"] for r in world)
    assert all("image" in r for task in ("describe", "pair") for r in parts[task])
    assert not any("image" in r for r in parts["language"])
    initial = json.loads((tmp_path / "pretrain" / "initial_eval.json").read_text())
    assert initial["vl"] == {}  # no task has a test of its own: the general evaluation scores the parts
    for name, run in results["methods"].items():
        assert all(run.get(figure) is not None for figure in FIGURES), name
        assert run["zero_shot"][1] == 100.0 * initial["general_vl"]["general_describe"]["acc"]
    joint = results["joint"]
    assert joint["run"] == "finetune" and set(joint["vl"]) == set(results["tasks"]) and "general" in joint
    assert results["base"]["start"] == "aligned" and set(results["base"]["zero_shot"]) == {"describe", "pair"}
    report = (tmp_path / "pretrain" / "REPORT.md").read_text()
    assert "## Continual pretraining (paper 2's Tables 2-3)" in report
    assert "the mix at once (finetune)" in report and "## The starting point: the aligned model" in report
