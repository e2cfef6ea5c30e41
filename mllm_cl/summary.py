"""SUMMARY.md: the README's tables, written from an experiment's results.json (one table per paper).

An experiment writes out_dir/SUMMARY.md whenever it writes its results.json; an existing run's is rewritten by
`python eval.py --summary RUN_DIR`. The README and docs/paper*.md quote the tables of `make demo SEEDS=3` between
`<!-- summary:NAME -->` and `<!-- /summary:NAME -->` markers; `python -m mllm_cl.summary RUN_DIR FILE...` rewrites
them from a run, and tests/test_summary.py checks that they equal, to the character, what this module writes from
the committed docs/demo/results.json and docs/demo/paper2/results.json.

Paper 1's layout (Srivastava et al., Tables 3 and 4): per method, NL Delta = omega(base) - omega(now) after each
task (positive = language forgotten) and each task's VL accuracy right after it was learned. Paper 2's (LLaVA-c,
Table 4 with its general score): per run, NL Delta, general VL and the general score (harmonic mean of NL omega
and general VL) at the end, each task's accuracy right after learning it and at the end, and the joint
multitask run. Figures over seeds read "mean +/- sd" (sample sd); a single seed's read as plain numbers.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from mllm_cl.errors import UserError
from mllm_cl.json_files import read_json
from mllm_cl.model_folder import atomic_write_text
from mllm_cl.report import markdown_table

SUMMARY_FILE = "SUMMARY.md"


def _number(value: float) -> str:
    text = f"{value:.1f}"
    return "0.0" if text == "-0.0" else text


def _spread(mean: float | None, sd: float | None = None) -> str:
    if mean is None or not np.isfinite(mean):
        return "-"
    return _number(mean) if sd is None else f"{_number(mean)} +/- {_number(sd)}"


def _per_task(m: dict[str, Any], field: str) -> str:
    """A per-task curve (`field`, and `field`_sd over seeds) as "a / b / c"."""
    sds = m.get(f"{field}_sd") or [None] * len(m[field])
    return " / ".join(_spread(v, sd) for v, sd in zip(m[field], sds))


def _learned(m: dict[str, Any]) -> str:
    """Each task's accuracy right after learning it: the accuracy matrix's diagonal."""
    matrix, sds = m["acc_matrix"], m.get("acc_matrix_sd")
    return " / ".join(_spread(matrix[k][k], sds[k][k] if sds else None) for k in range(len(matrix)))


def _final(m: dict[str, Any]) -> str:
    """Each task's accuracy at the end: the accuracy matrix's last row."""
    row, sds = m["acc_matrix"][-1], m.get("acc_matrix_sd")
    return " / ".join(_spread(v, sds[-1][j] if sds else None) for j, v in enumerate(row))


def _field(m: dict[str, Any], field: str) -> str:
    return _spread(m.get(field), m.get(f"{field}_sd"))


def _last(m: dict[str, Any], field: str) -> str:
    """A per-task curve's value after the last task (with its sd over seeds)."""
    return _spread(m[field][-1], (m.get(f"{field}_sd") or [None])[-1])


def _seeds_line(results: dict[str, Any]) -> str:
    seeds = results.get("seeds")
    if seeds and len(seeds) > 1:
        return f"seeds {', '.join(map(str, seeds))}, mean +/- sd over seeds"
    return "one seed"


def _is_paper2(methods: dict[str, dict[str, Any]]) -> bool:
    return all("general_after_task" in m for m in methods.values())


def paper1_table(results: dict[str, Any]) -> str:
    """Paper 1's grid: NL Delta after each task, the final NL Delta per seed, VL right after learning each task and
    the VL average accuracy at the end."""
    methods = results["methods"]
    names = results["tasks"]
    tasks = " / ".join(names)
    per_seed = all("nl_delta_per_seed" in m for m in methods.values())
    rows = []
    for name, m in methods.items():
        row = [name, _per_task(m, "nl_delta_after_task")]
        if per_seed:
            row.append(", ".join(_number(v) for v in m["nl_delta_per_seed"]))
        row += [_learned(m), _last(m, "vl_after_task")]
        rows.append(row)
    headers = ["method", f"NL Delta after {tasks}"] + (["final NL Delta per seed"] if per_seed else []) + \
        [f"VL acc right after learning {tasks}", "VL avg acc at the end"]
    base = next(iter(methods.values()))
    return (f"Start (the aligned model): NL omega {_field(base, 'nl_base')}. Accuracies in percent; "
            f"{_seeds_line(results)}.\n\n" + markdown_table(headers, rows))


def _joint_row(joint: dict[str, Any], names: list[str]) -> list[str]:
    """The joint multitask run (all tasks' samples mixed), with its sd over seeds when it has several."""
    runs = joint.get("per_seed", [joint])

    def over(values: list[float]) -> str:
        return _spread(float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None)

    final = " / ".join(over([r["vl"][t] for r in runs]) for t in names)
    return [f"joint ({joint['run']}, all tasks at once)", "-", over([r["general_vl"] for r in runs]),
            over([r["general"] for r in runs]), "-", final]


