"""Paper 2's alpha curves: the consolidations along alpha, the general score and the two regions."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mllm_cl import alpha_curves as alpha_curves_module
from mllm_cl.alpha_curves import (CONSOLIDATIONS, consolidated, curves_over_seeds, general_score, regions,
                                  width_vs_modelmix)
from mllm_cl.report import FIGURE_SIZE, line_figure, sd_band, write_report
from mllm_cl.spectral import decompose_updates


def test_regions_follow_their_rules_on_hand_made_curves() -> None:
    alphas = [0.0, 0.5, 1.0]
    # general stays >= 95% of 90 = 85.5 up to alpha 0.5; the task reaches 90% of 60 = 54 only at alpha 1
    assert regions(alphas, [90.0, 86.0, 80.0], [0.0, 50.0, 60.0], 90.0) == {"alpha_G": 0.5, "alpha_T": 1.0}
    # "stays": a dip ends the region even if the curve recovers; 54 is reached at 0.5 exactly
    assert regions(alphas, [90.0, 80.0, 89.0], [0.0, 54.0, 60.0], 90.0) == {"alpha_G": 0.0, "alpha_T": 0.5}
    # below 95% already at alpha 0 (the base's own score is measured apart)
    assert regions(alphas, [80.0, 80.0, 80.0], [10.0, 10.0, 10.0], 90.0) == {"alpha_G": None, "alpha_T": 0.0}


def test_general_score_is_the_harmonic_mean_of_nl_omega_and_general_vl() -> None:
    scores = {"nl": {"a": {"acc": 0.8}, "b": {"acc": 0.4}},
              "general_vl": {"x": {"acc": 0.5, "n": 100}, "y": {"acc": 0.7, "n": 300}}}
    general, nl, vl = general_score(scores)
    assert nl == pytest.approx(2 / (1 / 80 + 1 / 40))  # 53.33
    assert vl == pytest.approx(65.0)  # pooled over the 400 questions
    assert general == pytest.approx(2 / (1 / nl + 1 / vl))


def test_every_consolidation_spans_the_old_and_the_new_model() -> None:
    generator = torch.Generator().manual_seed(0)
    old = {"w": torch.randn(6, 4, generator=generator, dtype=torch.float64),
           "b": torch.randn(4, generator=generator, dtype=torch.float64)}
    new = {k: v + 0.1 * torch.randn(v.shape, generator=generator, dtype=torch.float64) for k, v in old.items()}
    points = list(consolidated(old, new, (0.0, 0.5, 1.0)))
    assert [(c, a) for c, a, _ in points] == [(c, a) for a in (0.0, 0.5, 1.0)
                                              for c in ("modelmix", "sac-top", "sac-nuclear")]
    for consolidation, alpha, weights in points:
        if alpha in (0.0, 1.0):  # every consolidation is the old model at 0 and the new one at 1
            for key in old:
                torch.testing.assert_close(weights[key], old[key] if alpha == 0.0 else new[key])
        if consolidation == "modelmix" and alpha == 0.5:
            torch.testing.assert_close(weights["w"], (old["w"] + new["w"]) / 2)
        if consolidation.startswith("sac") and alpha == 0.5:  # a vector has no spectrum: ModelMix
            torch.testing.assert_close(weights["b"], (old["b"] + new["b"]) / 2)
            singular = torch.linalg.svdvals(weights["w"] - old["w"])
            full = torch.linalg.svdvals(new["w"] - old["w"])
            assert bool((singular <= full + 1e-12).all())  # SAC only shrinks the update's singular values


def test_curves_over_seeds_average_the_curves_and_keep_each_seeds_regions(tmp_path) -> None:
    def seed(general: list[float], task: list[float], base: float) -> dict:
        curve = {"alpha": [0.0, 0.5, 1.0], "general": general, "task": task, "nl": general, "general_vl": general}
        return {"task": "color", "base_general": base, "rules": {"alpha_G": "g", "alpha_T": "t"},
                "runs": {"vanilla/modelmix": curve},
                "regions": {"vanilla/modelmix": regions(curve["alpha"], general, task, base)}}

    one, two = seed([30.0, 29.0, 0.0], [0.0, 55.0, 60.0], 30.0), seed([32.0, 20.0, 2.0], [0.0, 10.0, 60.0], 32.0)
    mean = curves_over_seeds([one, two])
    curve = mean["runs"]["vanilla/modelmix"]
    assert curve["general"] == [31.0, 24.5, 1.0] and curve["task"] == [0.0, 32.5, 60.0]
    assert curve["task_sd"] == pytest.approx([0.0, 45.0 / 2 ** 0.5, 0.0])
    assert mean["base_general"] == 31.0 and mean["seeds"] == 2
    assert mean["regions_per_seed"]["vanilla/modelmix"] == [{"alpha_G": 0.5, "alpha_T": 0.5},
                                                            {"alpha_G": 0.0, "alpha_T": 1.0}]
    assert mean["regions"]["vanilla/modelmix"] == {"alpha_G": 0.0, "alpha_T": 1.0}  # the mean curve's own
    report = write_report({"methods": {"lora": {"nl_delta": 1.0}}}, tmp_path, alpha_curves=mean).read_text()
    assert "| vanilla/modelmix | 0.0 | 0.5, 0.0 | 1.0 | 0.5, 1.0 |" in report and "mean over 2 seeds" in report


def test_the_report_says_whether_a_rule_widens_the_region_or_only_shifts_it(tmp_path) -> None:
    curve = {"alpha": [0.0, 1.0], "general": [30.0, 0.0], "task": [0.0, 70.0]}
    found = {"modelmix": (0.1, 0.7), "sac-top": (0.3, 0.7), "sac-nuclear": (0.2, 0.9)}
    curves = {"task": "color", "base_general": 30.0, "rules": {"alpha_G": "g", "alpha_T": "t"},
              "runs": {f"vanilla/{name}": curve for name in found},
              "regions": {f"vanilla/{name}": {"alpha_G": g, "alpha_T": t} for name, (g, t) in found.items()}}
    report = write_report({"methods": {"lora": {"nl_delta": 1.0}}}, tmp_path, alpha_curves=curves).read_text()
    assert ("* vanilla: sac-top: alpha_G 0.1 -> 0.3, alpha_T 0.7 -> 0.7: widens the region; sac-nuclear: alpha_G "
            "0.1 -> 0.2, alpha_T 0.7 -> 0.9: narrows it.") in report


def seed_with(widths: dict[str, tuple[float | None, float | None]], spectrum_k: float) -> dict:
    """One seed's alpha_curves.json with the given (alpha_G, alpha_T) per vanilla run and one spectrum entry."""
    curve = {"alpha": [0.0, 1.0], "general": [30.0, 0.0], "task": [0.0, 70.0], "nl": [30.0, 0.0],
             "general_vl": [30.0, 0.0]}
    kind = {"matrices": 4, "shape": [384, 128], "k_mean": spectrum_k, "k_min": 1, "k_max": 5, "rank_mean": 8.0}
    return {"task": "color", "base_general": 30.0, "rules": {"alpha_G": "g", "alpha_T": "t", "k": "the fewest"},
            "runs": {f"vanilla/{name}": curve for name in widths},
            "regions": {f"vanilla/{name}": {"alpha_G": g, "alpha_T": t} for name, (g, t) in widths.items()},
            "spectra": {"vanilla": {"llm.blocks.*.attn.qkv.weight": kind}}}


