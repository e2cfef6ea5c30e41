"""The whole demo pipeline at smoke size: every stage runs, and every output exists and parses."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mllm_cl.config import ConfigError, ExperimentConfig, StageError, load_json
from mllm_cl.experiment import check_same_world, ensure_world, run_experiment, run_options
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
    assert tasks == cfg.world_tasks and len(tasks) == 3
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
    load_llava(run / "methods" / "naive" / f"task_3_{tasks[-1]}" / "model")
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
