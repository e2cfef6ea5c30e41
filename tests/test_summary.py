"""mllm_cl/summary.py: SUMMARY.md's tables, and the README's and docs' quotes of the committed demo run."""

import json
import statistics
from pathlib import Path

import pytest

import eval as eval_cli
from mllm_cl.errors import UserError
from mllm_cl.experiment import over_seeds, publish
from mllm_cl.metrics import wilson_interval
from mllm_cl.summary import (paper1_table, paper2_table, quote, read_run, summary_markdown, summary_sections,
                             write_summary)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "docs" / "demo"
QUOTING = [ROOT / "README.md", ROOT / "docs" / "paper1.md", ROOT / "docs" / "paper2.md"]


def test_the_readme_and_docs_quote_what_the_generator_writes_from_the_committed_results() -> None:
    sections = summary_sections(*read_run(DEMO))
    assert set(sections) == {"demo", "paper2"}
    for path in QUOTING:
        text = path.read_text()
        assert "<!-- summary:" in text, f"{path.name} quotes no table"
        assert quote(text, sections) == text, f"{path.name}: a quoted table differs from what summary.py writes"
    readme = QUOTING[0].read_text()
    assert all(f"<!-- summary:{name} -->\n{table}\n<!-- /summary:{name} -->" in readme
               for name, table in sections.items())
    assert (DEMO / "SUMMARY.md").read_text() == summary_markdown(*read_run(DEMO))


def test_a_stale_quote_is_caught() -> None:
    sections = summary_sections(*read_run(DEMO))
    stale = QUOTING[0].read_text().replace("| naive | ", "| naive | 1", 1)
    assert quote(stale, sections) != stale
    with pytest.raises(UserError, match="'nope'"):
        quote("<!-- summary:nope -->\nx\n<!-- /summary:nope -->", sections)


def _run(general: bool, shift: float) -> dict:
    """One seed's summary of two runs over two tasks, as summarise_run writes it (percent)."""
    def one(base: float) -> dict:
        run = {"methods": ["x"], "task_names": ["a", "b"], "acc_matrix": [[base, 10.0], [5.0 + shift, 90.0]],
               "nl_base": 80.0 + shift, "nl_after_task": [70.0, 60.0 - shift],
               "nl_delta_after_task": [10.0 + shift, 20.0 + 2 * shift], "nl_delta": 20.0 + 2 * shift,
               "vl_after_task": [base, (5.0 + shift + 90.0) / 2], "vl_hmean": 9.0}
        if general:
            run |= {"general_vl_base": 40.0, "general_vl_after_task": [30.0, 20.0 + shift],
                    "general_after_task": [35.0, 25.0 + shift]}
        return run

    results = {"name": "p2" if general else "p1", "tasks": ["a", "b"], "wall_seconds": 1.0,
               "methods": {"lora": one(50.0 + shift), "naive": one(60.0)}}
    if general:
        results["joint"] = {"run": "lora", "vl": {"a": 70.0 + shift, "b": 80.0}, "nl": 50.0,
                            "general": 30.0 + shift, "general_vl": 20.0}
        results["base"] = {"nl_omega": 80.0 + shift, "general_vl": 40.0,
                           "general_vl_by_skill": {"describe": {"acc": 60.0 + shift, "chance": 8.0, "n": 100,
                                                                "ci": [50.0, 69.0]}},
                           "zero_shot": {"a": {"acc": shift, "chance": 50.0, "n": 10, "ci": [0.0, 28.0]}}}
    return results


def _over_seeds(tmp_path: Path, general: bool, shifts: list[float]) -> dict:
    folders = {}
    for seed, shift in enumerate(shifts):
        folders[seed] = tmp_path / f"seed_{seed}"
        folders[seed].mkdir()
        (folders[seed] / "results.json").write_text(json.dumps(_run(general, shift)))
    return over_seeds("p2" if general else "p1", folders, tmp_path / "over")


