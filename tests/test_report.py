"""REPORT.md and its PNG plots from a small fake results dict."""

import json

import numpy as np
import pytest
from PIL import Image

from mllm_cl.report import FIGURE_SIZE, ReportInputError, heatmap_figure, load_results, write_report

RESULTS = {"methods": {
    "naive": {"nl_delta": 7.83, "vl_hmean": 5.29, "acc_matrix": [[80, 30], [60, 90]], "zero_shot": [10, 20],
              "task_names": ["easy_vqa", "colour_qa"], "nl_after_task": [30.1, 24.8], "vl_after_task": [40, 55]},
    "soft targets": {"nl_delta": -0.5, "vl_hmean": 10.57, "acc_matrix": [[78, None], [75, 88]],
                     "task_names": ["easy_vqa", "colour_qa"], "nl_after_task": [32.0, 29.8]},
}}


def test_report_renders_tables_and_plots(tmp_path):
    report = write_report(RESULTS, tmp_path)
    text = report.read_text()
    # final avg (60+90)/2, mean acc (80+60+90)/3, BWT 60-80, FWT 30-20, forgetting 20
    assert "| naive | 7.83 | 5.29 | 75.00 | 76.67 | -20.00 | 10.00 | 20.00 |" in text
    assert "| soft targets | -0.50 | 10.57 | 81.50 | 80.33 | -3.00 | - | 3.00 |" in text  # no zero-shot row: no FWT
    assert "| after colour_qa | 60.00 | 90.00 |" in text
    assert "| naive | 30.10 | 24.80 |" in text and "| soft targets | 32.00 | 29.80 |" in text
    expected = ["nl_delta.png", "vl_hmean.png", "nl_after_task.png", "vl_after_task.png", "acc_matrix_naive.png",
                "acc_matrix_soft_targets.png"]
    for name in expected:
        assert f"({name})" in text
        with Image.open(tmp_path / name) as image:
            assert image.size == FIGURE_SIZE == (800, 520)
            assert image.mode == "RGB"
            assert len(image.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 10  # not a blank canvas


def test_heatmap_colours_follow_the_values():
    image = np.asarray(heatmap_figure(np.array([[0.0, np.nan], [50.0, 100.0]]), ["a", "b"], "t"))
    size, cell = 2, 120
    left = (FIGURE_SIZE[0] - size * cell - 290) // 2 + 170

    def corner(k, j):  # a pixel near the top-left of cell [k][j]
        return image[60 + k * cell + 5, left + j * cell + 5]

    assert corner(0, 0).astype(int).sum() < corner(1, 0).astype(int).sum() < corner(1, 1).astype(int).sum()
    assert tuple(corner(0, 1)) == (238, 238, 238)  # not measured: grey


def test_results_from_files_and_run_folders(tmp_path):
    (tmp_path / "run_a").mkdir()
    (tmp_path / "run_a" / "results.json").write_text(json.dumps({"method": "lora", "nl_delta": 1.69}))
    (tmp_path / "b.json").write_text(json.dumps(RESULTS))
    methods = load_results([tmp_path / "run_a", tmp_path / "b.json"])
    assert list(methods) == ["lora", "naive", "soft targets"]
    assert methods["lora"] == {"nl_delta": 1.69}
    assert write_report([tmp_path / "run_a"], tmp_path / "out").is_file()


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ReportInputError, match=r"method 'x', nl_delta: expected a number"):
        load_results({"methods": {"x": {"nl_delta": "high"}}})
    with pytest.raises(ReportInputError, match=r"none of the report's fields .* \['acc'\]"):
        load_results({"methods": {"x": {"acc": 1}}})
    assert load_results({"methods": {"x": {"nl_delta": 1.0, "steps": 30}}}) == {"x": {"nl_delta": 1.0}}
    assert load_results({"methods": {"x": {"nl_delta": 1.0, "bwt": -3.0, "fwt": None}}}) == \
        {"x": {"nl_delta": 1.0, "bwt": -3.0}}  # null: undefined for one task
    with pytest.raises(ReportInputError, match="3 task_names for a 2 x 2"):
        load_results({"methods": {"x": {"acc_matrix": [[1, None], [2, 3]], "task_names": ["a", "b", "c"]}}})
    with pytest.raises(ReportInputError, match="results.json"):
        load_results([tmp_path / "nowhere.json"])


