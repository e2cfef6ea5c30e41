"""The continual stage on the synthetic world: a 3-task sequence with every CL method and the papers' combinations,
and a resumed sequence that ends where an uninterrupted one does."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from mllm_cl.config import EvalSpec, StageConfig, TaskSpec, TrainConfig
from mllm_cl.llava import load_llava
from mllm_cl.methods import expand_methods
from mllm_cl.stages import run_stage

TASKS = ("color", "count", "choice")


def stage(world: Path, init: Path, out: Path, methods: list[str], options: dict | None = None) -> StageConfig:
    tasks = [TaskSpec(name=t, train=str(world / f"tasks/{t}/train.json"), test=str(world / f"tasks/{t}/test.json"),
                      image_folder=str(world)) for t in TASKS]
    return StageConfig(stage="continual", out_dir=str(out), init=str(init), tasks=tasks, template="pythia",
                       max_len=200, inquiries=str(world / "inquiries.json"), methods=methods,
                       method_options=options or {},
                       eval=EvalSpec(nl_files=[str(world / "nl/facts_mc.jsonl")], nl_limit=4, vl_limit=4,
                                     batch_size=8, max_new_tokens=2),
                       train=TrainConfig(steps=2, global_batch_size=4, micro_batch_size=4, lrs={"": 1e-3},
                                         log_every=1, device="cpu", resume=True))


METHOD_RUNS = [["naive"], ["lora"], ["soft_targets"], ["rehearsal"], ["msgm"], ["uir"], ["ewc"], ["lwf"],
               ["modelmix"], ["sac"], ["msgm", "rehearsal"], ["uir", "sac"]]


@pytest.mark.parametrize("methods", METHOD_RUNS, ids=["+".join(m) for m in METHOD_RUNS])
def test_three_task_sequence_runs_with_each_method(world: Path, init_model: Path, tmp_path: Path,
                                                   methods: list[str]) -> None:
    parts = expand_methods(methods)
    options = {name: value for name, value in (("lora", {"rank": 4}), ("rehearsal", {"share": 0.1})) if name in parts}
    last = run_stage(stage(world, init_model, tmp_path / "run", methods, options))
    results = json.loads((tmp_path / "run/results.json").read_text())
    assert results["tasks"] == list(TASKS) and len(results["after_task"]) == 3
    assert not list((tmp_path / "run").glob("task_*/*checkpoint*"))  # finished tasks keep only their model
    for after in results["after_task"]:
        assert set(after["vl"]) == set(TASKS) and 0.0 <= after["nl"]["facts_mc"]["acc"] <= 1.0
    model = load_llava(last)  # LoRA was merged: the saved model has the plain layout
    assert not any("lora_" in name for name, _ in model.named_parameters())
    logs = [after["method_log"] for after in results["after_task"]]
    if "rehearsal" in methods:  # 10% of 16 samples of each earlier task joins each later one
        assert [log["rehearsal_replayed"] for log in logs] == [0, 2, 4]
    if "uir" in methods:
        assert all("uir_last" in log for log in logs)


def test_interrupted_sequence_resumes_to_the_same_result(world: Path, init_model: Path, tmp_path: Path) -> None:
    methods, options = ["ewc", "rehearsal"], {"rehearsal": {"share": 0.1}}
    run_stage(stage(world, init_model, tmp_path / "whole", methods, options))
    whole = json.loads((tmp_path / "whole/results.json").read_text())

    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    last = tmp_path / "cut/task_3_choice"
    (last / "eval.json").unlink()  # interrupted after task 2: the last task is redone from its start
    shutil.rmtree(last)
    run_stage(stage(world, init_model, tmp_path / "cut", methods, options))
    resumed = json.loads((tmp_path / "cut/results.json").read_text())
    def scores(results: dict) -> list[dict]:  # every figure but the seconds each part took
        return [{k: v for k, v in after.items() if k != "seconds"} for after in results["after_task"]]

    assert scores(resumed) == scores(whole)
    assert all(after["seconds"]["train"] > 0 and after["seconds"]["eval"] > 0 for after in resumed["after_task"])
    final = load_llava(tmp_path / "whole/task_3_choice/model").state_dict()
    again = load_llava(last / "model").state_dict()
    assert all(torch.equal(final[k], again[k]) for k in final)


def test_runs_from_the_same_model_share_one_initial_evaluation(world: Path, init_model: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import mllm_cl.continual as continual

    evaluations = []
    real = continual.evaluate_model
    monkeypatch.setattr(continual, "evaluate_model", lambda *a: evaluations.append(1) or real(*a))
    cache = tmp_path / "initial_eval.json"
    first = stage(world, init_model, tmp_path / "a", ["naive"])
    first.initial_eval = str(cache)
    run_stage(first)
    assert len(evaluations) == 1 + len(TASKS)
    second = stage(world, init_model, tmp_path / "b", ["lora"], {"lora": {"rank": 4}})
    second.initial_eval = str(cache)
    run_stage(second)
    assert len(evaluations) == 2 * len(TASKS) + 1  # the initial scores came from the cache
    a, b = (json.loads((tmp_path / run / "results.json").read_text())["initial"] for run in "ab")
    assert a == b
    third = stage(world, init_model, tmp_path / "c", ["naive"])
    third.initial_eval, third.eval.vl_limit = str(cache), 2  # another evaluation setting: computed again
    run_stage(third)
    assert len(evaluations) == 3 * len(TASKS) + 2


def test_damaged_scores_on_resume_are_made_again_not_a_traceback(world: Path, init_model: Path, tmp_path: Path,
                                                                 capsys) -> None:
    methods = ["naive"]
    run_stage(stage(world, init_model, tmp_path / "whole", methods))
    whole = json.loads((tmp_path / "whole/results.json").read_text())
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    middle = tmp_path / "cut/task_2_count/eval.json"
    middle.write_text(middle.read_text()[:40])  # truncated, as a disk filled up or a copy stopped mid-file
    initial = tmp_path / "cut/initial_eval.json"
    initial.write_bytes(b"\xff" + initial.read_bytes()[1:])
    capsys.readouterr()
    run_stage(stage(world, init_model, tmp_path / "cut", methods))
    said = capsys.readouterr().out
    assert f"{initial} is not UTF-8 text (byte 0: invalid start byte); evaluating the starting model again" in said
    assert f"{middle} is not valid JSON" in said and "task task_2_count is learned again" in said
    resumed = json.loads((tmp_path / "cut/results.json").read_text())

    def scores(results: dict) -> list[dict]:
        return [{k: v for k, v in after.items() if k != "seconds"} for after in results["after_task"]]

    assert scores(resumed) == scores(whole) and resumed["initial"] == whole["initial"]
