"""train.py under torchrun on the CPU (gloo, 2 processes): DDP and FSDP2 train the same model as one process with
the same global batch, for a stage, for continual runs with CL methods and for a whole experiment; a killed rank
stops the job, which resumes to the same weights."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mllm_cl.config import EvalSpec, ExperimentConfig, StageConfig, TaskSpec, TrainConfig, from_dict, to_dict
from mllm_cl.experiment import run_experiment
from mllm_cl.stages import run_stage

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 3e-5  # fp32, 24 steps: the ranks' gradients are summed in another order than one process sums them

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")


def finetune_config(world: Path, init: Path, out: Path, steps: int = 4, **train: object) -> StageConfig:
    return StageConfig(stage="finetune", out_dir=str(out), init=str(init), template="pythia", max_len=200,
                       train_file=str(world / "tasks/color/train.json"), image_folder=str(world),
                       train=TrainConfig(steps=steps, global_batch_size=8, micro_batch_size=2, lrs={"": 3e-3},
                                         warmup_ratio=0.0, log_every=1, device="cpu", precision="fp32", **train))


def continual_config(world: Path, init: Path, out: Path, methods: list[str], options: dict,
                     engine: str = "ddp") -> StageConfig:
    tasks = [TaskSpec(name=t, train=str(world / f"tasks/{t}/train.json"), test=str(world / f"tasks/{t}/test.json"),
                      image_folder=str(world)) for t in ("color", "count")]
    return StageConfig(stage="continual", out_dir=str(out), init=str(init), tasks=tasks, template="pythia",
                       max_len=200, inquiries=str(world / "inquiries.json"), methods=methods, method_options=options,
                       eval=EvalSpec(nl_files=[str(world / "nl/facts_mc.jsonl")], nl_limit=6, vl_limit=6,
                                     batch_size=4, max_new_tokens=2),
                       train=TrainConfig(steps=3, global_batch_size=8, micro_batch_size=2, lrs={"": 3e-3},
                                         log_every=1, device="cpu", precision="fp32", distributed=engine))


def write_config(config: StageConfig) -> Path:
    path = Path(config.out_dir).with_suffix(".json")
    path.write_text(json.dumps(to_dict(config)))
    return path


def torchrun(nproc: int, *arguments: str, script: Path = ROOT / "train.py", wait: bool = True, check: bool = True,
             timeout: int = 300):
    """`torchrun --nproc_per_node nproc script arguments...` in a subprocess: its CompletedProcess (which must
    succeed if `check`), or with wait=False its Popen."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(port), str(script), *arguments]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0 or not check, done.stdout + done.stderr
    return done


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{part.parent.name}/{k}": v for part in sorted(folder.glob("**/*.safetensors"))
            for k, v in load_file(part).items()}


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys() and first
    worst = max((first[k] - second[k]).abs().max().item() for k in first)
    assert worst < TOLERANCE, worst


CONTINUAL_CASES = {"msgm+rehearsal": (["msgm", "rehearsal"], "ddp"), "uir": (["uir"], "ddp"),
                   "ewc+sac": (["ewc", "sac"], "ddp"), "lwf+modelmix": (["lwf", "modelmix"], "ddp"),
                   "llava_c": (["llava_c"], "ddp"), "soft_targets": (["soft_targets"], "ddp"),
                   "fsdp-msgm+rehearsal": (["msgm", "rehearsal"], "fsdp"), "fsdp-uir": (["uir"], "fsdp")}


def continual_options(methods: list[str]) -> dict:
    return {"lora": {"rank": 4}, "rehearsal": {"share": 0.2}} if "msgm" in methods else \
        {"lora": {"rank": 4}} if "llava_c" in methods else {}


def no_images_config(world: Path, init: Path, out: Path, distributed: str) -> StageConfig:
    """The general mix, one sample per micro-batch (test_micro_batches_without_images_leave_no_param_behind)."""
    base = finetune_config(world, init, out, steps=6, distributed=distributed)
    return replace(base, train_file=str(world / "general/train.json"),
                   train=replace(base.train, global_batch_size=4, micro_batch_size=1))


class Launch:
    """The 2-rank runs of this module that no test kills, one after another in one torchrun launch
    (tests/torchrun_runs.py): each run's folder, exit code, and rank 0's stdout and stderr while it ran."""

    def __init__(self, folder: Path, runs: dict[str, tuple[str, StageConfig]]) -> None:
        self.folders = {name: Path(config.out_dir) for name, (_, config) in runs.items()}
        codes = folder / "exit_codes.json"
        done = torchrun(2, str(codes), *(f"{stage}={write_config(config)}" for stage, config in runs.values()),
                        script=ROOT / "tests/torchrun_runs.py", timeout=900)
        self.codes = dict(zip(runs, json.loads(codes.read_text())))
        self.stdout = dict(zip(runs, split_runs(done.stdout, len(runs))))
        self.stderr = dict(zip(runs, split_runs(done.stderr, len(runs))))

    def succeeded(self, name: str) -> Path:
        assert self.codes[name] == 0, self.stdout[name] + self.stderr[name]
        return self.folders[name]


def split_runs(output: str, count: int) -> list[str]:
    """One launch's output cut at the marks rank 0 prints before each run ("### run N ###")."""
    parts = [output.split(f"### run {n} ###\n", 1)[-1] for n in range(count)]
    return [part.split(f"### run {n + 1} ###\n", 1)[0] for n, part in enumerate(parts)]


@pytest.fixture(scope="module")
def two_ranks(world: Path, init_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Launch:
    folder = tmp_path_factory.mktemp("two_ranks")
    runs = {"ddp": ("finetune", finetune_config(world, init_model, folder / "ddp", steps=24)),
            "fsdp": ("finetune", finetune_config(world, init_model, folder / "fsdp", steps=24, distributed="fsdp",
                                                 activation_checkpointing=True)),
            **{f"no_images-{engine}": ("finetune", no_images_config(world, init_model, folder / f"no_images_{engine}",
                                                                    engine)) for engine in ("ddp", "fsdp")},
            **{f"continual-{case}": ("continual", continual_config(world, init_model, folder / f"continual_{n}",
                                                                   methods, continual_options(methods), engine))
               for n, (case, (methods, engine)) in enumerate(CONTINUAL_CASES.items())}}
    smoke_batches = finetune_config(world, init_model, folder / "smoke_batches", steps=2, distributed="ddp")
    smoke_batches.train.micro_batch_size = 8
    runs["smoke_batches"] = ("finetune", smoke_batches)
    runs["no_engine"] = ("finetune", finetune_config(world, init_model, folder / "no_engine", distributed="none"))
    return Launch(folder, runs)


@pytest.fixture(scope="module")
def one_process_finetune(world: Path, init_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one") / "finetune"
    run_stage(finetune_config(world, init_model, out, steps=24, distributed="none"))
    return out


@pytest.fixture(scope="module")
def two_rank_finetune(two_ranks: Launch) -> Path:
    return two_ranks.succeeded("ddp")


def test_ddp_on_two_ranks_trains_the_model_one_process_trains(one_process_finetune: Path,
                                                               two_rank_finetune: Path) -> None:
    assert_same_weights(one_process_finetune / "model", two_rank_finetune / "model")
    log = [json.loads(line) for line in (two_rank_finetune / "log.jsonl").read_text().splitlines()]
    alone = [json.loads(line) for line in (one_process_finetune / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 25))  # one log, written by rank 0
    assert all((r["engine"], r["processes"]) == ("ddp", 2) for r in log)
    assert [r["tokens"] for r in log] == [r["tokens"] for r in alone]  # global counts, not rank 0's
    assert all(abs(a["loss"] - b["loss"]) < 1e-5 for a, b in zip(log, alone))


def test_fsdp_on_two_ranks_trains_the_model_one_process_trains(one_process_finetune: Path, two_ranks: Launch) -> None:
    """With the hand-written activation checkpointing, which re-runs each block (and its FSDP gather) in backward."""
    fsdp = two_ranks.succeeded("fsdp")
    assert_same_weights(one_process_finetune / "model", fsdp / "model")
    last = json.loads((fsdp / "log.jsonl").read_text().splitlines()[-1])
    assert (last["engine"], last["processes"]) == ("fsdp", 2)


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_micro_batches_without_images_leave_no_param_behind(world: Path, init_model: Path, tmp_path: Path,
                                                            two_ranks: Launch, engine: str) -> None:
    """The general mix is a third text-only: with one sample per micro-batch, some reach the LLM without the
    projector on one rank only. DDP would wait for the projector's grads, FSDP2 would reduce-scatter mismatched
    tensors; both train the one-process model instead."""
    one = run_stage(no_images_config(world, init_model, tmp_path / "one", "none"))
    assert_same_weights(one, two_ranks.succeeded(f"no_images-{engine}") / "model")


@pytest.mark.parametrize("case", CONTINUAL_CASES)
def test_continual_run_with_cl_methods_on_two_ranks_equals_one_rank(world: Path, init_model: Path, tmp_path: Path,
                                                                    two_ranks: Launch, case: str) -> None:
    """Same global batch: one process without an engine, 4 micro-batches, against 2 ranks x 2. LoRA's dropout
    (in mSGM) is keyed by the micro-batch, UIR's inquiries are shared out like the task's batches, EWC's Fisher is
    summed over the ranks. Between them the cases run every method of both papers' grids (naive is every run's
    base; LLaVA-c is LoRA, UIR and SAC)."""
    methods, _ = CONTINUAL_CASES[case]
    alone = tmp_path / "ranks1"
    run_stage(continual_config(world, init_model, alone, methods, continual_options(methods), engine="none"))
    ranks = two_ranks.succeeded(f"continual-{case}")
    for task in ("task_1_color", "task_2_count"):
        assert_same_weights(alone / f"{task}/model", ranks / f"{task}/model")
    one, two = (json.loads((folder / "results.json").read_text()) for folder in (alone, ranks))
    assert [a["vl"] for a in one["after_task"]] == [a["vl"] for a in two["after_task"]]
    logs = [a["method_log"] for a in two["after_task"]]
    if "rehearsal" in methods:
        assert [log["rehearsal_replayed"] for log in logs] == [0, 3]
    if "ewc" in methods:
        assert logs[1]["ewc_fisher_mean"] == pytest.approx(one["after_task"][1]["method_log"]["ewc_fisher_mean"],
                                                           rel=1e-4)


@pytest.mark.parametrize("engine,resume_on", [("ddp", 2), ("fsdp", 1)])
def test_a_killed_rank_stops_the_job_which_resumes_to_the_same_weights(world: Path, init_model: Path, tmp_path: Path,
                                                                      two_rank_finetune: Path, engine: str,
                                                                      resume_on: int) -> None:
    """The checkpoint holds whole tensors (FSDP's shards gathered) and its data position counts global
    micro-batches, so the job resumes to the same weights, on as many processes or (FSDP here) on another number.
    Activation checkpointing is on, to show it under DDP too."""
    config = finetune_config(world, init_model, tmp_path / "killed", steps=24, save_every=1, distributed=engine,
                             activation_checkpointing=True)
    path = write_config(config)
    job = torchrun(2, "finetune", "--config", str(path), wait=False)
    log = tmp_path / "killed/log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.02)
    workers = [int(pid) for child in Path(f"/proc/{job.pid}/task").glob("*/children")
               for pid in child.read_text().split()]
    assert len(workers) == 2, workers
    steps_before = len(log.read_text().splitlines())
    assert steps_before < 24, "the run ended before it could be killed"
    os.kill(max(workers), signal.SIGKILL)  # the younger worker: rank 1
    output, _ = job.communicate(timeout=120)
    assert job.returncode != 0
    assert "SIGKILL" in output or "Signal 9" in output or "lost contact" in output, output[-2000:]
    torchrun(resume_on, "finetune", "--config", str(path), "train.resume=true")
    assert_same_weights(tmp_path / "killed/model", two_rank_finetune / "model")
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(1, 25))