def _row(table: str, name: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_paper1_table_reads_mean_and_sample_sd_over_seeds(tmp_path: Path) -> None:
    shifts = [0.0, 3.0, 9.0]
    table = paper1_table(_over_seeds(tmp_path, general=False, shifts=shifts))
    row = _row(table, "lora")

    def spread(values: list[float]) -> str:
        return f"{statistics.mean(values):.1f} +/- {statistics.stdev(values):.1f}"

    assert row[1] == " / ".join([spread([10.0 + s for s in shifts]), spread([20.0 + 2 * s for s in shifts])])
    assert row[2] == ", ".join(f"{20.0 + 2 * s:.1f}" for s in shifts)
    assert row[3] == " / ".join([spread([50.0 + s for s in shifts]), spread([90.0] * 3)])
    assert row[4] == spread([(5.0 + s + 90.0) / 2 for s in shifts])
    assert "NL omega " + spread([80.0 + s for s in shifts]) in table
    assert "seeds 0, 1, 2, mean +/- sd" in table


def test_paper2_table_has_the_general_score_and_the_joint_run(tmp_path: Path) -> None:
    shifts = [0.0, 4.0]
    results = _over_seeds(tmp_path, general=True, shifts=shifts)
    sections = summary_sections(results)
    assert sections == {"p2": paper2_table(results)}
    row = _row(sections["p2"], "naive")
    assert row[2] == f"{statistics.mean([20.0, 24.0]):.1f} +/- {statistics.stdev([20.0, 24.0]):.1f}"
    assert row[5] == f"7.0 +/- {statistics.stdev([5.0, 9.0]):.1f} / 90.0 +/- 0.0"
    joint = _row(sections["p2"], "joint (lora, all tasks at once)")
    assert joint[3] == f"32.0 +/- {statistics.stdev([30.0, 34.0]):.1f}"
    assert joint[5] == f"72.0 +/- {statistics.stdev([70.0, 74.0]):.1f} / 80.0 +/- 0.0"
    sd = f"{statistics.stdev([0.0, 4.0]):.1f}"  # the starting point's skills and zero-shot row, over seeds
    assert f"general VL 40.0 +/- 0.0 (describe 62.0 +/- {sd} (chance 8.0)); zero-shot a 2.0 +/- {sd} (chance 50.0)" \
        in sections["p2"]
    # Wilson's interval over both seeds' answers: 0 and 4% of 10 questions are 0 right answers of 20
    assert results["base"]["zero_shot"]["a"]["ci"] == pytest.approx(list(wilson_interval(0, 20)))


def test_one_seed_reads_plain_numbers() -> None:
    table = paper1_table(_run(general=False, shift=0.0))
    assert "+/-" not in table and "per seed" not in table and "one seed" in table
    assert _row(table, "naive")[1:] == ["10.0 / 20.0", "60.0 / 90.0", "47.5"]
    results = _run(general=True, shift=0.0)
    results["methods"]["lora"]["nl_delta_after_task"] = [-0.04, 0.0]
    assert _row(paper2_table(results), "lora")[1] == "0.0 / 0.0"  # not "-0.0"


def test_an_experiment_writes_its_summary_and_eval_rewrites_it(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    publish(_run(general=False, shift=0.0), out, None)
    assert (out / "SUMMARY.md").read_text() == summary_markdown(_run(general=False, shift=0.0))
    (out / "SUMMARY.md").unlink()
    assert eval_cli.main(["--summary", str(out)]) == 0
    assert (out / "SUMMARY.md").is_file() and "wrote" in capsys.readouterr().out


def test_bad_results_are_named(tmp_path: Path, capsys) -> None:
    assert eval_cli.main(["--summary", str(tmp_path)]) != 0
    assert f"{tmp_path / 'results.json'} does not exist" in capsys.readouterr().err
    (tmp_path / "results.json").write_text(json.dumps({"name": "x", "tasks": [], "methods": {"m": {}}}))
    with pytest.raises(UserError, match="run 'm' has no acc_matrix"):
        write_summary(tmp_path)
    (tmp_path / "results.json").write_text("[1]")
    with pytest.raises(UserError, match="must hold an experiment's results"):
        write_summary(tmp_path)