def paper2_table(results: dict[str, Any]) -> str:
    """Paper 2's grid: NL Delta after each task, general VL and the general score at the end, each task right after
    learning it and at the end; the joint run last."""
    methods = results["methods"]
    names = results["tasks"]
    tasks = " / ".join(names)
    rows = []
    for name, m in methods.items():
        rows.append([name, _per_task(m, "nl_delta_after_task"), _last(m, "general_vl_after_task"),
                     _last(m, "general_after_task"), _learned(m), _final(m)])
    if results.get("joint"):
        rows.append(_joint_row(results["joint"], names))
    headers = ["run", f"NL Delta after {tasks}", "general VL at the end", "general score at the end",
               f"acc right after learning {tasks}", f"acc at the end, {tasks}"]
    base = next(iter(methods.values()))
    return (f"Start (the instruction-tuned model): NL omega {_field(base, 'nl_base')}, general VL "
            f"{_field(base, 'general_vl_base')}{_start_detail(results.get('base'))}. Accuracies in percent; "
            f"{_seeds_line(results)}.\n\n" + markdown_table(headers, rows))


def _start_detail(base: dict[str, Any] | None) -> str:
    """Each general-VL skill and each task's zero-shot accuracy of the starting point, with its chance."""
    if not base:
        return ""

    def tests(group: str) -> str:
        return ", ".join(f"{name} {_field(m, 'acc')} (chance {_number(m['chance'])})"
                         for name, m in base[group].items())

    return f" ({tests('general_vl_by_skill')}); zero-shot {tests('zero_shot')}"


def summary_sections(results: dict[str, Any], followers: dict[str, dict[str, Any]] | None = None) -> dict[str, str]:
    """Experiment name -> its table (paper 2's layout when its runs have a general score, else paper 1's), for the
    experiment and each one it ran `then` (name -> that one's results.json)."""
    sections = {}
    for name, res in {results["name"]: results, **(followers or {})}.items():
        sections[name] = paper2_table(res) if _is_paper2(res["methods"]) else paper1_table(res)
    return sections


def summary_markdown(results: dict[str, Any], followers: dict[str, dict[str, Any]] | None = None) -> str:
    md = [f"# Summary: {results['name']}", "",
          "Written by mllm_cl/summary.py from results.json. NL Delta = omega(base) - omega(now), positive = "
          "language forgotten; the full tables, with 95% intervals, are in REPORT.md.", ""]
    for name, table in summary_sections(results, followers).items():
        md += [f"## {name}", "", table, ""]
    return "\n".join(md)


RUN_FIELDS = ("acc_matrix", "nl_base", "nl_delta_after_task", "vl_after_task")  # every run's, in both layouts


def read_results(path: Path) -> dict[str, Any]:
    """An experiment's results.json, checked for what the tables read (a clear error naming the file, not a
    KeyError from inside a table)."""
    results = read_json(path, UserError, dict, "an experiment's results (train.py experiment writes them)")
    missing = [key for key in ("name", "tasks", "methods") if key not in results]
    if missing or not isinstance(results["methods"], dict) or not results["methods"]:
        raise UserError(f"{path}: not an experiment's results.json (it needs name, tasks and a non-empty methods; "
                        f"missing: {', '.join(missing) or 'methods is empty'})")
    for name, m in results["methods"].items():
        absent = [key for key in RUN_FIELDS if key not in m]
        if absent:
            raise UserError(f"{path}: run {name!r} has no {', '.join(absent)}; it was written by an older version "
                            "or is not an experiment's summary")
    return results


def read_run(out_dir: str | Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """An experiment's results (out_dir/results.json) and those of each experiment it ran `then`
    (out_dir/<name>/results.json, name -> results)."""
    out = Path(out_dir)
    results = read_results(out / "results.json")
    return results, {name: read_results(out / name / "results.json")
                     for name in results.get("then", {}) if (out / name / "results.json").is_file()}


def write_summary(out_dir: str | Path) -> Path:
    """out_dir/SUMMARY.md from out_dir/results.json and, for each experiment it ran `then`, out_dir/<name>/."""
    path = Path(out_dir) / SUMMARY_FILE
    atomic_write_text(path, summary_markdown(*read_run(out_dir)))
    return path


MARKER = re.compile(r"(<!-- summary:(?P<name>[\w.+-]+) -->\n).*?(<!-- /summary:(?P=name) -->)", re.DOTALL)


def quote(text: str, sections: dict[str, str]) -> str:
    """`text` with every marked block replaced by the section of its name (an unknown name is an error)."""
    def fill(match: re.Match) -> str:
        name = match.group("name")
        if name not in sections:
            raise UserError(f"a summary marker names {name!r}; the run has {sorted(sections)}")
        return f"{match.group(1)}{sections[name]}\n{match.group(3)}"

    return MARKER.sub(fill, text)


def main(argv: list[str] | None = None) -> None:
    """python -m mllm_cl.summary RUN_DIR FILE...: rewrite the marked tables of FILEs from RUN_DIR's results."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        raise SystemExit("usage: python -m mllm_cl.summary RUN_DIR FILE [FILE ...]")
    sections = summary_sections(*read_run(args[0]))
    for file in map(Path, args[1:]):
        file.write_text(quote(file.read_text(), sections))
        print(f"quoted {args[0]}'s tables in {file}")


if __name__ == "__main__":
    main()
