"""Evaluation suites: find each task's benchmark file, score it, time it, one metrics dict per task.

The NL suite (paper 1's language skill, lm-eval style log-likelihood) is in evaluation_nl.py, the VL suite
(generated answers, VQA exact match or option letter) in evaluation_vl.py; this file ties them to files:

    NL task t: <dir>/t.jsonl                 (docs/CONTRACTS.md request format)
    VL task t: <dir>/tasks/t/test.json       (LLaVA JSON; image paths relative to <dir>)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mllm_cl.evaluation_nl import EvalDataError, TextEncoder, read_nl_documents, score_nl_documents
from mllm_cl.evaluation_vl import evaluate_vl_examples, read_vl_test_set
from mllm_cl.llava import LlavaModel
from mllm_cl.tokenizer import Tokenizer

# Searched in order, the first that has a task wins: real benchmarks from `make data`, then the synthetic world.
NL_DIRS = (Path("data/offline/nl"), Path("data/synthetic/nl"))
VL_DIRS = (Path("data/offline/vl"), Path("data/synthetic"))
NL_PATTERN = "{task}.jsonl"
VL_PATTERN = "tasks/{task}/test.json"


@dataclass
class TaskResult:
    task: str
    metrics: dict[str, float]  # acc (+ acc_norm | perplexity), n
    seconds: float
    correct: list[int] = field(default_factory=list)  # NL: 1/0 per document, in file order

    @property
    def examples_per_s(self) -> float:
        return self.metrics["n"] / max(self.seconds, 1e-9)


def find_tasks(dirs: list[Path] | tuple[Path, ...], pattern: str, tasks: list[str] | None = None) -> dict[str, Path]:
    """{task: file} for `pattern` ("{task}.jsonl") under the first of `dirs` that has it; all found if no `tasks`."""
    if tasks is not None:
        found = {}
        for task in tasks:
            candidates = [Path(folder) / pattern.format(task=task) for folder in dirs]
            path = next((p for p in candidates if p.is_file()), None)
            if path is None:
                raise EvalDataError(f"task {task!r}: none of {', '.join(map(str, candidates))} exists")
            found[task] = path
        return found
    found = {}
    prefix, suffix = pattern.split("{task}")
    for folder in dirs:
        for path in sorted(Path(folder).glob(pattern.format(task="*"))):
            relative = path.relative_to(folder).as_posix()
            found.setdefault(relative[len(prefix):len(relative) - len(suffix)], path)
    if not found:
        raise EvalDataError(f"no {pattern.format(task='*')} benchmark files under {', '.join(map(str, dirs))}: "
                            f"run `make data`, or name the folder that holds them")
    return found


def vl_image_folder(test_file: Path) -> Path:
    """The folder a VL test file's image paths are relative to: the <dir> of <dir>/tasks/<task>/test.json."""
    return test_file.parents[2]


def evaluate_nl_suite(model: torch.nn.Module, tokenizer: TextEncoder, task_files: dict[str, Path], *,
                      max_seq_len: int, batch_size: int = 16, limit: int | None = None) -> list[TaskResult]:
    """Every NL task in turn; every file is read (and validated) before the first forward."""
    documents = {task: read_nl_documents(path, limit) for task, path in task_files.items()}
    results = []
    for task, docs in documents.items():
        start = _clock(model)
        metrics, correct = score_nl_documents(model, tokenizer, docs, max_seq_len=max_seq_len,
                                              batch_size=batch_size)
        results.append(TaskResult(task, metrics, _clock(model) - start, correct))
    return results


def evaluate_vl_suite(model: LlavaModel, tokenizer: Tokenizer, task_files: dict[str, Path], *,
                      template: str, batch_size: int = 16, max_new_tokens: int = 32,
                      limit: int | None = None) -> list[TaskResult]:
    """Every VL task in turn; every test file is read (and validated) before the first generation."""
    examples = {task: read_vl_test_set(path, vl_image_folder(path), limit) for task, path in task_files.items()}
    results = []
    for task, task_examples in examples.items():
        start = _clock(model)
        metrics = evaluate_vl_examples(model, tokenizer, task_examples, template=template, batch_size=batch_size,
                                       max_new_tokens=max_new_tokens)
        results.append(TaskResult(task, metrics, _clock(model) - start))
    return results


def _clock(model: torch.nn.Module) -> float:
    """Wall time, after the model's device has finished its queued work."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
