"""Evaluate a model folder on the NL (language) and VL (vision-language) suites, or write a run's report.

    python eval.py MODEL_DIR --suite nl|vl|all [--tasks a,b] [--limit N] [--json OUT.json] [--batch-size B]
                   [--device auto|cpu|cuda] [--dtype float32|bfloat16] [--nl-dir DIR] [--vl-dir DIR]
    python eval.py --report RUN_DIR [RUN_DIR ...] [--out DIR]
    python eval.py --summary RUN_DIR          (an experiment's SUMMARY.md: the README's tables)

MODEL_DIR is a Hugging Face-layout LLM folder (ours or one written by transformers) or a LLaVA folder of
this project (config.json "model_type": "mllm_cl_llava"; the NL suite then scores its LLM alone).
NL tasks are `<dir>/<task>.jsonl`, VL tasks `<dir>/tasks/<task>/test.json` (see mllm_cl/evaluation.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from mllm_cl.device import resolve_device
from mllm_cl.errors import run_cli
from mllm_cl.evaluation import (NL_DIRS, NL_PATTERN, VL_DIRS, VL_PATTERN, EvalDataError, TaskResult,
                                evaluate_nl_suite, evaluate_vl_suite, find_tasks)
from mllm_cl.experiment import summarise_run
from mllm_cl.llava import UNRECORDED_TEMPLATE, is_llava_folder, load_llava, tokenizer_folder
from mllm_cl.model_folder import atomic_write_text, check_not_an_input, check_replaceable, check_writable
from mllm_cl.report import write_report
from mllm_cl.summary import write_summary
from mllm_cl.tokenizer import load_tokenizer
from mllm_cl.weights import load_llm

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", nargs="?", type=Path, help="LLM or LLaVA model folder")
    parser.add_argument("--suite", choices=("nl", "vl", "all"), default="all",
                        help="all = nl, plus vl when MODEL_DIR is a LLaVA folder")
    parser.add_argument("--tasks", help="comma-separated task names (default: every task file found)")
    parser.add_argument("--limit", type=int, help="only the first N documents of each task, in file order")
    parser.add_argument("--json", type=Path, help="write {task: {acc, acc_norm | perplexity, n}} here")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (default auto: cuda if available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--nl-dir", type=Path,
                        help=f"folder of NL task files (default: {', '.join(map(str, NL_DIRS))})")
    parser.add_argument("--vl-dir", type=Path, help=f"folder holding tasks/<task>/test.json and the images "
                                                    f"(default: {', '.join(map(str, VL_DIRS))})")
    parser.add_argument("--template", default="", help="chat template of VL prompts (default: the one the model "
                                                      "was trained with, if its folder says, else pythia)")
    parser.add_argument("--vision", type=Path, help="the CLIP folder of an original-LLaVA checkpoint (its "
                                                    "mm_vision_tower)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="longest VL answer generated")
    parser.add_argument("--report", nargs="+", type=Path, metavar="RUN_DIR", help="write the report of run folders")
    parser.add_argument("--out", type=Path, help="with --report: where REPORT.md and the plots go (default: the "
                                                 "first RUN_DIR)")
    parser.add_argument("--summary", type=Path, metavar="RUN_DIR",
                        help="rewrite an experiment's SUMMARY.md from its results.json (and its `then` experiments')")
    args = parser.parse_args(argv)
    if sum(x is not None for x in (args.model_dir, args.report, args.summary)) != 1:
        parser.error("give one of MODEL_DIR, --report RUN_DIR [RUN_DIR ...] or --summary RUN_DIR")
    if args.limit is not None and args.limit < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        parser.error("--limit, --batch-size and --max-new-tokens must be at least 1")
    return args


def print_table(results: list[TaskResult]) -> None:
    print(f"{'task':<24} {'n':>6} {'acc':>7} {'acc_norm':>9} {'perplexity':>11} {'examples/s':>11}")
    for r in results:
        norm = f"{r.metrics['acc_norm']:.4f}" if "acc_norm" in r.metrics else "-"
        ppl = f"{r.metrics['perplexity']:.3f}" if "perplexity" in r.metrics else "-"
        print(f"{r.task:<24} {r.metrics['n']:>6} {r.metrics['acc']:>7.4f} {norm:>9} {ppl:>11} "
              f"{r.examples_per_s:>11.1f}")


def split_tasks(names: list[str], nl_dirs: list[Path], suite: str) -> tuple[list[str], list[str]]:
    """With --suite all, a named task is NL if an NL file has its name, else VL."""
    if suite != "all":
        return (names, []) if suite == "nl" else ([], names)
    nl = [t for t in names if any((d / NL_PATTERN.format(task=t)).is_file() for d in nl_dirs)]
    return nl, [t for t in names if t not in nl]


def evaluate(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    is_llava = is_llava_folder(args.model_dir)
    if args.suite == "vl" and not is_llava:
        raise EvalDataError(f"--suite vl needs a LLaVA folder (ours, transformers' or the original LLaVA layout); "
                            f"{args.model_dir} is a language model: use --suite nl")
    tokenizer = load_tokenizer(tokenizer_folder(args.model_dir) if is_llava else args.model_dir)
    llava = load_llava(args.model_dir, device, dtype, vision=args.vision).eval() if is_llava else None
    llm = llava.llm if llava is not None else load_llm(args.model_dir, device, dtype).eval()
    template = args.template or (llava.template if llava is not None else None) or UNRECORDED_TEMPLATE

    nl_dirs = [args.nl_dir] if args.nl_dir else list(NL_DIRS)
    vl_dirs = [args.vl_dir] if args.vl_dir else list(VL_DIRS)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    nl_names, vl_names = split_tasks(names, nl_dirs, args.suite) if names else (None, None)
    results: list[TaskResult] = []
    if args.suite in ("nl", "all") and (nl_names is None or nl_names):
        results += evaluate_nl_suite(llm, tokenizer, find_tasks(nl_dirs, NL_PATTERN, nl_names),
                                     max_seq_len=llm.config.max_seq_len, batch_size=args.batch_size, limit=args.limit)
    if args.suite == "all" and llava is None:
        if vl_names:
            raise EvalDataError(f"VL task(s) {vl_names} need a LLaVA folder; {args.model_dir} is a language model")
        print(f"(VL suite skipped: {args.model_dir} is a language model, not a LLaVA folder)")
    if args.suite in ("vl", "all") and llava is not None and (vl_names is None or vl_names):
        results += evaluate_vl_suite(llava, tokenizer, find_tasks(vl_dirs, VL_PATTERN, vl_names),
                                     template=template, batch_size=args.batch_size,
                                     max_new_tokens=args.max_new_tokens, limit=args.limit)
    print_table(results)
    return {r.task: r.metrics for r in results}


def report_sources(paths: list[Path]) -> list[Path] | dict[str, Any]:
    """What `--report` draws: the paths as they are, unless one holds a continual stage's own results.json
    (`train.py continual` writes per-task scores, not the report's figures); then every source's methods in one
    dict, a stage's summarised (`summarise_run`) under its folder's name."""
    loaded = {}
    for path in paths:
        file = path / "results.json" if path.is_dir() else path
        try:
            loaded[path] = json.loads(file.read_text())
        except (OSError, ValueError):
            return paths  # the report's own reader says what is wrong with it
    stage = {path: data for path, data in loaded.items() if isinstance(data, dict) and "after_task" in data}
    if not stage:
        return paths
    methods: dict[str, Any] = {}
    for path, data in loaded.items():
        if path in stage:
            name = (path if path.is_dir() else path.parent).resolve().name
            methods[name] = summarise_run(data, data["tasks"])
        elif isinstance(data, dict) and isinstance(data.get("methods"), dict):
            methods.update(data["methods"])
        elif isinstance(data, dict) and "method" in data:  # the report's one-method form
            methods[str(data["method"])] = {k: v for k, v in data.items() if k != "method"}
        else:
            return paths
    return {"methods": methods}


def is_scores_file(value: object) -> bool:
    """What --json writes: {task: {"acc": ..., "n": ..., ...}}."""
    return isinstance(value, dict) and all(isinstance(m, dict) and {"acc", "n"} <= set(m) for m in value.values())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def run() -> None:
        if args.report is not None:
            print(f"wrote {write_report(report_sources(args.report), args.out or args.report[0])}")
            return
        if args.summary is not None:
            print(f"wrote {write_summary(args.summary)}")
            return
        if args.json is not None:
            inputs = {"the model folder": args.model_dir, "--vision": args.vision}
            inputs |= {"--nl-dir": args.nl_dir, "--vl-dir": args.vl_dir}
            inputs |= {f"the default task folder {d}": d for d in [*NL_DIRS, *VL_DIRS]}
            check_not_an_input(args.json, inputs, "--json")
            check_replaceable(args.json, is_scores_file, "--json", "a scores file eval.py wrote")
            check_writable(args.json)  # before the evaluation, not after it
        metrics = evaluate(args)
        if args.json is not None:
            atomic_write_text(args.json, json.dumps(metrics, indent=2) + "\n")
            print(f"wrote {args.json}")

    return run_cli("eval.py", run)


if __name__ == "__main__":
    sys.exit(main())
