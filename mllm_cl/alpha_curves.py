"""The alpha curves of LLaVA-c (paper 2, Figure 4): how much general skill and task skill a consolidated model
keeps as the consolidation weight alpha goes from 0 (the model before the task) to 1 (the model after it).

For each model trained on one unseen task from a base model (vanilla LoRA, and LoRA with UIR), the update is
consolidated at every alpha with ModelMix (theta_old + alpha * Delta, eq 4) and with SAC under both readings of
its window rule (`top` and `nuclear`, see `mllm_cl.consolidation`), from one set of SVDs per trained model (the
code path of `consolidate.py --sweep`). At every point:

    general = harmonic mean(NL omega, general-VL accuracy)        task = the task's VL accuracy

and two regions summarise each curve:

    alpha_G = the largest alpha up to which general stays >= 95% of the base model's
    alpha_T = the smallest alpha whose task accuracy is >= 90% of the unconsolidated model's (alpha = 1)

A consolidation that widens the general-stable region (larger alpha_G at the same alpha_T) keeps more of the
old skills for the same gain, which is what the paper claims for SAC over ModelMix. Over seeds, each rule's
width alpha_G - alpha_T is compared with ModelMix's on the same seed (`width_vs_modelmix`).

Each trained model's update is also summarised by its spectrum per matrix type (`mllm_cl.update_spectrum`):
how many singular values carry 90% of its nuclear norm, which is what SAC has to work with.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mllm_cl import metrics
from mllm_cl.metrics import region_width
from mllm_cl.config import StageConfig
from mllm_cl.consolidation import modelmix
from mllm_cl.continual import evaluate_model, load_init
from mllm_cl.evaluation_vl import VLEvalCache
from mllm_cl.llava import load_llava
from mllm_cl.spectral import UpdateSpectrum, decompose_updates, sac_from_spectra
from mllm_cl.update_spectrum import NUCLEAR_SHARE, spectrum_stats, update_matrices
from mllm_cl.workers import Job, run_jobs

ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))
CONSOLIDATIONS = ("modelmix", "sac-top", "sac-nuclear")
GENERAL_KEEP, TASK_REACH = 0.95, 0.90  # the region rules above
CURVE_FIELDS = ("alpha", "general", "task", "nl", "general_vl")  # a curve's lists, one value per alpha


def consolidated(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor], alphas: tuple[float, ...],
                 spectra: Mapping[str, UpdateSpectrum] | None = None
                 ) -> Iterator[tuple[str, float, dict[str, torch.Tensor]]]:
    """(consolidation, alpha, weights) for every consolidation and alpha; the SVDs are computed once (or given:
    `decompose_updates(old, new)`)."""
    spectra = decompose_updates(old, new) if spectra is None else spectra
    for alpha in alphas:
        yield "modelmix", alpha, modelmix(old, new, alpha)
        for rule in ("top", "nuclear"):
            yield f"sac-{rule}", alpha, sac_from_spectra(old, new, spectra, alpha, rule)


def general_vl_accuracy(scores: dict[str, Any]) -> float:
    """Accuracy over all general-VL test questions of one evaluation pooled, in percent."""
    tests = scores["general_vl"].values()
    return 100.0 * sum(m["acc"] * m["n"] for m in tests) / sum(m["n"] for m in tests)


def general_of(nl: float, general_vl: float) -> float:
    """Paper 2's general score: the harmonic mean of NL omega and general-VL accuracy (a zero counts as 0.1%)."""
    return metrics.nl_omega({"nl": nl, "general_vl": general_vl})


def general_score(scores: dict[str, Any]) -> tuple[float, float, float]:
    """(general, NL omega, general-VL accuracy), in percent, from one evaluation."""
    nl = metrics.nl_omega({task: 100.0 * m["acc"] for task, m in scores["nl"].items()})
    vl = general_vl_accuracy(scores)
    return general_of(nl, vl), nl, vl


def regions(alphas: list[float], general: list[float], task: list[float], base_general: float) -> dict[str, Any]:
    """alpha_G and alpha_T of one curve (None when no alpha qualifies), by the rules in the module docstring."""
    alpha_g = None
    for alpha, value in zip(alphas, general):
        if value < GENERAL_KEEP * base_general:
            break
        alpha_g = alpha
    reach = TASK_REACH * task[alphas.index(1.0)]
    alpha_t = next((alpha for alpha, value in zip(alphas, task) if value >= reach), None)
    return {"alpha_G": alpha_g, "alpha_T": alpha_t}


