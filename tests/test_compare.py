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
    assert {"lora", "ewc", "lwf", "modelmix", "sac", "olora", "l2p", "uir", "uir_replay", "uir_fkl"} <= used
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
    assert not (tmp_path / "compare" / "align").exists()  # shared, not trained again
    saved = json.loads((tmp_path / "compare" / "methods" / "l2p" / "task_2_size" / "model" / "config.json").read_text())
    assert saved["prompt_pool_top_n"] == 2  # L2P's pool is saved with each task's model
