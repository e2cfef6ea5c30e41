"""The papers' experiment end to end: shared stages once, then the continual task sequence once per method.

    world (synthetic, generated if missing)
      -> pretrain-text  (task 1: the LLM's language pre-training; skipped when `llm` is a model folder)
      -> pretrain-vision (a small CLIP tower; skipped when `vision` is a model folder)
      -> align (projector only)
      -> for each method run: continual over the VL tasks, NL and VL measured after every task
      -> results.json + REPORT.md with tables and plots

Every stage writes into its own folder under `out_dir` and is skipped when its model is already there, so
an interrupted experiment picks up where it stopped (an unfinished stage resumes from its checkpoint).

Experiments named in `then` run next, each into out_dir/<its name>: a shared stage whose settings equal one of
this experiment's reuses its model (`make demo` runs paper 2's protocol after paper 1's grid this way, training
the tiny LLM, the tower and the projector once for both).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from mllm_cl import distributed, metrics
from mllm_cl.alpha_curves import (combine_curves, curve_jobs, curves_over_seeds, general_of, general_score,
                                  general_vl_accuracy)
from mllm_cl.config import (LLM_PRESETS, VISION_PRESETS, ExperimentConfig, StageConfig, StageError, TaskSpec,
                            TrainConfig, from_dict, load_json, to_dict)
from mllm_cl.continual import evaluate_model, evaluate_nl, load_init
from mllm_cl.continual_pretraining import LANGUAGE, PROTOCOL as PRETRAIN, skill_metrics, skill_score, split_mix
from mllm_cl.device import resolve_device
from mllm_cl.evaluation_vl import majority_share, read_vl_test_set
from mllm_cl.methods import build_methods, expand_methods
from mllm_cl.model_folder import atomic_write_text
from mllm_cl.report import overlapped_part, time_rows, write_report
from mllm_cl.stages import SETTINGS_FILE, changed_settings, run_stage
from mllm_cl.summary import write_summary
from mllm_cl.synthetic import WORLD_SIZES, WORLD_VERSION, build_world
from mllm_cl.workers import Job, run_jobs


# where the continual tasks start and what they are: the aligned model, or an instruction-tuned one, learning the
# world's tasks; or the aligned model learning the general mix part by part (mllm_cl.continual_pretraining)
PROTOCOLS = ("paper1", "paper2", PRETRAIN)
PAPER2 = ("paper2", PRETRAIN)  # the protocols with a finetune stage and the general score


def run_experiment(cfg: ExperimentConfig) -> dict[str, Any]:
    if cfg.seeds < 1 or cfg.workers < 1:
        raise StageError(f"seeds and workers must be at least 1, got seeds={cfg.seeds}, workers={cfg.workers}")
    if cfg.seeds > 1:
        return run_seeds(cfg)
    if cfg.world_size and cfg.world_size not in WORLD_SIZES:
        raise StageError(f"world_size must be one of {', '.join(WORLD_SIZES)} (or empty: never generate), "
                         f"got {cfg.world_size!r}")
    if cfg.protocol not in PROTOCOLS:
        raise StageError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {cfg.protocol!r}")
    if cfg.alpha_curves and cfg.protocol != "paper2":
        raise StageError("alpha_curves measure the general score, which protocol paper2 defines: set protocol=paper2")
    beside = {name: run for name, run in cfg.alpha_curves.items()
              if run in cfg.methods and {"l2p", "moelora"} & set(expand_methods(cfg.methods[run]))}
    if beside:
        raise StageError(f"alpha_curves {beside}: an L2P or MoELoRA model keeps parts beside its weights, which "
                         "ModelMix and SAC cannot mix; draw the curves of a run without them")
    if cfg.protocol == PRETRAIN and (cfg.joint_run or cfg.world_tasks):
        raise StageError(f"protocol {PRETRAIN} learns the general mix's parts, and its joint reference is the finetune "
                         "stage (the whole mix at once): leave joint_run and world_tasks empty")
    for field_name, named in (("alpha_curves", cfg.alpha_curves.values()), ("ablation", cfg.ablation),
                              ("joint_run", [cfg.joint_run] if cfg.joint_run else [])):
        unknown = sorted(set(named) - set(cfg.methods))
        if unknown:
            raise StageError(f"{field_name} names runs {unknown}, which are not method runs; the runs are "
                             f"{list(cfg.methods)}")
    for field_name in ("run_train", "run_method_options"):
        unknown = sorted(set(getattr(cfg, field_name)) - set(cfg.methods))
        if unknown:
            raise StageError(f"{field_name} names {unknown}, which are not method runs; the runs are "
                             f"{list(cfg.methods)}")
    for run_name, methods in cfg.methods.items():  # a bad field or option fails here, before any stage runs
        run_train(cfg, run_name)
        build_methods(methods, run_options(cfg, run_name))
    if cfg.workers > 1 and distributed.world_size() > 1:
        print(f"workers={cfg.workers}: under torchrun the runs take turns, each on all {distributed.world_size()} "
              "processes")
        cfg = replace(cfg, workers=1)
    followers = {path: follow_up(cfg, path) for path in cfg.then}
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock(out / "timing.json")
    with clock.part("world"):
        world = ensure_world(cfg)
    check_same_world(out, world)
    cfg = with_world_defaults(cfg, world, out)
    with clock.part("pretrain-text"):
        llm = shared_stage(cfg, "pretrain-text", out / "pretrain_text", cfg.pretrain_text, llm=cfg.llm,
                           train_file=cfg.text_corpus, skip=cfg.llm not in LLM_PRESETS, given=cfg.llm)
    with clock.part("pretrain-vision"):  # the tower reads the world's captions with the world's tokenizer
        vision = shared_stage(cfg, "pretrain-vision", out / "pretrain_vision", cfg.pretrain_vision,
                              vision=cfg.vision, tokenizer=str(world / "tokenizer.json"), train_file=cfg.align_file,
                              image_folder=str(world), skip=cfg.vision not in VISION_PRESETS, given=cfg.vision)
    with clock.part("align"):
        start = shared_stage(cfg, "align", out / "align", cfg.align, llm=str(llm), vision=str(vision),
                             tokenizer=cfg.tokenizer or str(llm), train_file=cfg.align_file, image_folder=str(world))
    aligned = start
    if cfg.protocol in PAPER2:  # LLaVA-c's start (its LLaVA-1.5), or the mix learned at once
        with clock.part("finetune"):
            tuned = shared_stage(cfg, "finetune", out / "finetune", cfg.finetune, init=str(start),
                                 train_file=cfg.general_file, image_folder=str(world))
            if cfg.protocol == "paper2":
                start, aligned_omega = tuned, aligned_nl_omega(cfg, Path(aligned), out)
    methods = {name: Job(f"method run {name!r}", method_run, (method_stage(cfg, out, name, start), name),
                         out / "methods" / name / "output.log") for name in cfg.methods}
    curves = cached_alpha_curves(out) if cfg.alpha_curves else None
    curve_of = {}  # job name -> the model whose alpha curves it draws
    if cfg.alpha_curves and curves is None:
        for name, pieces in alpha_curve_jobs(cfg, out, start).items():
            methods[cfg.alpha_curves[name]].then += pieces  # started as soon as the run they read has ended
            curve_of |= {job.name: name for job in pieces}
    jobs = list(methods.values())
    if cfg.joint_run:
        jobs.append(Job("joint run", run_joint, (cfg, out, start), out / "joint" / "output.log"))
    runs, joint, curve_parts = {}, None, {name: [] for name in cfg.alpha_curves}

    def done(job: Job, result: Any, seconds: float) -> None:
        nonlocal joint
        if job.fn is run_joint:
            joint = result
            clock.add("joint", seconds)
        elif job.name in curve_of:
            curve_parts[curve_of[job.name]].append(result)
            clock.add(f"alpha curves of {curve_of[job.name]}", seconds)
        else:
            name = job.args[1]
            runs[name] = json.loads((out / "methods" / name / "results.json").read_text())
            clock.add(f"method:{name}", seconds)

    with clock.part(f"method runs, {cfg.workers} at a time") if cfg.workers > 1 else nullcontext():
        run_jobs(jobs, cfg.workers, done)
    runs = {name: runs[name] for name in cfg.methods}  # in the config's order, however they finished
    if curves is None and cfg.alpha_curves:
        curves = save_alpha_curves(cfg, out, curve_parts)
    results = summarise(cfg, runs, wall_seconds=clock.seconds())
    initial = next(iter(runs.values()))["initial"]
    if cfg.protocol == "paper2":
        results["base"] = base_record(cfg, initial) | {"aligned_nl_omega": aligned_omega}
    elif cfg.protocol == PRETRAIN:
        results["base"] = base_record(cfg, initial, pretraining=True)
        joint = mix_at_once(cfg, out, tuned)
    if joint is not None:
        results["joint"] = joint
    if cfg.ablation:
        results["ablation"] = cfg.ablation
    results["timing"] = time_table(clock, runs)
    publish(results, out, curves)
    print(f"\n{cfg.name}: wrote {out / 'results.json'} and {out / 'REPORT.md'} in {results['wall_seconds']:.0f}s")
    if followers:
        results["then"] = run_followers(followers)
        publish(results, out, curves)  # now with links to theirs
    print(f"\nwhere the time went ({cfg.name}):\n{format_time_table(results['timing'])}")
    if followers:
        total = results["timing"]["total"] + sum(f["seconds"] for f in results["then"].values())
        print("\n".join([f"then {name}: {f['seconds']:.0f}s (its table: {f['out_dir']}/REPORT.md)"
                         for name, f in results["then"].items()] + [f"all together: {total:.0f}s"]))
    return results


def publish(results: dict[str, Any], out: Path, curves: dict[str, Any] | None) -> None:
    """out/results.json, out/REPORT.md (with its plots) and out/SUMMARY.md, written by rank 0."""
    def write() -> None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
        write_report(results, out, alpha_curves=curves)
        write_summary(out)

    distributed.on_main(write)


TRAIN_FIELDS = ("pretrain_text", "pretrain_vision", "align", "finetune", "task_train")
REUSED_FILE = "reused.json"  # in a shared stage's folder: the folder of the stage it reused (shared_stage)
SHARED_FOLDERS = ("pretrain_text", "pretrain_vision", "align", "finetune", "methods", "joint", "alpha_curves")
MODEL_FIELDS = ("llm", "vision", "projector", "tokenizer", "template", "max_len")  # the model both experiments study


def run_followers(followers: dict[str, ExperimentConfig]) -> dict[str, dict[str, Any]]:
    """Run each experiment of `then` (config path -> its config, see follow_up); name -> where and how long."""
    then = {}
    for path, follower in followers.items():
        print(f"\n##### then {follower.name} ({path}) into {follower.out_dir} #####", flush=True)
        theirs = run_experiment(follower)
        then[follower.name] = {"config": path, "out_dir": follower.out_dir, "seconds": theirs["timing"]["total"]}
    return then


def follow_up(cfg: ExperimentConfig, path: str) -> ExperimentConfig:
    """The experiment `path` configures, as `cfg` runs it after itself: into <cfg.out_dir>/<its name>, with cfg's
    model (MODEL_FIELDS: `make experiment MODEL=...` reaches both), device, workers and every stage's seed,
    reusing cfg's shared stages where their settings are the same."""
    follower = load_json(ExperimentConfig, path)
    if follower.then:
        raise StageError(f"{path} names experiments of its own in `then`; an experiment run by `then` cannot")
    if follower.name in SHARED_FOLDERS or follower.name.startswith("seed_") or not follower.name:
        raise StageError(f"{path}: its name {follower.name!r} would be a folder of {cfg.out_dir} that the "
                         "experiment itself writes; rename it")
    seeds = {name: replace(getattr(follower, name), seed=getattr(cfg, name).seed) for name in TRAIN_FIELDS}
    model = {name: getattr(cfg, name) for name in MODEL_FIELDS}
    return replace(follower, out_dir=str(Path(cfg.out_dir) / follower.name), shared_dir=cfg.out_dir,
                   device=cfg.device, workers=cfg.workers, seeds=1, **seeds, **model)