def test_intervals_and_the_nlu_nlg_split_are_reported(tmp_path) -> None:
    method = {"nl_delta": 7.83, "nl_delta_ci": [3.1, 12.04], "vl_hmean": 5.0, "acc_matrix": [[70.0]],
              "acc_matrix_ci": [[[61.2, 77.5]]], "task_names": ["color"], "nlu_base": 95.0, "nlg_base": 86.5,
              "nlu_after_task": [54.6], "nlg_after_task": [3.5]}
    report = write_report({"methods": {"naive": method}}, tmp_path).read_text()
    assert "| naive | 7.83 [3.1, 12.0] |" in report
    assert "| naive | 95.00 | 54.60 | 86.50 | 3.50 |" in report and "| naive | 70.00 [61.2, 77.5] |" in report
    with pytest.raises(ReportInputError, match=r"nl_delta_ci: expected an interval \[low, high\]"):
        write_report({"methods": {"naive": {**method, "nl_delta_ci": [1.0]}}}, tmp_path)


def test_the_starting_point_is_read_against_chance(tmp_path) -> None:
    # A general skill counts when >= chance + 30, a task is new when its zero-shot accuracy is <= chance + 15.
    base = {"nl_omega": 90.0, "general_vl": 60.0,
            "general_vl_by_skill": {"describe": {"acc": 88.0, "chance": 9.0, "n": 100, "ci": [80.2, 93.0]},
                                    "pair": {"acc": 33.0, "chance": 4.0, "n": 100, "ci": [24.6, 42.7]}},
            "zero_shot": {"color": {"acc": 31.5, "chance": 17.0, "n": 200, "ci": [25.5, 38.2]},
                          "size": {"acc": 65.0, "chance": 50.0, "n": 200, "ci": [58.2, 71.3]}}}
    text = write_report({**RESULTS, "base": base}, tmp_path).read_text()
    assert "NL omega 90.00, general VL 60.00" in text
    assert "| general VL: describe | 88.00 [80.20, 93.00] | 9.00 | 100 | >= 39.00 | yes |" in text
    assert "| general VL: pair | 33.00 [24.60, 42.70] | 4.00 | 100 | >= 34.00 | no |" in text
    assert "| zero-shot: color | 31.50 [25.50, 38.20] | 17.00 | 200 | <= 32.00 | yes |" in text
    assert "| zero-shot: size | 65.00 [58.20, 71.30] | 50.00 | 200 | <= 65.00 | yes |" in text
    over = {**base, "nl_omega_sd": 1.0, "general_vl_sd": 2.0, "aligned_nl_omega": 86.0, "aligned_nl_omega_sd": 0.5,
            "zero_shot": {"size": {**base["zero_shot"]["size"], "acc_sd": 1.5, "acc_per_seed": [64.0, 66.0]}},
            "general_vl_by_skill": {}}
    text = write_report({**RESULTS, "base": over}, tmp_path).read_text()
    assert "NL omega 90.00 +/- 1.00 (the aligned model's: 86.00 +/- 0.50;" in text
    assert "| zero-shot: size | 65.00 +/- 1.50 (64.00, 66.00) [58.20" in text


def test_the_final_table_and_continual_pretraining_carry_the_seeds_spread(tmp_path) -> None:
    run = {"nl_delta": 1.0, "vl_hmean": 50.0, "task_names": ["language", "describe"],
           "acc_matrix": [[90.0, 0.0], [80.0, 70.0]], "acc_matrix_sd": [[1.0, 0.0], [2.0, 3.0]],
           "general_after_task": [0.2, 74.0], "general_after_task_sd": [0.0, 4.0]}
    joint = {"run": "finetune", "vl": {"language": 92.0, "describe": 86.0}, "general": 88.0,
             "per_seed": [{"vl": {"language": 91.0, "describe": 85.0}, "general": 87.0},
                          {"vl": {"language": 93.0, "describe": 87.0}, "general": 89.0}]}
    results = {"methods": {"uir": run}, "ablation": ["uir"], "joint": joint, "protocol": "paper2-pretrain"}
    text = write_report(results, tmp_path).read_text()
    sd = f"{np.std([91.0, 93.0], ddof=1):.2f}"  # 1.41
    assert "| uir | 74.00 +/- 4.00 | 80.00 +/- 2.00 | 70.00 +/- 3.00 |" in text  # the final table
    assert f"| joint (finetune, all tasks at once) | 88.00 +/- {sd} | 92.00 +/- {sd} | 86.00 +/- {sd} |" in text
    assert "| uir | after language | 0.20 +/- 0.00 | 90.00 +/- 1.00 | 0.00 +/- 0.00 |" in text  # part by part
    assert "|  | after describe | 74.00 +/- 4.00 | 80.00 +/- 2.00 | 70.00 +/- 3.00 |" in text
    assert f"| the mix at once (finetune) | all parts | 88.00 +/- {sd} |" in text
    assert "## Continual pretraining" not in write_report({**results, "protocol": "paper2"}, tmp_path).read_text()