def test_region_widths_are_paired_by_seed_against_modelmix(tmp_path) -> None:
    seeds = [seed_with({"modelmix": (0.2, 0.6), "sac-top": (0.4, 0.6), "sac-nuclear": (0.2, 0.7)}, 2.0),
             seed_with({"modelmix": (0.1, 0.6), "sac-top": (0.4, 0.5), "sac-nuclear": (None, 0.7)}, 3.0),
             seed_with({"modelmix": (0.3, 0.6), "sac-top": (0.3, 0.6), "sac-nuclear": (0.3, 0.8)}, 4.0)]
    mean = curves_over_seeds(seeds)
    # widths: modelmix -0.4, -0.5, -0.3; sac-top -0.2, -0.1, -0.3; sac-nuclear -0.5, none, -0.5
    top, nuclear = mean["width_vs_modelmix"]["vanilla"]["sac-top"], mean["width_vs_modelmix"]["vanilla"]["sac-nuclear"]
    assert top["per_seed"] == pytest.approx([0.2, 0.4, 0.0]) and top["n"] == 3
    assert top["mean"] == pytest.approx(0.2) and top["sd"] == pytest.approx(0.2)
    assert nuclear["per_seed"][1] is None and nuclear["per_seed"][0] == pytest.approx(-0.1)
    assert nuclear["mean"] == pytest.approx(-0.15) and nuclear["sd"] == pytest.approx(0.05 * 2 ** 0.5)
    assert nuclear["n"] == 2
    assert width_vs_modelmix({"a/modelmix": [{"alpha_G": 0.5, "alpha_T": 0.1}],
                              "a/sac-top": [{"alpha_G": 0.6, "alpha_T": 0.1}]}) == \
        {"a": {"sac-top": {"per_seed": [pytest.approx(0.1)], "mean": pytest.approx(0.1), "sd": None, "n": 1}}}
    assert width_vs_modelmix({"b/sac-top": [{"alpha_G": 0.6, "alpha_T": 0.1}]}) == {}  # no ModelMix to pair with
    assert mean["spectra_per_seed"]["vanilla"][2]["llm.blocks.*.attn.qkv.weight"]["k_mean"] == 4.0
    json.dumps(mean)  # alpha_curves.json stays plain JSON
    report = write_report({"methods": {"lora": {"nl_delta": 1.0}}}, tmp_path, alpha_curves=mean).read_text()
    assert "a positive difference means the rule widens the general-stable region against ModelMix" in report
    assert "| vanilla | sac-top | +0.20, +0.40, +0.00 | +0.20 +/- 0.20 | 3 |" in report
    assert "| vanilla | sac-nuclear | -0.10, none, -0.20 | -0.15 +/- 0.07 | 2 |" in report
    assert "| vanilla | llm.blocks.*.attn.qkv.weight | 384 x 128 | 4 | 3.00 | 1-5 | 8.00 |" in report
    assert "k: the fewest; mean over a type's matrices (every layer) and 3 seeds" in report


