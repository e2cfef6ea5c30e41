"""The continual stage: VL tasks learned one after another, CL methods plugged in, NL and VL measured after each.

For task t (paper 1's framing: the LLM's text pre-training was task 1, so these are tasks 2, 3, ...):

    start state θ_{t-1} kept  ->  methods.before_task  ->  train on the task (+ replayed samples)
        with loss = task loss (+ each method's term)  ->  methods.after_task (merge, consolidate, Fisher)
        ->  save task_k/model  ->  evaluate NL and every task's VL test set  ->  task_k/eval.json

An interrupted run resumes: finished tasks are recognised by their eval.json, and the methods' state (replay
buffers, Fisher estimates) is rebuilt by replaying their hooks on each finished task's saved model, which is
exact because those hooks depend only on that model and the seeded data.

Under torchrun every rank runs this loop on the same model; the trainer shares each step's batches out, UIR's
inquiry batches are shared out the same way (`distributed.shard_stream`), evaluation is sharded and gathered,
and rank 0 writes every file (model folders, eval.json, results.json) while the others wait.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from mllm_cl import distributed
from mllm_cl.config import StageConfig, StageError, require, to_dict
from mllm_cl.data import TextOnlyInquiries, batches, check_fits, multimodal_dataset
from mllm_cl.device import resolve_device
from mllm_cl.evaluation import evaluate_nl_suite
from mllm_cl.evaluation_vl import VLEvalCache, evaluate_vl_examples, read_vl_test_set
from mllm_cl.json_files import read_json
from mllm_cl.llava import UNRECORDED_TEMPLATE, LlavaModel, load_llava, save_llava, tokenizer_folder
from mllm_cl.losses import LossResult, forward_loss
from mllm_cl.methods import Method, TaskContext, build_methods
from mllm_cl.model_folder import atomic_write_text
from mllm_cl.precision import resolve_dtype
from mllm_cl.run_state import remove_checkpoint
from mllm_cl.seeding import derive_seed, seed_everything
from mllm_cl.tokenizer import Tokenizer, load_tokenizer
from mllm_cl.trainer import train_on


class SampleList(torch.utils.data.Dataset):
    """A task's training samples as (dataset, index) pairs, so replayed samples of earlier tasks can join."""

    def __init__(self, pairs: list[tuple[Any, int]], pad_id: int) -> None:
        if not pairs:
            raise StageError("a continual task has no training sample")
        self.pairs, self.pad_id = pairs, pad_id

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        dataset, i = self.pairs[index]
        return dataset[i]


def endless(dataset: Any, batch_size: int, seed: int, device: torch.device) -> Iterator[dict]:
    """Seeded batches of `dataset`, epoch after epoch, moved to `device`."""
    epoch = 0
    while True:
        for batch in batches(dataset, batch_size, seed, epoch):
            yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        epoch += 1


