import pytest
import torch
import torch.nn.functional as F

from mllm_cl.config import IGNORE_INDEX
from mllm_cl.losses import NoSupervisedTokensError, causal_lm_loss


def _batch(vocab: int = 11):
    logits = torch.randn(2, 6, vocab, dtype=torch.float64)
    labels = torch.randint(0, vocab, (2, 6))
    labels[0, :3] = IGNORE_INDEX
    labels[1, 5] = IGNORE_INDEX
    return logits, labels


def _reference(logits, labels, smoothing):
    flat_logits = logits[:, :-1].reshape(-1, logits.size(-1))
    flat_labels = labels[:, 1:].reshape(-1)
    keep = flat_labels != IGNORE_INDEX
    return F.cross_entropy(flat_logits[keep], flat_labels[keep], label_smoothing=smoothing)


def test_plain_loss_is_cross_entropy_over_supervised_tokens() -> None:
    logits, labels = _batch()
    assert torch.allclose(causal_lm_loss(logits, labels), _reference(logits.float(), labels, 0.0), atol=1e-6)


@pytest.mark.parametrize("a", [0.1, 0.01, 0.001])
def test_soft_targets_equal_label_smoothing_a_n_over_n_minus_1(a: float) -> None:
    logits, labels = _batch()
    n = logits.size(-1)
    expected = _reference(logits.float(), labels, a * n / (n - 1))
    assert torch.allclose(causal_lm_loss(logits, labels, soft_target_a=a), expected, atol=1e-6)


def test_soft_targets_at_zero_is_plain_cross_entropy() -> None:
    logits, labels = _batch()
    assert torch.equal(causal_lm_loss(logits, labels, 0.0), causal_lm_loss(logits, labels))


def test_all_ignored_labels_raise() -> None:
    logits, labels = _batch()
    with pytest.raises(NoSupervisedTokensError):
        causal_lm_loss(logits, torch.full_like(labels, IGNORE_INDEX))