def test_old_seed_files_without_spectra_still_combine() -> None:
    seeds = [seed_with({"modelmix": (0.2, 0.6)}, 2.0), seed_with({"modelmix": (0.2, 0.6)}, 2.0)]
    del seeds[1]["spectra"]
    mean = curves_over_seeds(seeds)
    assert "spectra_per_seed" not in mean and mean["width_vs_modelmix"] == {}


def test_sd_band_is_mean_plus_minus_sd_clipped_to_the_score_range() -> None:
    low, high = sd_band([50.0, 5.0, 98.0, 40.0], [10.0, 8.0, 4.0, 0.0])
    assert low == [40.0, 0.0, 94.0, 40.0] and high == [60.0, 13.0, 100.0, 40.0]
    assert sd_band([50.0], [float("nan")]) == ([50.0], [50.0])
    assert sd_band([50.0, 60.0], None) is None  # one seed: no band
    assert sd_band([0.5], [1.0], low=0.0, high=1.0) == ([0.0], [1.0])


def test_alpha_plots_tint_a_band_under_each_mean_curve(tmp_path) -> None:
    tint = (202, 223, 237)  # PALETTE[0] over white at BAND_OPACITY

    def tinted(image) -> int:
        pixels = np.asarray(image).reshape(-1, 3).astype(int)
        return int((np.abs(pixels - tint).max(axis=1) <= 2).sum())

    series, labels = {"vanilla/modelmix": [50.0, 40.0, 30.0]}, ["0.0", "0.5", "1.0"]
    plain = line_figure(series, labels, "t", "y", xlabel="alpha")
    banded = line_figure(series, labels, "t", "y", xlabel="alpha",
                         bands={"vanilla/modelmix": sd_band(series["vanilla/modelmix"], [10.0, 10.0, 10.0])})
    assert tinted(plain) == 0 and tinted(banded) > 10_000  # 20 points of a ~40-point axis, across the plot
    under_axis = (slice(FIGURE_SIZE[1] - 50, FIGURE_SIZE[1]), slice(0, FIGURE_SIZE[0]))
    default = line_figure(series, labels, "t", "y")
    assert not np.array_equal(np.asarray(plain)[under_axis], np.asarray(default)[under_axis])  # "alpha" there
    seeds = [seed_with({"modelmix": (0.2, 0.6)}, 2.0), seed_with({"modelmix": (0.2, 0.6)}, 2.0)]
    seeds[1]["runs"] = {"vanilla/modelmix": {**seeds[0]["runs"]["vanilla/modelmix"], "general": [20.0, 10.0]}}
    write_report({"methods": {"lora": {"nl_delta": 1.0}}}, tmp_path, alpha_curves=curves_over_seeds(seeds))
    with Image.open(tmp_path / "alpha_general.png") as general, Image.open(tmp_path / "alpha_task.png") as task:
        assert tinted(general) > 1000 and tinted(task) == 0  # the task curves agree over the seeds: sd 0