SEED_FIELDS = ("nl_delta", "vl_hmean", "nl_base", "general_vl_base", "avg_acc", "mean_acc", "bwt", "fwt",
               "mean_forgetting")  # summarised over seeds, where a run has them
SEED_CURVES = ("nl_after_task", "nl_delta_after_task", "vl_after_task", "general_after_task",
               "general_vl_after_task", "zero_shot")  # per task


def run_seeds(cfg: ExperimentConfig) -> dict[str, Any]:
    """The experiment once per seed s = 0..seeds-1 (every stage's train.seed set to s, the world shared), in
    out_dir/seed_<s>/, its shared stages from shared_dir/seed_<s>/ where a run over seeds left them; then per
    method the mean and the sample standard deviation of each figure over seeds, for the experiment and for each
    one it runs `then` (out_dir/<its name>/)."""
    out = Path(cfg.out_dir)
    for seed in range(cfg.seeds):
        trains = {name: replace(getattr(cfg, name), seed=seed) for name in TRAIN_FIELDS}
        print(f"\n##### seed {seed} of {cfg.seeds} #####", flush=True)
        shared = Path(cfg.shared_dir) / f"seed_{seed}" if cfg.shared_dir else None  # a finished run's same seed
        run_experiment(replace(cfg, seeds=1, out_dir=str(out / f"seed_{seed}"), **trains,
                               shared_dir=str(shared) if shared is not None and shared.is_dir() else cfg.shared_dir))
    folders = {seed: out / f"seed_{seed}" for seed in range(cfg.seeds)}
    then = {}
    for path in cfg.then:
        name = load_json(ExperimentConfig, path).name
        done = over_seeds(name, {seed: folder / name for seed, folder in folders.items()}, out / name)
        then[name] = {"config": path, "out_dir": str(out / name), "seconds": done["wall_seconds"]}
    return over_seeds(cfg.name, folders, out, then)


