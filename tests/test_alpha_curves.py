"""Paper 2's alpha curves: the consolidations along alpha, the general score and the two regions."""

import pytest
import torch

from mllm_cl.alpha_curves import consolidated, curves_over_seeds, general_score, regions
from mllm_cl.report import write_report


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