def alpha_curves(cfg: StageConfig, trained: dict[str, str | Path], alphas: tuple[float, ...] = ALPHAS,
                 device: torch.device | None = None, workers: int = 1) -> dict[str, Any]:
    """The curves for every trained model (name -> folder) learned on `cfg.tasks[0]` from `cfg.init`; `cfg.eval`
    names the NL files and the general-VL tests. With `workers` > 1 each model's alphas are shared among that
    many jobs, run side by side (`mllm_cl.workers`). Returns the alpha_curves.json structure."""
    jobs = curve_jobs(cfg, trained, alphas, device, pieces=workers)
    owner = {job.name: name for name, pieces in jobs.items() for job in pieces}
    parts: dict[str, list[dict[str, Any]]] = {name: [] for name in trained}
    run_jobs([job for pieces in jobs.values() for job in pieces], workers,
             lambda job, result, seconds: parts[owner[job.name]].append(result))
    return combine_curves(cfg.tasks[0].name, parts)


def curve_jobs(cfg: StageConfig, trained: dict[str, str | Path], alphas: tuple[float, ...] = ALPHAS,
               device: torch.device | None = None, pieces: int = 1) -> dict[str, list[Job]]:
    """The `model_curves` jobs of every trained model (name -> its jobs), to run wherever its model is ready:
    `pieces` jobs per model, each with every `pieces`-th alpha (so that they cost about the same), each one's
    output in <cfg.out_dir>/<name>.log (<name>.part<i>.log for several). `combine_curves` joins their results."""
    if len(cfg.tasks) != 1 or not cfg.eval.general_vl:
        raise ValueError("alpha curves need exactly one task and general-VL tests in the evaluation")
    if 1.0 not in alphas or 0.0 not in alphas:
        raise ValueError(f"alpha curves need alpha 0 and 1 among the alphas (the two ends), got {alphas}")
    shares = [alphas[i::pieces] for i in range(min(pieces, len(alphas)))]
    out = Path(cfg.out_dir)
    return {name: [Job(f"alpha curves of {name}" + (f" ({i + 1}/{len(shares)})" if len(shares) > 1 else ""),
                       model_curves, (cfg, name, folder, share, device),
                       out / (f"{name}.part{i + 1}.log" if len(shares) > 1 else f"{name}.log"))
                   for i, share in enumerate(shares)]
            for name, folder in trained.items()}