def over_seeds(name: str, folders: dict[int, Path], out: Path, then: dict[str, Any] | None = None) -> dict[str, Any]:
    """One experiment over seeds (seed -> its run folder): per method the mean and sample sd of each figure, the
    joint run's mean and the alpha curves' (`alpha_curves.curves_over_seeds`), written to out/results.json and
    out/REPORT.md (which links to the `then` experiments' summaries)."""
    per_seed = {seed: json.loads((folder / "results.json").read_text()) for seed, folder in folders.items()}
    runs_of = list(per_seed.values())
    methods = {}
    for method in runs_of[0]["methods"]:
        runs = [results["methods"][method] for results in runs_of]
        summary: dict[str, Any] = {"methods": runs[0]["methods"], "task_names": runs[0]["task_names"]}
        for field in SEED_FIELDS:
            if runs[0].get(field) is not None:
                values = [run[field] for run in runs]
                summary |= {field: float(np.mean(values)), f"{field}_sd": float(np.std(values, ddof=1)),
                            f"{field}_per_seed": values}
        matrices = np.array([run["acc_matrix"] for run in runs])  # (seeds, T, T)
        summary |= {"acc_matrix": matrices.mean(axis=0).tolist(),
                    "acc_matrix_sd": matrices.std(axis=0, ddof=1).tolist()}
        for field in SEED_CURVES:
            if field in runs[0]:
                curves = np.array([run[field] for run in runs])  # (seeds, T)
                summary |= {field: curves.mean(axis=0).tolist(), f"{field}_sd": curves.std(axis=0, ddof=1).tolist()}
        methods[method] = summary
    results = {"name": name, "protocol": runs_of[0].get("protocol"), "seeds": list(per_seed),
               "tasks": runs_of[0]["tasks"],
               "wall_seconds": sum(r["wall_seconds"] for r in runs_of),
               "date": datetime.now(timezone.utc).isoformat(), "methods": methods}
    if "ablation" in runs_of[0]:
        results["ablation"] = runs_of[0]["ablation"]
    if "base" in runs_of[0]:
        results["base"] = base_over_seeds([r["base"] for r in runs_of])
    if "joint" in runs_of[0]:
        joints = [r["joint"] for r in runs_of]
        results["joint"] = {"run": joints[0]["run"], "per_seed": joints,
                            "vl": {t: float(np.mean([j["vl"][t] for j in joints])) for t in joints[0]["vl"]},
                            **{k: float(np.mean([j[k] for j in joints])) for k in ("nl", "general", "general_vl")
                               if k in joints[0]}}
    curve_files = [folder / "alpha_curves.json" for folder in folders.values()]
    curves = (curves_over_seeds([json.loads(p.read_text()) for p in curve_files])
              if all(p.is_file() for p in curve_files) else None)
    if then:
        results["then"] = then
    out.mkdir(parents=True, exist_ok=True)
    if curves is not None:
        distributed.on_main(lambda: atomic_write_text(out / "alpha_curves.json", json.dumps(curves, indent=2) + "\n"))
    publish(results, out, curves)
    print(f"\n{name}: {len(per_seed)} seeds; wrote {out / 'results.json'} and {out / 'REPORT.md'}")
    return results