def test_given_spectra_serve_the_consolidations_and_every_models_spectrum_is_kept(monkeypatch, tmp_path) -> None:
    generator = torch.Generator().manual_seed(1)
    old = {"w": torch.randn(6, 4, generator=generator, dtype=torch.float64)}
    new = {"w": old["w"] + 0.1 * torch.randn(6, 4, generator=generator, dtype=torch.float64)}
    given = list(consolidated(old, new, (0.5,), decompose_updates(old, new, device="cpu")))
    for (c, a, weights), (c2, a2, again) in zip(given, consolidated(old, new, (0.5,))):
        assert (c, a) == (c2, a2)
        torch.testing.assert_close(weights["w"], again["w"])

    def fake_model_curves(cfg, name, folder, alphas, device) -> dict:
        curve = {"alpha": list(alphas), "general": [30.0, 0.0], "task": [0.0, 60.0], "nl": [30.0, 0.0],
                 "general_vl": [30.0, 0.0]}
        return {"base_general": 30.0, "runs": {f"{name}/{c}": curve for c in CONSOLIDATIONS},
                "spectrum": {"llm.blocks.*.mlp.fc.weight": {"k_mean": float(len(name))}}}

    monkeypatch.setattr(alpha_curves_module, "model_curves", fake_model_curves)
    cfg = SimpleNamespace(tasks=[SimpleNamespace(name="color")], eval=SimpleNamespace(general_vl=["x"]),
                          out_dir=str(tmp_path))
    curves = alpha_curves_module.alpha_curves(cfg, {"vanilla": "a", "uir": "b"}, (0.0, 1.0))
    assert curves["spectra"] == {"vanilla": {"llm.blocks.*.mlp.fc.weight": {"k_mean": 7.0}},
                                 "uir": {"llm.blocks.*.mlp.fc.weight": {"k_mean": 3.0}}}
    assert "90%" in curves["rules"]["k"]


def test_a_models_curves_drawn_by_several_jobs_join_into_the_curves_one_job_draws(monkeypatch, tmp_path) -> None:
    def fake_model_curves(cfg, name, folder, alphas, device) -> dict:
        curve = {"alpha": list(alphas), "general": [40.0 - 30 * a for a in alphas], "task": [60.0 * a for a in alphas],
                 "nl": [50.0 - a for a in alphas], "general_vl": [30.0 - a for a in alphas]}
        return {"base_general": 40.0 if 0.0 in alphas else None, "runs": {f"{name}/{c}": curve for c in CONSOLIDATIONS},
                "spectrum": {"w": {"k_mean": 2.0}}}

    monkeypatch.setattr(alpha_curves_module, "model_curves", fake_model_curves)
    cfg = SimpleNamespace(tasks=[SimpleNamespace(name="color")], eval=SimpleNamespace(general_vl=["x"]),
                          out_dir=str(tmp_path))
    alphas = tuple(round(0.1 * i, 1) for i in range(11))

    def drawn(pieces: int) -> dict:
        jobs = alpha_curves_module.curve_jobs(cfg, {"vanilla": "a"}, alphas, pieces=pieces)["vanilla"]
        assert len(jobs) == pieces and sorted(a for job in jobs for a in job.args[3]) == list(alphas)
        assert len({job.log for job in jobs}) == pieces  # each job its own log
        results = [job.fn(*job.args) for job in reversed(jobs)]  # in any order
        return alpha_curves_module.combine_curves("color", {"vanilla": results})

    one = drawn(1)
    assert one["runs"]["vanilla/modelmix"]["alpha"] == list(alphas) and one["base_general"] == 40.0
    assert drawn(3) == one and drawn(2) == one