def combine_curves(task: str, parts: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The alpha_curves.json structure of the curves on `task` from each trained model's `model_curves` results
    (name -> the results of its jobs, in any order; the names in the order the file lists them)."""
    merged = {name: merge_pieces(pieces) for name, pieces in parts.items()}
    base_general = next(iter(merged.values()))["base_general"]  # every model's alpha 0 is the same base model
    curves = {run: curve for part in merged.values() for run, curve in part["runs"].items()}
    return {"task": task, "base_general": base_general,
            "rules": {"alpha_G": f"the largest alpha up to which general >= {GENERAL_KEEP:.0%} of base_general",
                      "alpha_T": f"the smallest alpha whose task accuracy >= {TASK_REACH:.0%} of alpha 1's",
                      "k": f"the fewest singular values of a matrix's update (new - old) that carry >= "
                           f"{NUCLEAR_SHARE:.0%} of its nuclear norm (0 for an update of zero)"},
            "runs": curves,
            "regions": {run: regions(c["alpha"], c["general"], c["task"], base_general) for run, c in curves.items()},
            "spectra": {name: part["spectrum"] for name, part in merged.items()}}


def merge_pieces(pieces: list[dict[str, Any]]) -> dict[str, Any]:
    """One model's `model_curves` result from those of its jobs, each over some of the alphas: every curve's
    points in the order of alpha, the base's general score from the job that drew alpha 0."""
    runs: dict[str, dict[str, list[float]]] = {}
    for run in pieces[0]["runs"]:
        points = sorted(point for piece in pieces for point in zip(*(piece["runs"][run][f] for f in CURVE_FIELDS)))
        runs[run] = {field: [point[i] for point in points] for i, field in enumerate(CURVE_FIELDS)}
    base = next(piece["base_general"] for piece in pieces if piece["base_general"] is not None)
    return {"base_general": base, "runs": runs, "spectrum": pieces[0]["spectrum"]}


def model_curves(cfg: StageConfig, name: str, folder: str | Path, alphas: tuple[float, ...],
                 device: torch.device | None = None) -> dict[str, Any]:
    """{"base_general", "runs": {"<name>/<consolidation>": curve}, "spectrum"} for one trained model: every
    consolidation of its update at every alpha, evaluated (general, its parts, and the task), and the update's
    spectrum per matrix type (`mllm_cl.update_spectrum.spectrum_stats`) from the same SVDs. base_general is None
    when the alphas leave out 0 (a job with a share of them: `curve_jobs`)."""
    model, tokenizer, cfg = load_init(cfg, device)
    keys = [k for k in model.state_dict() if not k.startswith("vision.")]
    old = {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in model.state_dict().items() if k in keys}
    cache = VLEvalCache()  # the tower is not consolidated: its features of the test images serve every alpha
    ends: dict[float, dict] = {}  # alpha 0 (the base) and 1 are the same model for every consolidation
    if 0.0 in alphas:
        ends[0.0] = evaluate_model(model, tokenizer, cfg, cache)
    trained_state = load_llava(folder).state_dict()
    new = {k: trained_state[k].detach().to("cpu", torch.float32) for k in keys}
    task = cfg.tasks[0].name
    curves: dict[str, dict[str, list[float]]] = {}
    spectra = decompose_updates(old, new)
    for consolidation, alpha, weights in consolidated(old, new, alphas, spectra):
        if alpha in ends:
            scores = ends[alpha]
        else:
            model.load_state_dict(weights, strict=False)
            scores = evaluate_model(model, tokenizer, cfg, cache)
            if alpha == 1.0:
                ends[alpha] = scores
        general, nl, vl = general_score(scores)
        curve = curves.setdefault(f"{name}/{consolidation}", {field: [] for field in CURVE_FIELDS})
        for field, value in zip(CURVE_FIELDS, (alpha, general, 100.0 * scores["vl"][task]["acc"], nl, vl)):
            curve[field].append(value)
        print(f"alpha curves: {name}/{consolidation} alpha {alpha:.1f}: general {general:.1f} "
              f"(NL {nl:.1f}, general VL {vl:.1f}), {task} {curve['task'][-1]:.1f}", flush=True)
    return {"base_general": general_score(ends[0.0])[0] if 0.0 in ends else None, "runs": curves,
            "spectrum": spectrum_stats(spectra, update_matrices(old))}


def curves_over_seeds(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """The alpha curves of several seeds as one: each curve's mean (and sample sd) per alpha, the regions of the
    mean curves, each seed's own regions (`regions_per_seed`), which say how stable a region's edge is, each
    rule's region width against ModelMix's paired by seed (`width_vs_modelmix`), and each model's update
    spectrum per seed (`spectra_per_seed`, when every seed has one)."""
    first = per_seed[0]
    curves: dict[str, dict[str, list[float]]] = {}
    for run, curve in first["runs"].items():
        mean = {"alpha": curve["alpha"]}
        for field in CURVE_FIELDS[1:]:
            values = np.array([seed["runs"][run][field] for seed in per_seed])  # (seeds, alphas)
            mean[field] = values.mean(axis=0).tolist()
            mean[f"{field}_sd"] = values.std(axis=0, ddof=min(1, len(per_seed) - 1)).tolist()
        curves[run] = mean
    base = float(np.mean([seed["base_general"] for seed in per_seed]))
    out = {"task": first["task"], "base_general": base, "rules": first["rules"], "runs": curves,
           "seeds": len(per_seed),
           "regions": {run: regions(c["alpha"], c["general"], c["task"], base) for run, c in curves.items()},
           "regions_per_seed": {run: [seed["regions"][run] for seed in per_seed] for run in curves}}
    out["width_vs_modelmix"] = width_vs_modelmix(out["regions_per_seed"])
    if all("spectra" in seed for seed in per_seed):  # alpha_curves.json files written before the spectra had none
        out["spectra_per_seed"] = {name: [seed["spectra"][name] for seed in per_seed] for name in first["spectra"]}
    return out


def paired_summary(differences: list[float | None]) -> dict[str, Any]:
    """{"per_seed", "mean", "sd", "n"}: the differences as given, and the mean and sample sd of the defined ones
    (mean None when none is defined, sd None for fewer than two)."""
    defined = [d for d in differences if d is not None]
    return {"per_seed": differences, "mean": float(np.mean(defined)) if defined else None,
            "sd": float(np.std(defined, ddof=1)) if len(defined) > 1 else None, "n": len(defined)}


def width_vs_modelmix(regions_per_seed: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{run prefix: {rule: paired_summary}} of width(rule) - width(modelmix) on the same seed, for the SAC rules,
    a region's width being alpha_G - alpha_T (`region_width`; the difference None where either is undefined).
    Positive: the rule widens the general-stable region against ModelMix on that seed."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for prefix in sorted({run.split("/")[0] for run in regions_per_seed}):
        base = regions_per_seed.get(f"{prefix}/modelmix")
        if base is None:
            continue
        for rule in CONSOLIDATIONS[1:]:
            if f"{prefix}/{rule}" not in regions_per_seed:
                continue
            widths = [(region_width(r), region_width(b)) for r, b in zip(regions_per_seed[f"{prefix}/{rule}"], base)]
            out.setdefault(prefix, {})[rule] = paired_summary(
                [None if w is None or v is None else round(w - v, 9) + 0.0 for w, v in widths])  # no float noise, no -0
    return out