class Clock:
    """Wall-clock seconds of an experiment over all its invocations, in total and per part (the world, each shared
    stage, each method run): an interrupted and resumed run reports the time of every invocation up to its last
    saved point (the end of a part)."""

    def __init__(self, path: Path) -> None:
        self.path, self.start = path, time.time()
        saved = json.loads(path.read_text()) if path.is_file() else {}
        self.before = float(saved.get("seconds", 0.0))
        self.parts: dict[str, float] = {k: float(v) for k, v in saved.get("parts", {}).items()}

    def seconds(self) -> float:
        return self.before + time.time() - self.start

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Add the time spent inside the block to part `name`, then save."""
        start = time.time()
        try:
            yield
        finally:
            self.add(name, time.time() - start)

    def add(self, name: str, seconds: float) -> None:
        """Add `seconds` spent elsewhere (a worker process) to part `name`, then save."""
        self.parts[name] = self.parts.get(name, 0.0) + seconds
        self.save()

    def save(self) -> None:
        if distributed.is_main():  # every rank keeps the same parts; rank 0's file is the run's
            atomic_write_text(self.path, json.dumps({"seconds": self.seconds(), "parts": self.parts}) + "\n")


def time_table(clock: Clock, runs: dict[str, dict]) -> dict[str, Any]:
    """Where the experiment's time went: each shared part, and each method run split into training (methods'
    hooks and saving included) and evaluation (its share of the initial evaluation included)."""
    shared = {name: seconds for name, seconds in clock.parts.items() if not name.startswith("method:")}
    methods = {}
    for name, run in runs.items():
        wall = clock.parts.get(f"method:{name}", 0.0)
        spent = run.get("seconds", {"train": 0.0, "eval": 0.0})
        methods[name] = {"train": spent["train"], "eval": spent["eval"], "wall": wall}
    return {"total": clock.seconds(), "shared": shared, "methods": methods}


def format_time_table(timing: dict[str, Any]) -> str:
    total = timing["total"] or 1.0
    lines = [f"{'part':<24}{'seconds':>9}{'share':>8}"]
    lines += [f"{name:<24}{seconds:>9.1f}{100 * seconds / total:>7.1f}%" for name, seconds in time_rows(timing)]
    if overlapped_part(timing):
        lines.append("(the runs overlapped: their rows add up to more than the wall clock of `method runs`)")
    return "\n".join(lines)


def ensure_world(cfg: ExperimentConfig) -> Path:
    """The world's folder, generated when it holds no world or one an older generator drew."""
    world = Path(cfg.world)
    manifest = world / "world.json"
    version = json.loads(manifest.read_text()).get("version", 1) if manifest.is_file() else None
    if version == WORLD_VERSION:
        return world
    if not cfg.world_size:
        state = "holds no world.json" if version is None else f"holds a version-{version} world"
        raise StageError(f"{world} {state} (this code draws version {WORLD_VERSION}) and world_size is empty: "
                         f"generate it with `python data/synthetic_world.py --out {world}`")
    why = "" if version is None else f" (it held a version-{version} world)"
    print(f"generating the synthetic world ({cfg.world_size}, seed {cfg.world_seed}) into {world}{why}", flush=True)
    distributed.on_main(lambda: build_world(world, seed=cfg.world_seed, size=cfg.world_size))
    return world


def check_same_world(out: Path, world: Path) -> None:
    """Refuse to continue a run in `out` whose stages were trained on another world: its models (and the world's
    tokenizer they were trained with) no longer match the data. The world is named by its manifest's hash."""
    digest = hashlib.sha256((world / "world.json").read_bytes()).hexdigest()
    record = out / "world.sha256"
    if record.is_file() and record.read_text().strip() != digest:
        raise StageError(f"{out} holds a run trained on another world than the one now in {world} (its world.json "
                         f"changed): remove {out} (`make clean`) or set another out_dir")
    distributed.on_main(lambda: atomic_write_text(record, digest + "\n"))


