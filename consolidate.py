"""Consolidate a model trained on a new task into the model it started from (ModelMix or SAC, LLaVA-c 4.1).

    python consolidate.py OLD NEW --method sac --alpha 0.2 [--rule nuclear|top] --out DIR
    python consolidate.py OLD NEW --method sac --sweep 0:1:0.1 --out DIR \\
        --eval-cmd "python eval.py {model} --suite nl --json {json}"

OLD and NEW are Hugging Face-layout LLM folders, or LLaVA folders in any layout `eval.py` reads (ours:
llm/, vision/, projector.safetensors; transformers' LlavaForConditionalGeneration; the original LLaVA
repository's, with --vision naming its CLIP folder) whose LLM and projector are consolidated and whose frozen
vision tower is NEW's. The output keeps NEW's config, tokenizer and layout (an original-LLaVA NEW comes out in
the transformers layout). A sweep writes
DIR/alpha_0.10/ ... and, with --eval-cmd, runs it on every point ({model}: the folder, {json}: where the
command writes {"task": {"acc": ...}, ...}), prints an alpha x task table and writes DIR/sweep.json.
The SVDs are computed once per sweep; each alpha only picks windows and rebuilds the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from mllm_cl.consolidation import RULES, ConsolidationMismatchError, check_alpha, modelmix
from mllm_cl.errors import UserError, run_cli
from mllm_cl.llava import MODEL_TYPE as LLAVA_TYPE
from mllm_cl.llava import PROJECTOR_FILE, is_llava_folder, load_llava, save_llava, tokenizer_folder
from mllm_cl.model_folder import (CONFIG_FILE, atomic_save_tensors, atomic_write_text, check_float_weights,
                                  read_config, read_safetensors, read_tensors, staged_folder, write_model_folder)
from mllm_cl.spectral import decompose_updates, sac_from_spectra
from mllm_cl.weights import IGNORED_SUFFIXES, hf_state_dict_from_llm, llm_from_hf_tensors


MAX_SWEEP_POINTS = 1001  # a sweep writes one full model folder per point


class ConsolidateError(UserError, ValueError):
    """Bad arguments or an eval command that failed; run_cli prints it as `consolidate.py: error: ...`."""


def log(message: str) -> None:
    print(message, flush=True)


def parse_alphas(text: str) -> list[float]:
    """`0,0.1,0.5` or `start:stop:step` (stop included) -> a list of alphas in [0, 1]."""
    try:
        if ":" in text:
            start, stop, step = (float(part) for part in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            count = math.floor((stop - start) / step + 1e-9)
            if count + 1 > MAX_SWEEP_POINTS:
                raise ConsolidateError(f"--sweep {text!r} gives {count + 1} alphas; at most {MAX_SWEEP_POINTS} (each "
                                       "writes a whole model folder): use a larger step")
            alphas = [round(start + i * step, 10) for i in range(count + 1)]
        else:
            alphas = [float(part) for part in text.split(",") if part.strip()]
    except ConsolidateError:
        raise
    except ValueError:
        raise ConsolidateError(f"--sweep {text!r}: expected a comma list (0,0.1,0.5) or start:stop:step (0:1:0.1)")
    try:
        if not alphas:
            raise ValueError("no alphas")
        for alpha in alphas:
            check_alpha(alpha)
    except ValueError:
        raise ConsolidateError(f"--sweep {text!r}: alphas must lie in [0, 1]; got {alphas}") from None
    return alphas


def point_name(alpha: float) -> str:
    return f"alpha_{alpha:.2f}" if abs(alpha * 100 - round(alpha * 100)) < 1e-9 else f"alpha_{alpha:.6g}"


def is_ours(folder: Path) -> bool:
    return read_config(folder).get("model_type") == LLAVA_TYPE


# config.json keys of the LLaVA parts that live beside the weights (mllm_cl.llava)
UNMIXABLE_PARTS = {"prompt_pool_top_n": "an L2P prompt pool", "moelora": "MoELoRA experts, gated per token,"}


def read_model(folder: Path, vision: Path | None = None) -> dict[str, torch.Tensor]:
    """Every consolidated tensor of a folder; a LLaVA folder's keys are prefixed `llm/` (the LLM's Hugging Face
    names) and `projector/`, whatever its layout."""
    unmixable = [part for key, part in UNMIXABLE_PARTS.items() if key in read_config(folder)]
    if unmixable:
        raise ConsolidateError(f"{folder} holds {unmixable[0]}, which ModelMix and SAC cannot mix (they mix weights, "
                               "and these are not in the weights): consolidate models without them")
    if not is_llava_folder(folder):
        tensors = read_tensors(folder)
        check_float_weights(tensors, folder, [k for k in tensors if not k.endswith(IGNORED_SUFFIXES)])
        return tensors
    if not is_ours(folder):
        model = load_llava(folder, vision=vision)
        return ({f"llm/{k}": v for k, v in hf_state_dict_from_llm(model.llm).items()}
                | {f"projector/{k}": v for k, v in model.projector.state_dict().items()})
    tensors = {f"llm/{k}": v for k, v in read_tensors(folder / "llm").items()}
    tensors.update({f"projector/{k}": v for k, v in read_safetensors(folder / PROJECTOR_FILE).items()})
    return tensors


def write_model(out: Path, tensors: dict[str, torch.Tensor], new: Path, vision: Path | None = None) -> None:
    """Write `tensors` in NEW's layout, with NEW's config, tokenizer and (LLaVA) vision tower; an original-LLaVA
    NEW is written in the transformers layout (its tower then sits inside the folder)."""
    if not is_llava_folder(new):
        write_model_folder(out, tensors, read_config(new), copy_from=new)
        return
    if not is_ours(new):
        model = load_llava(new, vision=vision)
        llm = {k.removeprefix("llm/"): v for k, v in tensors.items() if k.startswith("llm/")}
        model.llm = llm_from_hf_tensors(model.llm.config, llm, out)
        model.projector.load_state_dict({k.removeprefix("projector/"): v for k, v in tensors.items()
                                         if k.startswith("projector/")})
        save_llava(model, out, tokenizer_from=tokenizer_folder(new), layout="hf")
        return
    with staged_folder(out) as staging:
        llm = {k.removeprefix("llm/"): v for k, v in tensors.items() if k.startswith("llm/")}
        write_model_folder(staging / "llm", llm, read_config(new / "llm"), copy_from=new / "llm")
        projector = {k.removeprefix("projector/"): v for k, v in tensors.items() if k.startswith("projector/")}
        atomic_save_tensors(staging / PROJECTOR_FILE, projector, metadata={"format": "pt"})
        shutil.copytree(new / "vision", staging / "vision")
        shutil.copy2(new / CONFIG_FILE, staging / CONFIG_FILE)


def eval_arguments(command: str, model: Path, json_path: Path) -> list[str]:
    """The command split as a POSIX shell would split it, {model} and {json} filled in per argument: it runs
    without a shell, so nothing in a path (spaces, quotes, `$(...)`) is ever interpreted."""
    return [arg.replace("{model}", str(model)).replace("{json}", str(json_path)) for arg in shlex.split(command)]


def run_eval(command: str, model: Path, json_path: Path) -> dict[str, float]:
    """Run the user's eval command on one model and read its {"task": {"acc": ...}} JSON."""
    arguments = eval_arguments(command, model, json_path)
    filled = shlex.join(arguments)
    log(f"  eval: {filled}")
    try:
        result = subprocess.run(arguments)
    except OSError as e:
        raise ConsolidateError(f"--eval-cmd could not start {arguments[0]!r}: {e}") from None
    if result.returncode != 0:
        raise ConsolidateError(f"--eval-cmd failed with exit code {result.returncode} on {model}: {filled}")
    try:
        data = json.loads(json_path.read_text())
        return {task: float(entry["acc"]) for task, entry in data.items()}
    except FileNotFoundError:
        raise ConsolidateError(f"--eval-cmd did not write {json_path}: {filled}") from None
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as e:
        raise ConsolidateError(f"{json_path}: expected a JSON object "
                         f"{{\"task\": {{\"acc\": number}}, ...}} ({e!r})") from None


