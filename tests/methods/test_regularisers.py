import torch

from mllm_cl.config import IGNORE_INDEX
from mllm_cl.methods.ewc import ewc_penalty
from mllm_cl.methods.lwf import distillation_kl
from mllm_cl.methods.uir import hidden_state_distance


def test_ewc_penalty_zero_at_anchor_positive_away_and_weighted_by_fisher() -> None:
    anchor = {"w": torch.randn(3, 3)}
    fisher = {"w": torch.rand(3, 3)}
    assert ewc_penalty({"w": anchor["w"].clone()}, fisher, anchor) == 0
    moved = {"w": anchor["w"] + 0.5}
    assert torch.isclose(ewc_penalty(moved, fisher, anchor), (fisher["w"] * 0.25).sum())


def test_lwf_zero_for_equal_models_and_positive_otherwise() -> None:
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    labels[0, 1] = IGNORE_INDEX
    assert distillation_kl(logits, logits.clone(), labels, 2.0).abs() < 1e-6
    assert distillation_kl(logits, torch.randn(2, 5, 7), labels, 2.0) > 0


def test_uir_distance_ignores_padding_and_matches_mse() -> None:
    current, previous = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    expected = torch.cat([(current[0, :3] - previous[0, :3]), (current[1, :2] - previous[1, :2])]).pow(2).mean()
    assert torch.isclose(hidden_state_distance(current, previous, mask), expected)
    previous[0, 3] += 100.0  # a padding position must not count
    assert torch.isclose(hidden_state_distance(current, previous, mask), expected)
