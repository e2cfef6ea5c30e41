"""Paper 2's (LLaVA-c's) protocol at smoke size, and experiments that run after another on its shared stages
(`then`): the grid, the general-VL scores, the alpha curves and the joint run."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from mllm_cl.alpha_curves import CONSOLIDATIONS
from mllm_cl.config import ConfigError, ExperimentConfig, StageError, from_dict, load_json
from mllm_cl.experiment import follow_up, run_experiment, run_options
from mllm_cl.methods import build_methods

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("parent, rank, inquiries", [("demo", 4, "text_inquiries.json"),
                                                     ("experiment", 32, "inquiries/sciq.json")])
def test_the_paper2_grid_runs_after_paper1_on_its_stages(parent: str, rank: int, inquiries: str) -> None:
    first = load_json(ExperimentConfig, ROOT / f"configs/experiments/{parent}.json")
    path = first.then[0]
    cfg = follow_up(first, path)  # as `make demo` / `make experiment` run it
    assert cfg.protocol == "paper2" and cfg.inquiries.endswith(inquiries)
    assert cfg.out_dir == str(Path(first.out_dir) / "paper2") and cfg.shared_dir == first.out_dir
    for field in ("world", "llm", "vision", "projector", "template", "max_len", "tokenizer", "pretrain_text",
                  "pretrain_vision", "align"):  # what the shared stages depend on: they are reused, not redone
        assert getattr(cfg, field) == getattr(first, field), field
    for run_name, methods in cfg.methods.items():
        built = build_methods(methods, run_options(cfg, run_name))
        lora = [m for m in built if m.name == "lora"]
        if run_name in ("olora", "moelora", "l2p"):  # the comparison's methods with adapters of their own
            assert not lora and built[0].name == run_name
            continue
        wanted = 32 if run_name == "lora_r32" else rank  # the demo's rank experiment: d/4 of the tiny LLM's 128
        assert lora and (lora[0].rank, lora[0].rslora) == (wanted, False), run_name  # every run fine-tunes with LoRA
    assert set(cfg.ablation) <= set(cfg.methods) and set(cfg.alpha_curves.values()) <= set(cfg.methods)
    own = replace(first, llm="path/to/pythia-160m", template="pythia", workers=3)  # `make experiment MODEL=...`
    assert (follow_up(own, path).llm, follow_up(own, path).template, follow_up(own, path).workers) == \
        ("path/to/pythia-160m", "pythia", 3)  # both parts study the model the user named
    for later in first.then[1:]:  # `make experiment`'s continual pretraining, on the same instruction tuning
        pretraining = follow_up(first, later)
        assert pretraining.protocol == "paper2-pretrain" and pretraining.finetune == cfg.finetune
        assert pretraining.task_train.steps * 3 == cfg.finetune.steps  # three parts: the mix at once's steps in all


def test_paper2_protocol_instruction_tunes_first_and_measures_general_vl(tmp_path: Path) -> None:
    cfg = load_json(ExperimentConfig, ROOT / "configs/experiments/smoke.json")
    cfg = replace(cfg, out_dir=str(tmp_path / "p2"), world=str(tmp_path / "world"), protocol="paper2",
                  world_tasks=["color", "size"], methods={"llava_c": ["llava_c"], "lora": ["lora"]}, run_train={},
                  method_options={"lora": {"rank": 4, "alpha": 8.0, "rslora": False}, "sac": {"alpha": 0.2}},
                  inquiries=str(tmp_path / "world" / "text_inquiries.json"), alpha_curves={"vanilla": "lora"},
                  alpha_curve_alphas=[0.0, 0.5, 1.0], ablation=["lora", "llava_c"], joint_run="lora")
    results = run_experiment(cfg)
    run = tmp_path / "p2"
    assert results["protocol"] == "paper2" and (run / "finetune" / "model" / "config.json").is_file()
    stage = json.loads((run / "methods" / "llava_c" / "stage_config.json").read_text())
    assert Path(stage["init"]) == run / "finetune" / "model"  # the tasks start from the instruction-tuned model
    world = json.loads((tmp_path / "world" / "world.json").read_text())
    assert [t["name"] for t in stage["eval"]["general_vl"]] == [f"general_{s}" for s in world["general_skills"]]
    assert stage["eval"]["general_vl"][0]["test"].endswith(f"general/{world['general_skills'][0]}/test.json")
    finetune = json.loads((run / "finetune" / "stage_config.json").read_text())
    assert finetune["train_file"].endswith("general/train.json") and Path(finetune["init"]) == run / "align" / "model"
    llava_c = results["methods"]["llava_c"]
    assert 0.0 <= llava_c["general_vl_base"] <= 100.0 and len(llava_c["general_vl_after_task"]) == 2
    assert all(lo <= v + 1e-9 and v - 1e-9 <= hi
               for v, (lo, hi) in zip(llava_c["general_vl_after_task"], llava_c["general_vl_ci_after_task"]))
    assert "finetune" in results["timing"]["shared"]
    # the CL libraries' figures (CoIN, MCITlib), FWT against the zero-shot row
    matrix, zero = llava_c["acc_matrix"], llava_c["zero_shot"]
    assert zero == [pytest.approx(100.0 * json.loads((run / "methods" / "llava_c" / "results.json").read_text())
                                  ["initial"]["vl"][t]["acc"]) for t in ("color", "size")]
    assert llava_c["avg_acc"] == pytest.approx((matrix[1][0] + matrix[1][1]) / 2)
    assert llava_c["mean_acc"] == pytest.approx((matrix[0][0] + matrix[1][0] + matrix[1][1]) / 3)
    assert llava_c["fwt"] == pytest.approx(matrix[0][1] - zero[1])
    assert llava_c["mean_forgetting"] == pytest.approx(matrix[0][0] - matrix[1][0])
    assert "| final avg acc | mean acc | BWT | FWT | mean forgetting |" in (run / "REPORT.md").read_text()
    assert "## General VL (paper 2" in (run / "REPORT.md").read_text()
    # The starting point: general skill per skill and each task's zero-shot accuracy, chance the majority answer.
    base = json.loads((run / "results.json").read_text())["base"]
    assert set(base) == {"start", "nl_omega", "general_vl", "general_vl_by_skill", "zero_shot", "aligned_nl_omega"}
    assert base["start"] == "instruction-tuned"
    assert 0.0 <= base["aligned_nl_omega"] <= 100.0 and (run / "aligned_nl.json").is_file()
    assert base["nl_omega"] == pytest.approx(llava_c["nl_base"])
    assert base["general_vl"] == pytest.approx(llava_c["general_vl_base"])
    tests = {**{("general_vl_by_skill", s): tmp_path / f"world/general/{s}/test.json" for s in world["general_skills"]},
             **{("zero_shot", t): tmp_path / f"world/tasks/{t}/test.json" for t in ("color", "size")}}
    assert {(group, name) for group in ("general_vl_by_skill", "zero_shot") for name in base[group]} == set(tests)
    for (group, name), path in tests.items():
        m = base[group][name]
        assert set(m) == {"acc", "chance", "n", "ci"} and 0.0 <= m["acc"] <= 100.0
        answers = [r["conversations"][-1]["value"] for r in json.loads(path.read_text())][:m["n"]]
        assert m["n"] == len(answers) and m["chance"] == pytest.approx(100.0 * max(map(answers.count, answers)) /
                                                                        len(answers))
        assert m["ci"][0] <= m["acc"] <= m["ci"][1]
    assert "## The starting point: the instruction-tuned model" in (run / "REPORT.md").read_text()
    # The alpha curves: alpha 0 is the instruction-tuned model itself, alpha 1 the LoRA run's model after task 1.
    curves = json.loads((run / "alpha_curves.json").read_text())
    assert curves["task"] == "color" and set(curves["runs"]) == {f"vanilla/{c}" for c in CONSOLIDATIONS}
    for name, curve in curves["runs"].items():
        assert curve["alpha"] == [0.0, 0.5, 1.0] and len(curve["general"]) == len(curve["task"]) == 3, name
        assert curve["general"][0] == pytest.approx(curves["base_general"])
        assert curve["task"][-1] == pytest.approx(results["methods"]["lora"]["acc_matrix"][0][0])
        assert set(curves["regions"][name]) == {"alpha_G", "alpha_T"}
    report = (run / "REPORT.md").read_text()
    assert "## Alpha curves (paper 2, Figure 4)" in report and (run / "alpha_general.png").is_file()
    assert "alpha curves of vanilla" in results["timing"]["shared"]
    # The joint run: the LoRA run's methods on both tasks' samples at once, as many steps as the sequence.
    joint = results["joint"]
    assert joint["run"] == "lora" and joint["steps"] == 2 * cfg.task_train.steps
    assert set(joint["vl"]) == {"color", "size"}
    mixed = json.loads((run / "joint" / "train.json").read_text())
    assert len(mixed) == sum(len(json.loads(Path(t).read_text())) for t in
                             (tmp_path / "world/tasks/color/train.json", tmp_path / "world/tasks/size/train.json"))
    assert 0.0 <= joint["general"] <= 100.0
    assert "After the last task: general score and every task, beside the joint reference" in report
    assert llava_c["general_after_task"][-1] == pytest.approx(
        2 / (1 / max(llava_c["nl_after_task"][-1], 0.1) + 1 / max(llava_c["general_vl_after_task"][-1], 0.1)))
    with pytest.raises(StageError, match="protocol must be one of paper1, paper2"):
        run_experiment(replace(cfg, protocol="llava"))
    with pytest.raises(StageError, match="set protocol=paper2"):
        run_experiment(replace(cfg, protocol="paper1"))
    with pytest.raises(StageError, match=r"alpha_curves names runs \['lroa'\]"):
        run_experiment(replace(cfg, alpha_curves={"vanilla": "lroa"}))
    with pytest.raises(StageError, match="L2P or MoELoRA model keeps parts beside its weights"):
        run_experiment(replace(cfg, methods={**cfg.methods, "l2p": ["l2p"]}, alpha_curves={"vanilla": "l2p"}))
    with pytest.raises(StageError, match="leave joint_run and world_tasks empty"):
        run_experiment(replace(cfg, protocol="paper2-pretrain", alpha_curves={}))


def test_then_runs_another_experiment_on_the_shared_stages(tmp_path: Path) -> None:
    base = json.loads((ROOT / "configs/experiments/smoke.json").read_text())
    base.update(world=str(tmp_path / "world"), world_tasks=["color", "size"], run_train={},
                methods={"naive": ["naive"]}, method_options={}, eval={**base["eval"], "nl_limit": 4, "vl_limit": 4})
    follower = {**base, "name": "p2", "out_dir": "ignored", "protocol": "paper2", "methods": {"lora": ["lora"]},
                "method_options": {"lora": {"rank": 4}}, "then": [], "joint_run": "lora",
                "alpha_curves": {"vanilla": "lora", "again": "lora"}, "alpha_curve_alphas": [0.0, 1.0]}
    (tmp_path / "p2.json").write_text(json.dumps(follower))
    other = {**follower, "name": "p2other", "align": {**base["align"], "lrs": {"": 5e-3}},  # its own alignment
             "protocol": "paper1", "methods": {"naive": ["naive"]}, "method_options": {}, "joint_run": "",
             "alpha_curves": {}}
    (tmp_path / "p2other.json").write_text(json.dumps(other))
    cfg = replace(from_dict(ExperimentConfig, base), out_dir=str(tmp_path / "run"), seeds=2, workers=2,
                  then=[str(tmp_path / "p2.json"), str(tmp_path / "p2other.json")])
    results = run_experiment(cfg)

    seed = tmp_path / "run" / "seed_1"
    assert not (seed / "p2" / "align" / "model").exists() and not (seed / "p2" / "pretrain_text" / "model").exists()
    assert Path(json.loads((seed / "p2" / "align" / "reused.json").read_text())["stage"]) == seed / "align"
    finetune = json.loads((seed / "p2" / "finetune" / "stage_config.json").read_text())
    assert Path(finetune["init"]) == seed / "align" / "model"  # paper 2 starts from paper 1's aligned model
    assert finetune["train"]["seed"] == 1  # with the seed of the run that started it
    assert (seed / "p2other" / "align" / "model").is_dir()  # other settings: trained again, not reused
    assert Path(json.loads((seed / "p2other" / "align" / "stage_config.json").read_text())["llm"]) == \
        seed / "pretrain_text" / "model"
    per_seed = json.loads((seed / "results.json").read_text())
    assert per_seed["then"]["p2"]["out_dir"] == str(seed / "p2") and per_seed["then"]["p2"]["seconds"] > 0
    assert "(p2/REPORT.md)" in (seed / "REPORT.md").read_text()
    assert json.loads((seed / "p2" / "results.json").read_text())["protocol"] == "paper2"
    summary = json.loads((tmp_path / "run" / "p2" / "results.json").read_text())  # p2 over the two seeds
    lora = summary["methods"]["lora"]
    assert len(lora["nl_delta_per_seed"]) == 2 and len(lora["general_after_task_sd"]) == 2
    assert lora["fwt_per_seed"] == [json.loads((tmp_path / "run" / f"seed_{s}" / "p2" / "results.json").read_text())
                                    ["methods"]["lora"]["fwt"] for s in (0, 1)] and "mean_acc_sd" in lora
    assert "final general" in (tmp_path / "run" / "p2" / "REPORT.md").read_text()
    assert len(summary["joint"]["per_seed"]) == 2 and set(summary["joint"]["vl"]) == {"color", "size"}
    base = summary["base"]  # the starting point over seeds: mean, sd and each seed's value
    seeds_base = [json.loads((tmp_path / "run" / f"seed_{s}" / "p2" / "results.json").read_text())["base"]
                  for s in (0, 1)]
    assert base["zero_shot"]["color"]["acc_per_seed"] == [b["zero_shot"]["color"]["acc"] for b in seeds_base]
    assert base["nl_omega"] == pytest.approx((seeds_base[0]["nl_omega"] + seeds_base[1]["nl_omega"]) / 2)
    assert base["zero_shot"]["color"]["n"] == 4 and "acc_sd" in base["general_vl_by_skill"]["describe"]
    assert "## The starting point" in (tmp_path / "run" / "p2" / "REPORT.md").read_text()
    curves = json.loads((tmp_path / "run" / "p2" / "alpha_curves.json").read_text())
    assert curves["seeds"] == 2 and len(curves["regions_per_seed"]["vanilla/modelmix"]) == 2
    logs = seed / "p2" / "alpha_curves"  # two workers: each model's alphas shared by two jobs, one log each
    assert "alpha curves: vanilla/sac-top alpha 1.0" in (logs / "vanilla.part2.log").read_text()
    drawn = json.loads((seed / "p2" / "alpha_curves.json").read_text())["runs"]  # one model, two workers
    assert all(drawn[f"again/{c}"] == drawn[f"vanilla/{c}"] for c in CONSOLIDATIONS)
    assert set(results["then"]) == {"p2", "p2other"}

    nested = {**follower, "then": [str(tmp_path / "p2.json")]}
    (tmp_path / "nested.json").write_text(json.dumps(nested))
    with pytest.raises(StageError, match="cannot"):
        run_experiment(replace(cfg, out_dir=str(tmp_path / "x"), then=[str(tmp_path / "nested.json")]))
    with pytest.raises(ConfigError, match="does not exist"):
        run_experiment(replace(cfg, out_dir=str(tmp_path / "x"), then=[str(tmp_path / "missing.json")]))
    assert not (tmp_path / "x").exists()  # refused before anything ran


def test_the_demos_paper2_is_the_full_one_less_what_does_not_fit_in_its_time() -> None:
    # make demo runs paper2-demo.json to stay within 15 minutes; everything else must stay paper2.json's.
    full = json.loads((ROOT / "configs/experiments/paper2.json").read_text())
    demo = json.loads((ROOT / "configs/experiments/paper2-demo.json").read_text())
    dropped = {"lora+ewc", "lora+lwf"}
    assert dropped <= set(full["methods"]) and not dropped & set(demo["methods"])
    assert demo["methods"] == {k: v for k, v in full["methods"].items() if k not in dropped}
    assert demo["alpha_curves"] == {k: v for k, v in full["alpha_curves"].items() if k != "uir"}
    assert demo["method_options"] == {k: v for k, v in full["method_options"].items() if k != "ewc"}
    rest = {"methods", "alpha_curves", "method_options"}
    assert {k: v for k, v in demo.items() if k not in rest} == {k: v for k, v in full.items() if k not in rest}