def with_world_defaults(cfg: ExperimentConfig, world: Path, out: Path) -> ExperimentConfig:
    """Fill every data path left empty from the world's manifest (continual pretraining's tasks: the general mix
    split into out/mix_parts/)."""
    manifest = json.loads((world / "world.json").read_text())
    unknown = sorted(set(cfg.world_tasks) - set(manifest["tasks"]))
    if unknown:
        raise StageError(f"world_tasks names {unknown}, which {world} does not have; it has {manifest['tasks']}")
    general_file = cfg.general_file or str(world / "general/train.json")
    if cfg.tasks:
        tasks = cfg.tasks
    elif cfg.protocol == PRETRAIN:
        tasks = split_mix(general_file, manifest["general_skills"], str(world), out / "mix_parts")
    else:
        tasks = [TaskSpec(name=t, train=str(world / f"tasks/{t}/train.json"), test=str(world / f"tasks/{t}/test.json"),
                          image_folder=str(world)) for t in cfg.world_tasks or manifest["tasks"]]
    nl_files = cfg.nl_files or [str(p) for p in sorted((world / "nl").glob("*.jsonl"))]
    tokenizer = cfg.tokenizer or (str(world / "tokenizer.json") if cfg.llm in LLM_PRESETS else "")
    general_vl = cfg.eval.general_vl
    if not general_vl and cfg.protocol in PAPER2:  # one test per skill of the mix, or the one test given
        general_vl = ([TaskSpec(name="general", test=cfg.general_test, image_folder=str(world))] if cfg.general_test
                      else [TaskSpec(name=f"general_{skill}", test=str(world / f"general/{skill}/test.json"),
                                     image_folder=str(world)) for skill in manifest["general_skills"]])
    return replace(cfg, tasks=tasks, eval=replace(cfg.eval, nl_files=nl_files, general_vl=general_vl),
                   tokenizer=tokenizer, general_file=general_file,
                   text_corpus=cfg.text_corpus or str(world / "text/train.txt"),
                   align_file=cfg.align_file or str(world / "align.json"),
                   inquiries=cfg.inquiries or str(world / "inquiries.json"))


def run_train(cfg: ExperimentConfig, run_name: str) -> TrainConfig:
    """The task training settings of one method run: task_train with that run's `run_train` fields."""
    return from_dict(TrainConfig, {**to_dict(cfg.task_train), **cfg.run_train.get(run_name, {})},
                     f"run_train.{run_name}")


def run_options(cfg: ExperimentConfig, run_name: str) -> dict[str, dict[str, Any]]:
    """The method options of one run: `method_options` for the methods it uses, updated by its
    `run_method_options`."""
    used = expand_methods(cfg.methods[run_name])
    options = {m: dict(o) for m, o in cfg.method_options.items() if m in used}
    for method, given in cfg.run_method_options.get(run_name, {}).items():
        options[method] = {**options.get(method, {}), **given}
    return options


def base_stage(cfg: ExperimentConfig, stage: str, out: Path, train: TrainConfig, **fields: Any) -> StageConfig:
    settings = dict(llm=cfg.llm, vision=cfg.vision, projector=cfg.projector, tokenizer=cfg.tokenizer,
                    template=cfg.template, max_len=cfg.max_len, eval=cfg.eval)
    return StageConfig(stage=stage, out_dir=str(out), train=replace(train, device=cfg.device, resume=True),
                       **{**settings, **fields})


def shared_stage(cfg: ExperimentConfig, stage: str, out: Path, train: TrainConfig, skip: bool = False,
                 given: str = "", **fields: Any) -> Path:
    """Run a stage shared by every method, unless its model exists already, here or with the same settings in
    `shared_dir` or in an experiment it ran with `then` (shared_dir/<name>/), or a given folder replaces it. A
    stage reused from elsewhere leaves REUSED_FILE naming it, which experiments sharing this one's stages follow."""
    if skip:
        print(f"{stage}: using the given model {given}")
        return Path(given)
    model = out / "model"
    if model.is_dir():
        print(f"{stage}: reusing {model}")
        return model
    settings = base_stage(cfg, stage, out, train, **fields)
    differences = []
    for theirs in shared_candidates(cfg.shared_dir, out.name):
        changed = changed_settings(theirs, settings, ignore=("eval",))  # only continual stages evaluate
        if not changed:
            print(f"{stage}: reusing {theirs / 'model'} (the same settings)")
            distributed.on_main(lambda: (out.mkdir(parents=True, exist_ok=True), atomic_write_text(
                out / REUSED_FILE, json.dumps({"stage": str(theirs)}) + "\n")))
            return theirs / "model"
        differences.append(f"{theirs} was trained with other settings (saved, now): {changed}")
    if differences:
        print(f"{stage}: {'; '.join(differences)}; training it here")
    print(f"\n=== {stage} ===", flush=True)
    return run_stage(settings)


def shared_candidates(shared_dir: str, name: str) -> list[Path]:
    """The finished stage folders called `name` in `shared_dir` and in the experiments it ran with `then`
    (shared_dir/*/name), each followed by the folder its REUSED_FILE names when it reused one."""
    if not shared_dir:
        return []
    found = []
    for folder in [Path(shared_dir) / name, *sorted(Path(shared_dir).glob(f"*/{name}"))]:
        found.append(folder)
        if (folder / REUSED_FILE).is_file():
            found.append(Path(json.loads((folder / REUSED_FILE).read_text())["stage"]))
    return [folder for folder in found if (folder / "model").is_dir() and (folder / SETTINGS_FILE).is_file()]