def check_out(out: Path, old: Path, new: Path) -> None:
    """--out must be a new or empty folder that neither holds nor lies inside OLD or NEW: nothing is replaced."""
    for model in (old, new):
        target, source = out.resolve(), model.resolve()
        if target == source or source in target.parents or target in source.parents:
            raise ConsolidateError(f"--out {out} would write over {model}: choose a folder outside both models")
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise ConsolidateError(f"--out {out} exists and is not an empty folder: choose a new folder (nothing is "
                               "replaced)")


def format_table(points: list[dict]) -> str:
    tasks = list(dict.fromkeys(task for point in points for task in point["results"]))
    width = max([8] + [len(t) for t in tasks])
    lines = ["alpha".ljust(7) + "".join(t.rjust(width + 2) for t in tasks)]
    for point in points:
        cells = [point["results"].get(t) for t in tasks]
        lines.append(f"{point['alpha']:<7.3g}" + "".join(
            ("-" if c is None else f"{c:.2f}").rjust(width + 2) for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The command line: a bad argument exits 2 with argparse's usage, any other user error with one
    `consolidate.py: error: ...` line, as the other scripts do."""
    return run_cli("consolidate.py", lambda: consolidate(argv))


def consolidate(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="consolidate.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", type=Path, help="the model before the task")
    parser.add_argument("new", type=Path, help="the model trained on the task, starting from OLD")
    parser.add_argument("--method", choices=("sac", "modelmix"), default="sac")
    parser.add_argument("--rule", choices=RULES, default="nuclear",
                        help="SAC's window rule (LLaVA-c eq 7): nuclear (the update's nuclear norm shrinks by "
                             "alpha) or top (its largest direction shrinks by alpha)")
    points = parser.add_mutually_exclusive_group()
    points.add_argument("--alpha", type=float, default=0.2, help="weight of the new model (default 0.2)")
    points.add_argument("--sweep", help="alphas: 0,0.1,0.5 or start:stop:step; one folder each under --out")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--eval-cmd", help="run on every sweep point; {model} and {json} are filled in")
    parser.add_argument("--rank", type=int, help="the updates have at most this rank (merged LoRA): faster SVDs")
    parser.add_argument("--device", help="where the SVDs run (default: cuda if available, else cpu)")
    parser.add_argument("--vision", type=Path, help="the CLIP folder of original-LLaVA checkpoints (mm_vision_tower)")
    args = parser.parse_args(argv)
    if args.eval_cmd and not args.sweep:
        parser.error("--eval-cmd needs --sweep (a single alpha can be evaluated with eval.py directly)")
    if args.eval_cmd and ("{model}" not in args.eval_cmd or "{json}" not in args.eval_cmd):
        parser.error("--eval-cmd must contain {model} (the model folder) and {json} (the results file to write)")
    if args.rank is not None and args.rank < 1:
        parser.error(f"--rank must be a positive integer (the updates' largest rank), got {args.rank}")
    try:
        check_alpha(args.alpha)
    except ValueError:
        parser.error(f"--alpha must lie in [0, 1], got {args.alpha}")
    alphas = parse_alphas(args.sweep) if args.sweep else [args.alpha]
    names = [point_name(a) for a in alphas]
    if len(set(names)) != len(names):
        parser.error(f"--sweep gives repeated alphas: {alphas}")

    check_out(args.out, args.old, args.new)
    if args.eval_cmd:
        try:
            eval_arguments(args.eval_cmd, args.out, args.out)
        except ValueError as e:
            parser.error(f"--eval-cmd cannot be split into arguments: {e}")
    try:
        if is_llava_folder(args.old) != is_llava_folder(args.new):
            raise ConsolidateError(f"{args.old} and {args.new} are not the same kind of folder (LLaVA vs LLM)")
        start = time.perf_counter()
        old, new = read_model(args.old, args.vision), read_model(args.new, args.vision)
        log(f"read {len(old)} tensors from each model ({time.perf_counter() - start:.1f} s)")
        spectra = None
        if args.method == "sac":
            start = time.perf_counter()
            log("decomposing the updates (once for all alphas):")
            spectra = decompose_updates(old, new, rank=args.rank, device=args.device, log=log)
            log(f"{len(spectra)} matrices decomposed in {time.perf_counter() - start:.1f} s")
        results = []
        for alpha, name in zip(alphas, names):
            start = time.perf_counter()
            target = args.out / name if args.sweep else args.out
            merged = (sac_from_spectra(old, new, spectra, alpha, args.rule) if spectra is not None
                      else modelmix(old, new, alpha))
            write_model(target, merged, args.new, args.vision)
            del merged
            log(f"{args.method} alpha={alpha:g} -> {target} ({time.perf_counter() - start:.1f} s)")
            if args.eval_cmd:
                scores = run_eval(args.eval_cmd, target, args.out / f"{name}.json")
                results.append({"alpha": alpha, "folder": name, "results": scores})
                summary = {"method": args.method, "rule": args.rule if args.method == "sac" else None,
                           "old": str(args.old), "new": str(args.new), "points": results}
                atomic_write_text(args.out / "sweep.json", json.dumps(summary, indent=2) + "\n")  # kept per point
    except ConsolidationMismatchError as e:
        raise ConsolidateError(f"{args.old} and {args.new}: {e}") from None
    if args.eval_cmd:
        log(format_table(results))
        log(f"wrote {args.out / 'sweep.json'}")


if __name__ == "__main__":
    sys.exit(main())