def test_several_processes_need_an_engine(two_ranks: Launch) -> None:
    assert two_ranks.codes["no_engine"] != 0
    assert "[rank 0/2] train.py finetune: error: train.distributed=none, but 2 processes" in \
        two_ranks.stderr["no_engine"]


def test_an_experiment_under_torchrun_gives_the_figures_of_one_rank(tmp_path: Path) -> None:
    """The whole experiment (world, shared stages, method runs, report) on 2 ranks: rank 0 writes, all train.
    One rank is this process without an engine, with the same global batch."""
    config = json.loads((ROOT / "configs/experiments/smoke.json").read_text())
    config |= {"world": str(tmp_path / "world"), "world_tasks": ["color", "count"],
               "methods": {"naive": ["naive"], "msgm+uir": ["msgm", "uir"]}}
    config.pop("run_train")
    for stage in ("pretrain_text", "pretrain_vision", "align", "task_train"):
        config[stage] |= {"micro_batch_size": config[stage]["global_batch_size"] // 2, "distributed": "ddp"}
    path = tmp_path / "experiment.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "ranks2"
    done = torchrun(2, "experiment", "--config", str(path), f"out_dir={out}")
    assert done.stdout.count("=== pretrain-text ===") == 1  # one progress log: rank 0's
    assert (out / "REPORT.md").is_file()
    for stage in ("pretrain_text", "pretrain_vision", "align", "task_train"):
        config[stage]["distributed"] = "none"
    one_rank = from_dict(ExperimentConfig, {**config, "out_dir": str(tmp_path / "ranks1")})
    results = {1: run_experiment(one_rank)["methods"], 2: json.loads((out / "results.json").read_text())["methods"]}
    assert (tmp_path / "ranks1/REPORT.md").is_file()
    for method in ("naive", "msgm+uir"):
        one, two = results[1][method], results[2][method]
        assert one["acc_matrix"] == two["acc_matrix"]
        assert one["nl_after_task"] == pytest.approx(two["nl_after_task"], abs=1e-9)


def test_the_smoke_configs_batches_run_on_two_processes(two_ranks: Launch) -> None:
    """Global batch 8 with micro batch 8, as configs/experiments/smoke.json has it: 2 processes take 4 each."""
    run = two_ranks.succeeded("smoke_batches")
    assert "micro_batch_size 8 -> 4: global_batch_size=8 is shared by 2 processes, 4 samples each" in \
        two_ranks.stdout["smoke_batches"]
    assert json.loads((run / "stage_config.json").read_text())["train"]["micro_batch_size"] == 4
    assert (run / "model").is_dir()