def method_stage(cfg: ExperimentConfig, out: Path, run_name: str, start: Path) -> StageConfig:
    """The continual stage of one method run: the VL tasks in order from `start`, into out/methods/<run>."""
    return base_stage(cfg, "continual", out / "methods" / run_name, run_train(cfg, run_name), init=str(start),
                      tasks=cfg.tasks, inquiries=cfg.inquiries, methods=cfg.methods[run_name],
                      method_options=run_options(cfg, run_name),
                      initial_eval=str(out / "initial_eval.json"))  # every run starts from the same model


def method_run(stage: StageConfig, run_name: str) -> None:
    print(f"\n=== method run {run_name!r}: {stage.methods} ===", flush=True)
    run_stage(stage)


def mix_tasks(tasks: list[TaskSpec], folder: Path) -> TaskSpec:
    """One task of every task's samples (folder/train.json, folder/test.json), ids prefixed with the task's name.
    Tasks whose images lie in different folders (easy-vqa beside the synthetic world) share their folders' common
    ancestor, each image path rewritten relative to it."""
    folders = {task.image_folder or "." for task in tasks}
    shared = len(folders) == 1
    root = next(iter(folders)) if shared else os.path.commonpath([str(Path(f).resolve()) for f in folders])
    folder.mkdir(parents=True, exist_ok=True)
    mixed = {}
    for split in ("train", "test"):
        records = []
        for task in tasks:
            for index, record in enumerate(json.loads(Path(getattr(task, split)).read_text())):
                record = dict(record, id=f"{task.name}-{index}")
                if "image" in record and not shared:
                    image = (Path(task.image_folder or ".") / record["image"]).resolve()
                    record["image"] = os.path.relpath(image, root)
                records.append(record)
        mixed[split] = folder / f"{split}.json"
        distributed.on_main(lambda: atomic_write_text(mixed[split], json.dumps(records) + "\n"))
    return TaskSpec(name="joint", train=str(mixed["train"]), test=str(mixed["test"]), image_folder=str(root))


def run_joint(cfg: ExperimentConfig, out: Path, start: Path) -> dict[str, Any]:
    """The multitask reference (paper 2, Figure 1): `joint_run`'s methods trained once on every task's training
    set mixed (steps: the whole sequence's), then scored on every task, NL and general VL; cached in
    joint/scores.json."""
    path = out / "joint" / "scores.json"
    if path.is_file():
        return json.loads(path.read_text())
    joint_task = mix_tasks(cfg.tasks, out / "joint")
    train = run_train(cfg, cfg.joint_run)
    train = replace(train, steps=train.steps * len(cfg.tasks))  # epochs-based: one epoch of the mix is the same
    print(f"\n=== joint run: {cfg.methods[cfg.joint_run]} on {[t.name for t in cfg.tasks]} mixed ===", flush=True)
    model = run_stage(base_stage(cfg, "continual", out / "joint" / "run", train, init=str(start), tasks=[joint_task],
                                 inquiries=cfg.inquiries, methods=cfg.methods[cfg.joint_run],
                                 method_options=run_options(cfg, cfg.joint_run)))
    return score_reference(cfg, out, model, {"run": cfg.joint_run, "methods": cfg.methods[cfg.joint_run],
                                             "steps": train.steps})


def mix_at_once(cfg: ExperimentConfig, out: Path, tuned: Path) -> dict[str, Any]:
    """Continual pretraining's reference (paper 2's multitask rows of Tables 2-3): the finetune stage's model,
    the whole general mix learned at once from the same aligned model; cached in joint/scores.json."""
    path = out / "joint" / "scores.json"
    if path.is_file():
        return json.loads(path.read_text())
    return score_reference(cfg, out, tuned, {"run": "finetune", "methods": [], "epochs": cfg.finetune.epochs})


def score_reference(cfg: ExperimentConfig, out: Path, model: Path, record: dict[str, Any]) -> dict[str, Any]:
    """`record` with the reference model's scores, as the runs' are read (`task_accuracy`): every task, NL omega,
    the general score; written to out/joint/scores.json."""
    path = out / "joint" / "scores.json"
    stage = base_stage(cfg, "continual", out / "joint", cfg.task_train, init=str(model), tasks=cfg.tasks)
    trained, tokenizer, stage = load_init(stage, resolve_device(cfg.device))
    scores = evaluate_model(trained, tokenizer, stage)
    summary = {**record, "vl": {t.name: task_accuracy(scores, t.name, cfg.protocol) for t in cfg.tasks},
               "nl": metrics.nl_omega(nl_accuracies(scores))}
    if "general_vl" in scores:
        summary["general"], _, summary["general_vl"] = general_score(scores)
    distributed.on_main(lambda: (path.parent.mkdir(parents=True, exist_ok=True),
                                 atomic_write_text(path, json.dumps(summary, indent=2) + "\n")))
    return summary


def cached_alpha_curves(out: Path) -> dict[str, Any] | None:
    """out/alpha_curves.json of a finished experiment run again, or None."""
    path = out / "alpha_curves.json"
    return json.loads(path.read_text()) if path.is_file() else None


