"""The whole demo pipeline at smoke size: every stage runs, and every output exists and parses."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mllm_cl.config import ConfigError, ExperimentConfig, StageError, from_dict, load_json
from mllm_cl.experiment import check_same_world, ensure_world, follow_up, run_experiment, run_options
from mllm_cl.alpha_curves import CONSOLIDATIONS
from mllm_cl.methods import build_methods
from mllm_cl.synthetic import WORLD_VERSION
from mllm_cl.llava import load_llava

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_experiment_end_to_end(tmp_path: Path) -> None:
    cfg = load_json(ExperimentConfig, ROOT / "configs/experiments/smoke.json")
    cfg = replace(cfg, out_dir=str(tmp_path / "run"), world=str(tmp_path / "world"))
    results = run_experiment(cfg)

    run = tmp_path / "run"
    on_disk = json.loads((run / "results.json").read_text())
    assert on_disk["methods"].keys() == cfg.methods.keys() == results["methods"].keys()
    tasks = on_disk["tasks"]
    assert len(tasks) == 5
    for name, summary in on_disk["methods"].items():
        matrix = summary["acc_matrix"]
        assert len(matrix) == len(tasks) and all(len(row) == len(tasks) for row in matrix), name
        assert all(0.0 <= a <= 100.0 for row in matrix for a in row)
        assert len(summary["nl_after_task"]) == len(summary["vl_after_task"]) == len(tasks)
        assert isinstance(summary["nl_delta"], float) and isinstance(summary["vl_hmean"], float)
        low, high = summary["nl_delta_ci"]  # the paired bootstrap brackets the measured Delta
        assert low <= summary["nl_delta"] + 1e-9 and summary["nl_delta"] - 1e-9 <= high
        for row, intervals in zip(matrix, summary["acc_matrix_ci"]):
            assert all(lo <= a + 1e-9 and a - 1e-9 <= hi for a, (lo, hi) in zip(row, intervals))
        assert summary["nlu_base"] is not None and summary["nlg_base"] is not None  # facts_mc and last_word
        assert len(summary["nlu_after_task"]) == len(summary["nlg_after_task"]) == len(tasks)
        for index, task in enumerate(tasks):
            assert (run / "methods" / name / f"task_{index + 1}_{task}" / "eval.json").is_file()
    for stage in ("pretrain_text", "pretrain_vision", "align"):
        assert (run / stage / "model" / "config.json").is_file()
        assert (run / stage / "log.jsonl").read_text().strip()
    load_llava(run / "methods" / "naive" / f"task_5_{tasks[-1]}" / "model")
    report = (run / "REPORT.md").read_text()
    assert "naive" in report and "uir+sac" in report
    assert "NL Delta [95% CI]" in report and "## NLU and NLG (paper 1)" in report
    assert "Table 3 layout" in report and "Table 4 layout" in report and "## Where the time went" in report
    assert on_disk["protocol"] == "paper1" and "general_vl_base" not in on_disk["methods"]["naive"]
    assert "## General VL" not in report
    pngs = sorted(p.name for p in run.glob("*.png"))
    assert pngs, "the report draws its plots as PNG files"
    for summary in on_disk["methods"].values():  # NL Delta along the sequence ends at the final NL Delta
        assert summary["nl_delta_after_task"][-1] == summary["nl_delta"]
        assert len(summary["nl_delta_ci_after_task"]) == len(tasks)

    # Where the time went: every shared part, and every method run's training and evaluation.
    timing = on_disk["timing"]
    assert list(timing["shared"]) == ["world", "pretrain-text", "pretrain-vision", "align"]
    assert timing["methods"].keys() == cfg.methods.keys()
    assert all(m["train"] > 0 and m["eval"] > 0 and m["train"] + m["eval"] <= m["wall"] + 1e-6
               for m in timing["methods"].values())
    assert sum(timing["shared"].values()) + sum(m["wall"] for m in timing["methods"].values()) <= timing["total"]
    # run_train gives one run its own learning rate; the others keep task_train's
    saved = {name: json.loads((run / "methods" / name / "stage_config.json").read_text())["train"]["lrs"]
             for name in cfg.methods}
    assert saved["msgm+rehearsal"] == {"": 2e-3} and saved["naive"] == {"": 1e-3}

    # Running it again reuses every finished stage and gives the same accuracies.
    again = run_experiment(cfg)
    assert again["methods"]["naive"]["acc_matrix"] == results["methods"]["naive"]["acc_matrix"]
    # ... and its wall-clock time counts the earlier invocations too
    assert again["wall_seconds"] >= json.loads((run / "timing.json").read_text())["seconds"] >= results["wall_seconds"]


def test_seeds_run_the_grid_per_seed_and_report_mean_and_sd(tmp_path: Path) -> None:
    cfg = load_json(ExperimentConfig, ROOT / "configs/experiments/smoke.json")
    cfg = replace(cfg, out_dir=str(tmp_path / "seeds"), world=str(tmp_path / "world"), seeds=2,
                  world_tasks=["color", "count"], methods={"naive": ["naive"]}, run_train={})
    results = run_experiment(cfg)
    naive = results["methods"]["naive"]
    first, second = naive["nl_delta_per_seed"]
    assert first != second  # other seeds, other runs
    assert naive["nl_delta"] == pytest.approx((first + second) / 2)
    assert naive["nl_delta_sd"] == pytest.approx(abs(first - second) / 2 ** 0.5)
    assert (tmp_path / "seeds" / "seed_1" / "results.json").is_file()
    assert "## Over seeds (mean +/- sd)" in (tmp_path / "seeds" / "REPORT.md").read_text()
    alone = run_experiment(replace(cfg, out_dir=str(tmp_path / "alone"), seeds=1))  # the same seed, the same run
    assert alone["methods"]["naive"]["nl_delta"] == first
    assert alone["methods"]["naive"]["acc_matrix"] == json.loads(
        (tmp_path / "seeds" / "seed_0" / "results.json").read_text())["methods"]["naive"]["acc_matrix"]


def test_run_train_names_runs_and_train_fields(tmp_path: Path) -> None:
    cfg = replace(load_json(ExperimentConfig, ROOT / "configs/experiments/smoke.json"), out_dir=str(tmp_path / "r"))
    with pytest.raises(StageError, match=r"run_train names \['lroa'\], which are not method runs"):
        run_experiment(replace(cfg, run_train={"lroa": {"epochs": 2}}))
    with pytest.raises(ConfigError, match=r"run_train.naive: unknown key\(s\) \['lr'\]"):
        run_experiment(replace(cfg, run_train={"naive": {"lr": 2e-4}}))
    assert not (tmp_path / "r").exists()  # refused before anything ran


def test_a_run_on_another_world_is_refused_and_an_old_world_regenerated(tmp_path: Path) -> None:
    cfg = load_json(ExperimentConfig, ROOT / "configs/experiments/smoke.json")
    cfg = replace(cfg, out_dir=str(tmp_path / "run"), world=str(tmp_path / "world"), methods={"naive": ["naive"]})
    world = ensure_world(cfg)
    (tmp_path / "run").mkdir()
    check_same_world(tmp_path / "run", world)
    check_same_world(tmp_path / "run", world)  # the same world again: fine
    manifest = json.loads((world / "world.json").read_text())
    assert manifest["version"] == WORLD_VERSION
    (world / "world.json").write_text(json.dumps({**manifest, "version": 1}))  # a world an older generator drew
    assert json.loads((ensure_world(cfg) / "world.json").read_text()) == manifest  # redrawn, identical
    (world / "world.json").write_text(json.dumps({**manifest, "seed": 7}))
    with pytest.raises(StageError, match="trained on another world"):
        check_same_world(tmp_path / "run", world)
    with pytest.raises(StageError, match="holds a version-1 world"):
        (world / "world.json").write_text(json.dumps({**manifest, "version": 1}))
        ensure_world(replace(cfg, world_size=""))


def test_run_method_options_give_one_run_its_own_method_settings(tmp_path: Path) -> None:
    cfg = load_json(ExperimentConfig, ROOT / "configs/experiments/smoke.json")
    cfg = replace(cfg, out_dir=str(tmp_path / "r"), methods={"p1": ["msgm"], "p2": ["llava_c"]},
                  method_options={"lora": {"rank": 8}, "sac": {"alpha": 0.2}}, run_train={},
                  run_method_options={"p2": {"lora": {"rank": 4, "alpha": 8.0, "rslora": False}}})
    assert run_options(cfg, "p1") == {"lora": {"rank": 8}}
    assert run_options(cfg, "p2") == {"lora": {"rank": 4, "alpha": 8.0, "rslora": False}, "sac": {"alpha": 0.2}}
    with pytest.raises(StageError, match=r"run_method_options names \['p3'\]"):
        run_experiment(replace(cfg, run_method_options={"p3": {}}))
    with pytest.raises(ConfigError, match=r"\['ewc'\] that are not in methods"):
        run_experiment(replace(cfg, run_method_options={"p1": {"ewc": {"weight": 1.0}}}))
    assert not (tmp_path / "r").exists()  # refused before anything ran


@pytest.mark.parametrize("parent, rank, inquiries", [("demo", 4, "text_inquiries.json"),
                                                     ("experiment", 32, "inquiries/sciq.json")])
def test_the_paper2_grid_runs_after_paper1_on_its_stages(parent: str, rank: int, inquiries: str) -> None:
    first = load_json(ExperimentConfig, ROOT / f"configs/experiments/{parent}.json")
    (path,) = first.then
    cfg = follow_up(first, path)  # as `make demo` / `make experiment` run it
    assert cfg.protocol == "paper2" and cfg.inquiries.endswith(inquiries)
    assert cfg.out_dir == str(Path(first.out_dir) / "paper2") and cfg.shared_dir == first.out_dir
    for field in ("world", "llm", "vision", "projector", "template", "max_len", "tokenizer", "pretrain_text",
                  "pretrain_vision", "align"):  # what the shared stages depend on: they are reused, not redone
        assert getattr(cfg, field) == getattr(first, field), field
    for run_name, methods in cfg.methods.items():
        built = build_methods(methods, run_options(cfg, run_name))
        lora = [m for m in built if m.name == "lora"]
        assert lora and (lora[0].rank, lora[0].rslora) == (rank, False), run_name  # every run fine-tunes with LoRA
    assert set(cfg.ablation) <= set(cfg.methods) and set(cfg.alpha_curves.values()) <= set(cfg.methods)
    own = replace(first, llm="path/to/pythia-160m", template="pythia", workers=3)  # `make experiment MODEL=...`
    assert (follow_up(own, path).llm, follow_up(own, path).template, follow_up(own, path).workers) == \
        ("path/to/pythia-160m", "pythia", 3)  # both parts study the model the user named


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
    assert stage["eval"]["general_vl"][0]["test"].endswith("general/test.json")
    finetune = json.loads((run / "finetune" / "stage_config.json").read_text())
    assert finetune["train_file"].endswith("general/train.json") and Path(finetune["init"]) == run / "align" / "model"
    llava_c = results["methods"]["llava_c"]
    assert 0.0 <= llava_c["general_vl_base"] <= 100.0 and len(llava_c["general_vl_after_task"]) == 2
    assert all(lo <= v + 1e-9 and v - 1e-9 <= hi
               for v, (lo, hi) in zip(llava_c["general_vl_after_task"], llava_c["general_vl_ci_after_task"]))
    assert "finetune" in results["timing"]["shared"]
    assert "## General VL (paper 2" in (run / "REPORT.md").read_text()
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
    assert "alpha curves" in results["timing"]["shared"]
    # The joint run: the LoRA run's methods on both tasks' samples at once, as many steps as the sequence.
    joint = results["joint"]
    assert joint["run"] == "lora" and joint["steps"] == 2 * cfg.task_train.steps and set(joint["vl"]) == {"color", "size"}
    mixed = json.loads((run / "joint" / "train.json").read_text())
    assert len(mixed) == sum(len(json.loads(Path(t).read_text())) for t in
                             (tmp_path / "world/tasks/color/train.json", tmp_path / "world/tasks/size/train.json"))
    assert 0.0 <= joint["general"] <= 100.0 and "Ablation and the joint reference" in report
    assert llava_c["general_after_task"][-1] == pytest.approx(
        2 / (1 / max(llava_c["nl_after_task"][-1], 0.1) + 1 / max(llava_c["general_vl_after_task"][-1], 0.1)))
    with pytest.raises(StageError, match="protocol must be one of paper1, paper2"):
        run_experiment(replace(cfg, protocol="llava"))
    with pytest.raises(StageError, match="set protocol=paper2"):
        run_experiment(replace(cfg, protocol="paper1"))
    with pytest.raises(StageError, match=r"alpha_curves names runs \['lroa'\]"):
        run_experiment(replace(cfg, alpha_curves={"vanilla": "lroa"}))


def test_then_runs_another_experiment_on_the_shared_stages(tmp_path: Path) -> None:
    base = json.loads((ROOT / "configs/experiments/smoke.json").read_text())
    base.update(world=str(tmp_path / "world"), world_tasks=["color", "size"], run_train={},
                methods={"naive": ["naive"]}, method_options={}, eval={**base["eval"], "nl_limit": 4, "vl_limit": 4})
    follower = {**base, "name": "p2", "out_dir": "ignored", "protocol": "paper2", "methods": {"lora": ["lora"]},
                "method_options": {"lora": {"rank": 4}}, "then": [], "joint_run": "lora",
                "alpha_curves": {"vanilla": "lora", "again": "lora"}, "alpha_curve_alphas": [0.0, 1.0]}
    (tmp_path / "p2.json").write_text(json.dumps(follower))
    other = {**follower, "name": "p2other", "align": {**base["align"], "lrs": {"": 5e-3}},  # its own alignment
             "joint_run": "", "alpha_curves": {}}
    (tmp_path / "p2other.json").write_text(json.dumps(other))
    cfg = replace(from_dict(ExperimentConfig, base), out_dir=str(tmp_path / "run"), seeds=2, workers=2,
                  then=[str(tmp_path / "p2.json"), str(tmp_path / "p2other.json")])
    results = run_experiment(cfg)

    seed = tmp_path / "run" / "seed_1"
    assert not (seed / "p2" / "align").exists() and not (seed / "p2" / "pretrain_text").exists()
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
    assert "final general" in (tmp_path / "run" / "p2" / "REPORT.md").read_text()
    assert len(summary["joint"]["per_seed"]) == 2 and set(summary["joint"]["vl"]) == {"color", "size"}
    curves = json.loads((tmp_path / "run" / "p2" / "alpha_curves.json").read_text())
    assert curves["seeds"] == 2 and len(curves["regions_per_seed"]["vanilla/modelmix"]) == 2
    assert "alpha curves: vanilla/sac-top" in (seed / "p2" / "alpha_curves" / "vanilla.log").read_text()
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


def test_workers_run_the_method_runs_side_by_side_with_the_same_results(tmp_path: Path) -> None:
    cfg = load_json(ExperimentConfig, ROOT / "configs/experiments/smoke.json")
    cfg = replace(cfg, world=str(tmp_path / "world"), world_tasks=["color", "size"], run_train={},
                  methods={"naive": ["naive"], "lora": ["lora"]}, joint_run="naive")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a worker of two gets max(1, 1 // 2) = 1 thread: the same arithmetic as here
    try:
        alone = run_experiment(replace(cfg, out_dir=str(tmp_path / "one")))
        side_by_side = run_experiment(replace(cfg, out_dir=str(tmp_path / "two"), workers=2))
    finally:
        torch.set_num_threads(threads)
    for name in cfg.methods:
        for field in ("acc_matrix", "nl_after_task", "nl_delta"):
            assert side_by_side["methods"][name][field] == alone["methods"][name][field], (name, field)
        assert "=== method run" in (tmp_path / "two" / "methods" / name / "output.log").read_text()
    assert side_by_side["joint"] == alone["joint"]
    assert "method runs, 2 at a time" in side_by_side["timing"]["shared"]
    assert side_by_side["timing"]["methods"].keys() == cfg.methods.keys()


def test_the_joint_run_mixes_tasks_whose_images_lie_in_different_folders(tmp_path: Path) -> None:
    from mllm_cl.config import TaskSpec
    from mllm_cl.experiment import mix_tasks

    for folder, name in (("data/world", "a.png"), ("data/offline/vqa", "b.png")):
        (tmp_path / folder / "images").mkdir(parents=True)
        (tmp_path / folder / "images" / name).write_bytes(b"png")
        entry = {"image": f"images/{name}", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                               {"from": "gpt", "value": "a"}]}
        for split in ("train", "test"):
            (tmp_path / folder / f"{split}.json").write_text(json.dumps([entry]))
    tasks = [TaskSpec(name=n, train=str(tmp_path / f / "train.json"), test=str(tmp_path / f / "test.json"),
                      image_folder=str(tmp_path / f))
             for n, f in (("world", "data/world"), ("vqa", "data/offline/vqa"))]
    joint = mix_tasks(tasks, tmp_path / "joint")
    assert Path(joint.image_folder) == (tmp_path / "data").resolve()
    records = json.loads(Path(joint.train).read_text())
    assert [r["id"] for r in records] == ["world-0", "vqa-0"]
    assert [(Path(joint.image_folder) / r["image"]).read_bytes() for r in records] == [b"png", b"png"]
    one = mix_tasks(tasks[:1], tmp_path / "one")  # one folder: the records are kept as they are
    assert one.image_folder == tasks[0].image_folder
    assert json.loads(Path(one.test).read_text())[0]["image"] == "images/a.png"


def test_a_one_task_experiment_reports_what_one_task_allows(tmp_path: Path) -> None:
    cfg = load_json(ExperimentConfig, ROOT / "configs/experiments/smoke.json")
    cfg = replace(cfg, out_dir=str(tmp_path / "run"), world=str(tmp_path / "world"), world_tasks=["color"],
                  methods={"naive": ["naive"]}, run_train={})
    results = run_experiment(cfg)
    naive = json.loads((tmp_path / "run" / "results.json").read_text())["methods"]["naive"]
    assert naive == json.loads(json.dumps(results["methods"]["naive"]))
    assert naive["task_names"] == ["color"] and len(naive["acc_matrix"]) == 1
    assert naive["bwt"] is None and naive["forgetting"] == []  # nothing earlier to forget
    assert isinstance(naive["nl_delta"], float) and isinstance(naive["vl_hmean"], float)
    summary = next(line for line in (tmp_path / "run" / "REPORT.md").read_text().splitlines()
                   if line.startswith("| naive |"))
    assert summary.endswith("| - | - |")  # BWT and mean forgetting

    # eval.py --report reads the method run's own results.json (what train.py continual writes) as well
    import eval as eval_cli

    assert eval_cli.main(["--report", str(tmp_path / "run" / "methods" / "naive"), "--out",
                          str(tmp_path / "report")]) == 0
    again = next(line for line in (tmp_path / "report" / "REPORT.md").read_text().splitlines()
                 if line.startswith("| naive |"))
    assert again == summary  # the same figures as the experiment's own report
