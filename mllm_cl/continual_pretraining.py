"""Paper 2's continual-pretraining setting (LLaVA-c, Liu et al. 2025, section 4 and Tables 2-3).

LLaVA-c's second setting starts from the aligned model (LLaVA-1.5 before visual instruction tuning) and learns the
instruction mix (LLaVA-665k) one part at a time, in the order tqa, coco, ocr, textvqa, gqa, vg, the text-only part
first; the score is the general benchmarks after each part, set beside the mix learned at once (multitask).

Here the mix is the world's general mix (general/train.json, `mllm_cl.synthetic.world`), whose record ids name
their part ("general-<part>-<n>"): each general-VL skill ("describe", "pair") is one task, and the text-only parts
(sentence answers and documents) are one "language" task, first like tqa. The mix learned at once is the
`finetune` stage, trained from the same aligned model on the same records.

No task has a test of its own, as in the paper: a task's accuracy is the sub-skill it teaches, measured by the
general evaluation after every task: its general-VL test for a VL skill, NL omega for "language". The accuracy
matrix is then the sub-skill matrix, so the CL libraries' figures (`metrics.sequence_metrics`) read as usual, FWT
against the aligned model's skills.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mllm_cl import distributed, metrics
from mllm_cl.config import StageError, TaskSpec
from mllm_cl.model_folder import atomic_write_text

PROTOCOL = "paper2-pretrain"
LANGUAGE = "language"  # the text-only parts of the mix, learned as one task
GENERAL_PREFIX = "general_"  # a general-VL test's name: general_<skill>


def split_mix(general_file: str | Path, skills: list[str], image_folder: str, folder: Path) -> list[TaskSpec]:
    """The general mix as tasks: "language" (its text-only records) then one task per VL skill, in `skills`'
    order, each written to folder/<task>/train.json (test-less: the general evaluation scores them)."""
    records = json.loads(Path(general_file).read_text())
    parts: dict[str, list[dict[str, Any]]] = {LANGUAGE: [], **{skill: [] for skill in skills}}
    for index, record in enumerate(records):
        part = str(record.get("id", "")).split("-")
        if len(part) < 3 or part[0] != "general":
            raise StageError(f"{general_file}: record {index} has id {record.get('id')!r}, not general-<part>-<n>; "
                             "protocol paper2-pretrain splits the world's general mix by its ids: give a mix of "
                             "another origin as `tasks` instead")
        parts[part[1] if part[1] in skills else LANGUAGE].append(record)
    empty = [name for name, part in parts.items() if not part]
    if empty:
        raise StageError(f"{general_file} has no records of the part(s) {empty}: nothing to learn there")
    tasks = []
    for name, part in parts.items():
        path = folder / name / "train.json"
        distributed.on_main(lambda path=path, part=part: (path.parent.mkdir(parents=True, exist_ok=True),
                                                          atomic_write_text(path, json.dumps(part) + "\n")))
        tasks.append(TaskSpec(name=name, train=str(path), image_folder=image_folder))
    return tasks


def skill_score(scores: dict[str, Any], task: str) -> float:
    """The sub-skill task `task` teaches, in percent, from one evaluation: NL omega for "language", else its
    general-VL test's accuracy."""
    if task == LANGUAGE:
        return metrics.nl_omega({name: 100.0 * m["acc"] for name, m in scores["nl"].items()})
    return 100.0 * skill_metrics(scores, task)["acc"]


def skill_metrics(scores: dict[str, Any], task: str) -> dict[str, Any]:
    """The general-VL test's metrics (acc, n) of a VL skill task."""
    test = GENERAL_PREFIX + task
    if test not in scores.get("general_vl", {}):
        raise StageError(f"task {task!r} of protocol paper2-pretrain has no general-VL test {test!r} to score it; "
                         f"the evaluation has {sorted(scores.get('general_vl', {}))}")
    return scores["general_vl"][test]