def alpha_curve_jobs(cfg: ExperimentConfig, out: Path, start: Path) -> dict[str, list[Job]]:
    """Paper 2's Figure 4 for each model that `alpha_curves` names: the first task's model of that run,
    consolidated with the start at every alpha, in `workers` jobs that share the alphas
    (`mllm_cl.alpha_curves.curve_jobs`)."""
    first = cfg.tasks[0]
    trained = {name: out / "methods" / run / f"task_1_{first.name}" / "model" for name, run in cfg.alpha_curves.items()}
    stage = base_stage(cfg, "continual", out / "alpha_curves", cfg.task_train, init=str(start), tasks=[first])
    return curve_jobs(stage, trained, tuple(cfg.alpha_curve_alphas), device=resolve_device(cfg.device),
                      pieces=cfg.workers)


def save_alpha_curves(cfg: ExperimentConfig, out: Path, parts: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """out/alpha_curves.json from the results of each model's jobs (`mllm_cl.alpha_curves.combine_curves`)."""
    curves = combine_curves(cfg.tasks[0].name, parts)
    distributed.on_main(lambda: atomic_write_text(out / "alpha_curves.json", json.dumps(curves, indent=2) + "\n"))
    return curves


def summarise(cfg: ExperimentConfig, runs: dict[str, dict], wall_seconds: float) -> dict[str, Any]:
    """Every method run's summary (`summarise_run`) with the experiment's name, date and machine."""
    task_names = [t.name for t in cfg.tasks]
    return {"name": cfg.name, "protocol": cfg.protocol, "wall_seconds": wall_seconds,
            "date": datetime.now(timezone.utc).isoformat(),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "tasks": task_names,
            "nl_files": cfg.eval.nl_files,
            "methods": {run_name: summarise_run(run, task_names, cfg.protocol) for run_name, run in runs.items()}}


def aligned_nl_omega(cfg: ExperimentConfig, aligned: Path, out: Path) -> float:
    """NL omega of the aligned model, the language that paper 2's instruction tuning should keep; cached in
    out/aligned_nl.json."""
    path = out / "aligned_nl.json"
    if path.is_file():
        return float(json.loads(path.read_text())["nl_omega"])
    stage = base_stage(cfg, "continual", out, cfg.task_train, init=str(aligned))
    model, tokenizer, stage = load_init(stage, resolve_device(cfg.device))
    omega = metrics.nl_omega(nl_accuracies({"nl": evaluate_nl(model, tokenizer, stage)}))
    distributed.on_main(lambda: atomic_write_text(path, json.dumps({"model": str(aligned), "nl_omega": omega}) + "\n"))
    return omega


def base_record(cfg: ExperimentConfig, initial: dict[str, Any], pretraining: bool = False) -> dict[str, Any]:
    """Paper 2's starting point, the instruction-tuned model, from a method run's initial evaluation (every run
    starts from it): NL omega, the pooled general-VL accuracy, each general-VL skill, and each continual task's
    zero-shot accuracy (paper 2's Table 8, first row), in percent. A test's chance is the share of its most common
    answer (`majority_share`) over the questions scored; `ci` is the 95% Wilson interval. `pretraining`: the
    aligned model of continual pretraining, whose general-VL skills are the tasks to learn (its zero-shot rows)."""
    def measured(test: TaskSpec, scores: dict[str, Any]) -> dict[str, Any]:
        n = int(scores["n"])
        examples = read_vl_test_set(test.test, test.image_folder or None, n)
        return {"acc": 100.0 * scores["acc"], "chance": majority_share(examples), "n": n, "ci": wilson(scores)}

    skills = {test.name.removeprefix("general_"): measured(test, initial["general_vl"][test.name])
              for test in cfg.eval.general_vl}
    record = {"nl_omega": metrics.nl_omega(nl_accuracies(initial)), "general_vl": general_vl_accuracy(initial)}
    if pretraining:
        return record | {"start": "aligned", "general_vl_by_skill": {}, "zero_shot": skills}
    return record | {"start": "instruction-tuned", "general_vl_by_skill": skills,
                     "zero_shot": {test.name: measured(test, initial["vl"][test.name]) for test in cfg.tasks}}


def base_over_seeds(bases: list[dict[str, Any]]) -> dict[str, Any]:
    """`base_record` over seeds: each figure's mean, sample sd (`_sd`) and values (`_per_seed`); a test's chance
    and n as one seed's (every seed scores the same questions), its interval Wilson's over all seeds' answers."""
    def spread(values: list[float], key: str) -> dict[str, Any]:
        return {key: float(np.mean(values)), f"{key}_sd": float(np.std(values, ddof=1)), f"{key}_per_seed": values}

    out: dict[str, Any] = {"start": bases[0].get("start", "instruction-tuned")}
    for key in ("nl_omega", "general_vl", "aligned_nl_omega"):
        if all(key in b for b in bases):
            out |= spread([b[key] for b in bases], key)
    for group in ("general_vl_by_skill", "zero_shot"):
        out[group] = {}
        for name, first in bases[0][group].items():
            accs = [b[group][name]["acc"] for b in bases]
            n = sum(b[group][name]["n"] for b in bases)
            correct = sum(round(b[group][name]["acc"] * b[group][name]["n"] / 100.0) for b in bases)
            out[group][name] = {**spread(accs, "acc"), "chance": first["chance"], "n": first["n"],
                                "ci": list(metrics.wilson_interval(correct, n))}
    return out


def summarise_run(run: dict[str, Any], task_names: list[str], protocol: str = "paper1") -> dict[str, Any]:
    """One continual run's results.json (what `train.py continual` writes) as the report's figures: the accuracy
    matrix (`task_accuracy`), NL omega after each task (also split into paper 1's NLU and NLG), NL Delta and VL
    harmonic mean (percent), with 95% intervals: Wilson for every accuracy, a paired bootstrap over documents for
    NL Delta."""
    base_nl = nl_accuracies(run["initial"])
    omega_base = metrics.nl_omega(base_nl)
    matrix = [[task_accuracy(after, t, protocol) for t in task_names] for after in run["after_task"]]
    zero_shot = [task_accuracy(run["initial"], t, protocol) for t in task_names]
    nl_after = [metrics.nl_omega(nl_accuracies(after)) for after in run["after_task"]]
    final = run["after_task"][-1]
    summary = {
        "methods": run["methods"], "task_names": task_names, "acc_matrix": matrix,
        "nl_base": omega_base, "nl_after_task": nl_after, "nl_delta": metrics.nl_delta(omega_base, nl_after[-1]),
        "nl_tasks_final": nl_accuracies(final), "nl_tasks_base": base_nl,
        "vl_after_task": [metrics.average_accuracy(matrix, k) for k in range(len(matrix))],
        "vl_hmean": metrics.vl_hmean(matrix[-1]),
        # one task has no earlier task to forget: forgetting is [], BWT null (its REPORT.md cell is "-")
        "forgetting": metrics.forgetting(matrix),
        "zero_shot": zero_shot, **metrics.sequence_metrics(matrix, zero_shot),  # the CL libraries' figures
        "acc_matrix_ci": [[task_interval(after, t, protocol) for t in task_names] for after in run["after_task"]],
        "nl_delta_ci": delta_interval(run["initial"], final),
        "nl_delta_after_task": [metrics.nl_delta(omega_base, omega) for omega in nl_after],
        "nl_delta_ci_after_task": [delta_interval(run["initial"], after) for after in run["after_task"]],
        "nl_tasks_final_ci": {task: wilson(m) for task, m in final["nl"].items()},
        "nlu_base": group_omega(run["initial"], "nlu"), "nlg_base": group_omega(run["initial"], "nlg"),
        "nlu_after_task": [group_omega(after, "nlu") for after in run["after_task"]],
        "nlg_after_task": [group_omega(after, "nlg") for after in run["after_task"]],
    }
    if "general_vl" in run["initial"]:  # paper 2's general VL score, pooled over its tests
        summary["general_vl_base"] = general_vl_accuracy(run["initial"])
        summary["general_vl_after_task"] = [general_vl_accuracy(after) for after in run["after_task"]]
        summary["general_vl_ci_after_task"] = [general_interval(after) for after in run["after_task"]]
        summary["general_after_task"] = [general_of(nl, vl) for nl, vl in zip(nl_after,
                                                                              summary["general_vl_after_task"])]
    return summary


def task_accuracy(scores: dict[str, Any], task: str, protocol: str) -> float:
    """A task's accuracy in one evaluation, in percent: on its VL test, or (continual pretraining) the sub-skill
    it teaches (`continual_pretraining.skill_score`)."""
    return skill_score(scores, task) if protocol == PRETRAIN else 100.0 * scores["vl"][task]["acc"]


def task_interval(scores: dict[str, Any], task: str, protocol: str) -> list[float] | None:
    """The 95% Wilson interval of `task_accuracy` (None for NL omega, a mean of several benchmarks)."""
    if protocol != PRETRAIN:
        return wilson(scores["vl"][task])
    return None if task == LANGUAGE else wilson(skill_metrics(scores, task))


def wilson(task_metrics: dict[str, Any]) -> list[float]:
    """The 95% Wilson interval of one task's accuracy, in percent."""
    n = int(task_metrics["n"])
    return list(metrics.wilson_interval(round(task_metrics["acc"] * n), n))


def general_interval(scores: dict[str, Any]) -> list[float]:
    """The 95% Wilson interval of the pooled general-VL accuracy, in percent."""
    n = sum(m["n"] for m in scores["general_vl"].values())
    return wilson({"acc": general_vl_accuracy(scores) / 100.0, "n": n})


def delta_interval(base: dict[str, Any], now: dict[str, Any]) -> list[float] | None:
    """The paired-bootstrap 95% interval of NL Delta, when both evaluations kept per-document outcomes."""
    if not all("correct" in m for scores in (base, now) for m in scores["nl"].values()):
        return None
    return list(metrics.bootstrap_delta_interval({t: m["correct"] for t, m in base["nl"].items()},
                                                 {t: m["correct"] for t, m in now["nl"].items()}))


def group_omega(scores: dict[str, Any], group: str) -> float | None:
    """omega over paper 1's NLU benchmarks (multiple choice: WinoGrande, ARC, the world's fact cloze) or NLG ones
    (last word: LAMBADA and the world's analogue, the tasks scored with a perplexity); None if there are none."""
    chosen = {task: 100.0 * m["acc"] for task, m in scores["nl"].items() if ("perplexity" in m) == (group == "nlg")}
    return metrics.nl_omega(chosen) if chosen else None


def nl_accuracies(scores: dict[str, Any]) -> dict[str, float]:
    """{NL task: accuracy in percent} from one evaluation's scores."""
    return {task: 100.0 * m["acc"] for task, m in scores["nl"].items()}
