import pytest
import torch
import torch.nn.functional as F

from mllm_cl.config import IGNORE_INDEX
from mllm_cl.losses import NoSupervisedTokensError, causal_lm_loss, head_cross_entropy
from mllm_cl.methods.soft_targets import soft_target_term


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
    soft = causal_lm_loss(logits, labels) + soft_target_term(logits, labels, a)
    assert torch.allclose(soft, expected, atol=1e-6)


def test_soft_targets_at_zero_is_plain_cross_entropy() -> None:
    logits, labels = _batch()
    assert soft_target_term(logits, labels, 0.0) == 0.0


def test_all_ignored_labels_raise() -> None:
    logits, labels = _batch()
    with pytest.raises(NoSupervisedTokensError):
        causal_lm_loss(logits, torch.full_like(labels, IGNORE_INDEX))


def _head_case(rows_ignored: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16)
    weight = torch.randn(29, 16) * 0.3
    labels = torch.randint(0, 29, (3, 7))
    if rows_ignored:
        labels[0, :4] = IGNORE_INDEX  # a prompt
        labels[2, 5:] = IGNORE_INDEX  # right padding
    return hidden, weight, labels


@pytest.mark.parametrize("chunk_elements", [29, 29 * 4, 2 ** 27])  # one row, uneven chunks, one chunk
def test_head_cross_entropy_matches_plain_loss_and_its_gradients(chunk_elements: int) -> None:
    hidden, weight, labels = _head_case()
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    reference = causal_lm_loss(h1 @ w1.T, labels)
    (reference * 3.0).backward()  # a non-unit incoming gradient is passed through
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    fused = head_cross_entropy(h2, w2, labels, chunk_elements=chunk_elements)
    (fused * 3.0).backward()
    torch.testing.assert_close(fused, reference)
    torch.testing.assert_close(h2.grad, h1.grad)
    torch.testing.assert_close(w2.grad, w1.grad)
    assert (h2.grad[0, :3] == 0).all()  # rows whose next token is ignored get no gradient


def test_head_cross_entropy_with_a_frozen_head_and_a_tied_embedding() -> None:
    hidden, weight, labels = _head_case()
    h = hidden.clone().requires_grad_()
    head_cross_entropy(h, weight, labels).backward()  # frozen weight: only the hidden grad is computed
    h_ref = hidden.clone().requires_grad_()
    causal_lm_loss(h_ref @ weight.T, labels).backward()
    torch.testing.assert_close(h.grad, h_ref.grad)
    # tied: the same weight also embeds the inputs, and both uses add up in its grad
    ids = torch.randint(0, 29, (3, 7))
    grads = []
    for fused in (False, True):
        w = weight.clone().requires_grad_()
        x = torch.nn.functional.embedding(ids, w) + hidden
        loss = head_cross_entropy(x, w, labels) if fused else causal_lm_loss(x @ w.T, labels)
        loss.backward()
        grads.append(w.grad)
    torch.testing.assert_close(grads[1], grads[0])


def test_head_cross_entropy_bf16_tracks_the_plain_bf16_head() -> None:
    hidden, weight, labels = _head_case()
    h, w = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    reference = causal_lm_loss(h @ w.T, labels)
    reference.backward()
    hf, wf = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    head_cross_entropy(hf, wf, labels).backward()
    in_bf16 = float(head_cross_entropy(hidden.bfloat16(), weight.bfloat16(), labels))
    assert abs(in_bf16 - float(reference.detach())) < 1e-2
    assert hf.grad.dtype == torch.bfloat16 and wf.grad.dtype == torch.bfloat16
    torch.testing.assert_close(hf.grad.float(), h.grad.float(), rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(wf.grad.float(), w.grad.float(), rtol=2e-2, atol=1e-3)


def test_head_cross_entropy_refuses_fp16_and_unsupervised_batches() -> None:
    hidden, weight, labels = _head_case()
    with pytest.raises(ValueError, match="fp16"):
        head_cross_entropy(hidden.half(), weight.half(), labels)
    with pytest.raises(NoSupervisedTokensError):
        head_cross_entropy(hidden, weight, torch.full_like(labels, IGNORE_INDEX))


def test_head_cross_entropy_compiled_chunks_match_eager() -> None:
    hidden, weight, labels = _head_case()
    results = []
    for backend in ("", "aot_eager"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = head_cross_entropy(h, w, labels, chunk_elements=29 * 4, compile_backend=backend)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)
    labels[1, :3] = IGNORE_INDEX  # another count of supervised rows: runs without a new specialisation
    head_cross_entropy(hidden, weight.clone().requires_grad_(), labels, compile_backend="aot_eager").backward()