def run_continual(cfg: StageConfig) -> Path:
    require(cfg, "init", "tasks")
    names = [t.name for t in cfg.tasks]
    if len(set(names)) != len(names) or not all(names):
        raise StageError(f"continual tasks need distinct, non-empty names; got {names}")
    out = Path(cfg.out_dir)
    device = resolve_device(cfg.train.device)
    methods = build_methods(cfg.methods, cfg.method_options)
    asking = [m.name for m in methods if m.needs_inquiries]
    if asking and not cfg.inquiries:
        raise StageError(f"{', '.join(asking)} needs text-only inquiries: set `inquiries` to a LLaVA JSON file of "
                         "questions without images (paper 2 used TQA's; `make data` writes "
                         "data/offline/inquiries/sciq.json)")
    model, tokenizer, cfg = load_init(cfg, device)
    if any(m.name == "ewc" for m in methods) and cfg.train.distributed == "fsdp":
        raise StageError("ewc reads every parameter in its penalty, which FSDP keeps in shards outside their block's "
                         "forward: run ewc with train.distributed=ddp")
    vision_config = model.vision.config
    datasets = {t.name: multimodal_dataset(cfg, t.train, t.image_folder, tokenizer, cfg.template, vision_config)
                for t in cfg.tasks}
    inquiries = TextOnlyInquiries(cfg.inquiries, tokenizer, cfg.template, cfg.max_len) if cfg.inquiries else None
    results_path = out / "results.json"
    results: dict[str, Any] = {"methods": cfg.methods, "tasks": names, "after_task": []}
    start = time.time()
    cache = VLEvalCache()  # the tower stays frozen: every evaluation of this run reuses its image features
    results["initial"] = initial_evaluation(model, tokenizer, cfg, cache)
    initial_seconds = time.time() - start  # near zero when another run already made the shared file

    for index, task in enumerate(cfg.tasks):
        task_dir = out / f"task_{index + 1}_{task.name}"
        done = finished_task(task_dir)
        if done:
            model = load_llava(task_dir / "model", device=device)
        ctx = TaskContext(task_index=index, task_name=task.name, model=model, device=device,
                          train_samples=[(datasets[task.name], i) for i in range(len(datasets[task.name]))],
                          compute_dtype=resolve_dtype(cfg.train.precision, device))
        ctx.loss_fn = lambda m, b: forward_loss(m, b).loss
        ctx.task_batches = lambda n, data=datasets[task.name]: itertools.islice(
            endless(data, cfg.train.micro_batch_size, cfg.train.seed, device), n)
        if inquiries is not None:
            # one inquiry batch per micro-batch, in the order a one-process run takes them
            share = cfg.train.accumulation // distributed.world_size()
            ctx.inquiry_batches = lambda: distributed.shard_stream(
                endless(inquiries, cfg.train.micro_batch_size, cfg.train.seed + 1, device), share)
        ctx.take_start_state()
        if any(m.needs_previous for m in methods) and not done:
            ctx.snapshot_previous()
        seed_everything(derive_seed(cfg.train.seed, "task", index))  # adapters and whatever else a hook draws
        task_start = time.time()
        for method in methods:
            method.before_task(ctx)
        if not done:
            _train_task(cfg, ctx, methods, tokenizer.pad_id, task_dir)
        for method in methods:
            method.after_task(ctx)
        if done:
            print(f"task {index + 1} ({task.name}) already finished: replayed the methods' hooks on its model")
        else:
            distributed.on_main(lambda: save_llava(model, task_dir / "model", tokenizer_from=tokenizer_folder(cfg.init),
                                                   template=cfg.template))
            eval_start = time.time()
            scores = evaluate_model(model, tokenizer, cfg, cache)
            scores["method_log"] = ctx.log
            scores["seconds"] = {"train": eval_start - task_start, "eval": time.time() - eval_start}
            # A finished task resumes from its model folder; its trainer checkpoint (weights, fp32 masters and
            # Adam moments: 4x the model) is dead weight, 2 GB per task and method for SmolLM2-135M.
            distributed.on_main(lambda: (atomic_write_text(task_dir / "eval.json", json.dumps(scores, indent=2) + "\n"),
                                         remove_checkpoint(task_dir)))
        results["after_task"].append(read_json(task_dir / "eval.json", StageError, dict))
        results["wall_seconds"] = time.time() - start
        results["seconds"] = time_spent(results["after_task"], initial_seconds)
        distributed.on_main(lambda: atomic_write_text(results_path, json.dumps(results, indent=2) + "\n"))
    return out / f"task_{len(cfg.tasks)}_{cfg.tasks[-1].name}" / "model"


def load_init(cfg: StageConfig, device: torch.device | None = None) -> tuple[LlavaModel, Tokenizer, StageConfig]:
    """The `init` model in any layout load_llava reads (an original-LLaVA folder takes its tower from `vision`),
    its tokenizer, and `cfg` with the chat template resolved: as set, else the one `init` was trained with,
    else pythia."""
    vision = cfg.vision if Path(cfg.vision).is_dir() else None
    model = load_llava(cfg.init, device=device, vision=vision)
    tokenizer = load_tokenizer(tokenizer_folder(cfg.init))
    check_fits(cfg.max_len, tokenizer, model.llm.config, f"init={cfg.init}")
    return model, tokenizer, replace(cfg, template=cfg.template or model.template or UNRECORDED_TEMPLATE)


def time_spent(after_task: list[dict[str, Any]], initial_seconds: float) -> dict[str, float]:
    """Seconds spent training (methods' hooks and saving included) and evaluating, summed over the finished tasks
    (of every invocation: each task's eval.json keeps its own) plus this invocation's initial evaluation."""
    per_task = [scores.get("seconds", {}) for scores in after_task]
    return {"train": sum(t.get("train", 0.0) for t in per_task),
            "eval": initial_seconds + sum(t.get("eval", 0.0) for t in per_task)}


