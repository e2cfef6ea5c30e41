"""Paper 2's alpha curves: the consolidations along alpha, the general score and the two regions."""

import pytest
import torch

from mllm_cl.alpha_curves import consolidated, general_score, regions


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