def finished_task(task_dir: Path) -> bool:
    """Whether an earlier run finished this task: its model saved and its scores readable. Scores damaged since
    (a truncated eval.json) mean the task is learned again from the task before it, as seeded as the first time."""
    if not ((task_dir / "eval.json").is_file() and (task_dir / "model").is_dir()):
        return False
    try:
        read_json(task_dir / "eval.json", StageError, dict)
    except StageError as e:
        print(f"{e}: task {task_dir.name} is learned again")
        return False
    return True


def initial_evaluation(model: LlavaModel, tokenizer: Tokenizer, cfg: StageConfig,
                       cache: VLEvalCache | None = None) -> dict[str, Any]:
    """The scores of `init` before any task, cached in `cfg.initial_eval` (default <out_dir>/initial_eval.json).

    Runs that start from the same model with the same evaluation (the experiment's method runs) share one
    file; the cache is used only when it was made from the same `init`, evaluation settings and test files.
    """
    path = Path(cfg.initial_eval or Path(cfg.out_dir) / "initial_eval.json")
    setup = {"format": 2, "init": str(Path(cfg.init).resolve()), "eval": to_dict(cfg.eval),
             "tests": {t.name: [t.test, t.image_folder] for t in cfg.tasks}}
    if path.is_file():
        try:
            cached = read_json(path, StageError, dict)
        except StageError as e:  # a cache: damaged, it is only made again
            print(f"{e}; evaluating the starting model again")
            cached = {}
        if cached.get("setup") == setup:
            return cached
    scores = {**evaluate_model(model, tokenizer, cfg, cache), "setup": setup}

    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(scores, indent=2) + "\n")

    distributed.on_main(write)
    return scores


@torch.no_grad()
def evaluate_nl(model: LlavaModel, tokenizer: Tokenizer, cfg: StageConfig) -> dict[str, dict]:
    """NL skill of the LLM alone on every NL file of the evaluation: {task: metrics, with each document's
    outcome under "correct" (for intervals)}."""
    nl_files = {Path(path).stem: Path(path) for path in cfg.eval.nl_files}
    nl_results = evaluate_nl_suite(model.llm, tokenizer, nl_files, max_seq_len=model.llm.config.max_seq_len,
                                   batch_size=cfg.eval.batch_size, limit=cfg.eval.nl_limit or None)
    return {r.task: {**r.metrics, "correct": r.correct} for r in nl_results}


@torch.no_grad()
def evaluate_model(model: LlavaModel, tokenizer: Tokenizer, cfg: StageConfig,
                   cache: VLEvalCache | None = None) -> dict[str, dict[str, dict]]:
    """NL skill of the LLM alone on every NL file, VL accuracy on the test split of every task that has one (and
    on the general VL tests, when the evaluation names any). A `cache` kept across the evaluations of one model
    (or of models sharing its tower) saves reading the test files and encoding their images again."""
    was_training = model.training
    model.eval()
    nl = evaluate_nl(model, tokenizer, cfg)

    def vl_scores(tests: list) -> dict[str, dict]:
        scores = {}
        for test in tests:
            folder, limit = test.image_folder or None, cfg.eval.vl_limit or None
            examples = (cache.test_set(test.test, folder, limit) if cache is not None
                        else read_vl_test_set(test.test, folder, limit))
            scores[test.name] = evaluate_vl_examples(model, tokenizer, examples, template=cfg.template,
                                                     batch_size=cfg.eval.batch_size,
                                                     max_new_tokens=cfg.eval.max_new_tokens, cache=cache)
        return scores

    results = {"nl": nl, "vl": vl_scores([task for task in cfg.tasks if task.test])}  # test-less: scored elsewhere
    if cfg.eval.general_vl:
        results["general_vl"] = vl_scores(cfg.eval.general_vl)
    model.train(was_training)
    return results


def _train_task(cfg: StageConfig, ctx: TaskContext, methods: list[Method], pad_id: int, task_dir: Path) -> None:
    """Train on the task's samples (and what the methods added) with the task loss plus every method's term."""
    data = SampleList(ctx.train_samples, pad_id)
    need_logits = any(m.needs_logits for m in methods)

    def loss_fn(model: torch.nn.Module, batch: dict) -> LossResult:
        result = forward_loss(model, batch, need_logits)
        loss = result.loss
        for method in methods:
            loss = method.loss(ctx, batch, result.output, loss)
        return result._replace(loss=loss)

    print(f"task {ctx.task_index + 1} ({ctx.task_name}): {len(data)} samples, methods "
          f"{[m.name for m in methods]}", flush=True)
    train_on(ctx.model, data, loss_fn, cfg.train, task_dir)
