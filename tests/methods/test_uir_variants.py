"""UIR's Figure-10 ablations (data replay, forward KL) through their hooks on a tiny LlavaModel, against terms
computed by hand one inquiry at a time (no padding anywhere)."""

import pytest
import torch
import torch.nn.functional as F
from tiny_llava import context, endless_inquiries, image_batch, perturb_, tiny_llava

from mllm_cl.losses import causal_lm_loss
from mllm_cl.methods.uir import UIR
from mllm_cl.methods.uir_variants import UIRForwardKL, UIRReplay

INQUIRIES = [[3, 9, 4, 12, 7], [8, 1, 2]]  # right-padded into one batch by the collate


def _task_step(model: torch.nn.Module, batch: dict) -> tuple:
    output = model(batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])
    return output, causal_lm_loss(output.logits, batch["labels"])


def _start(method: UIR, model: torch.nn.Module):
    ctx = context(model, inquiry_batches=lambda: endless_inquiries(INQUIRIES))
    ctx.snapshot_previous()
    method.before_task(ctx)
    return ctx


def _term(method: UIR, ctx, model: torch.nn.Module) -> torch.Tensor:
    batch = image_batch()
    output, task_loss = _task_step(model, batch)
    return method.loss(ctx, batch, output, task_loss) - task_loss


def _greedy_answer(llm: torch.nn.Module, prompt: list[int], max_tokens: int, eos: int) -> list[int]:
    """Greedy decoding written out: the whole sequence again at every step, no KV cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            token = int(llm(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            if token == eos:
                break
    return ids[len(prompt):]


def test_forward_kl_is_zero_for_equal_models_and_matches_a_hand_kl() -> None:
    model = tiny_llava()
    method = UIRForwardKL()
    ctx = _start(method, model)
    assert _term(method, ctx, model) == 0  # exactly: the model equals its frozen copy
    assert ctx.log["uir_fkl_last"] == 0.0
    reference = tiny_llava()  # the start weights, built independently
    perturb_(model.llm, scale=0.05)
    term = _term(method, ctx, model)
    with torch.no_grad():
        kls = []
        for row in INQUIRIES:
            ids = torch.tensor([row])
            p_old = torch.softmax(reference.llm(ids).logits[0].double(), dim=-1)  # (T, V)
            p_new = torch.softmax(model.llm(ids).logits[0].double(), dim=-1)
            kls.append((p_old * (p_old.log() - p_new.log())).sum(dim=-1))  # (T,): one KL per real token
        expected = torch.cat(kls).mean()
    assert float(expected) > 1e-4
    assert torch.allclose(term.double(), expected, rtol=1e-4, atol=1e-8)
    assert ctx.log["uir_fkl_last"] == pytest.approx(float(term.detach()), rel=1e-4)


def test_replay_is_cross_entropy_on_the_previous_models_greedy_answers() -> None:
    model = tiny_llava()
    method = UIRReplay(max_answer_tokens=6)
    ctx = _start(method, model)
    reference = tiny_llava()
    eos = reference.llm.config.eos_token_id
    answers = [_greedy_answer(reference.llm, row, 6, eos) for row in INQUIRIES]
    perturb_(model.llm, scale=0.05)  # the trained model drifts; the targets stay theta_{t-1}'s answers
    term = _term(method, ctx, model)
    assert {k: v.tolist() for k, v in method.answers.items()} == {tuple(r): a for r, a in zip(INQUIRIES, answers)}
    with torch.no_grad():
        logits, targets = [], []
        for row, answer in zip(INQUIRIES, answers):
            sequence = torch.tensor([row + answer])
            # the logits at the last prompt token and every answer token but the last predict the answer
            logits.append(model.llm(sequence).logits[0, len(row) - 1:-1])
            targets.append(torch.tensor(answer))
        expected = F.cross_entropy(torch.cat(logits), torch.cat(targets))  # mean over all answer tokens
    assert torch.allclose(term, expected, rtol=1e-5, atol=1e-6)
    assert ctx.log["uir_replay_last"] == pytest.approx(float(term.detach()), rel=1e-4)


def test_replay_answers_once_per_task_and_again_after_the_next_snapshot() -> None:
    model = tiny_llava()
    method = UIRReplay(max_answer_tokens=4)
    ctx = _start(method, model)
    _term(method, ctx, model)
    first = {k: v.clone() for k, v in method.answers.items()}
    perturb_(model.llm, scale=0.5, seed=3)
    _term(method, ctx, model)  # same task: the kept answers, even though the trained model changed a lot
    assert method.answers.keys() == first.keys()
    assert all(torch.equal(method.answers[k], first[k]) for k in first)
    ctx = _start(method, model)  # the next task: theta_{t-1} is the changed model, its answers are drawn anew
    assert method.answers == {}
    _term(method, ctx, model)
    assert any(not torch.equal(method.answers[k], first[k]) for k in first)


def test_gradients_reach_only_the_trained_model() -> None:
    for method in (UIRForwardKL(), UIRReplay(max_answer_tokens=3)):
        model = tiny_llava()
        ctx = _start(method, model)
        perturb_(model.llm, scale=0.05)
        model.train()
        _term(method, ctx, model).backward()
        assert all(p.grad is None for p in ctx.previous_model().parameters())
        assert sum(float(p.grad.abs().sum()) for p in model.llm.parameters() if p.grad is not None) > 0


def test_options_are_range_checked() -> None:
    with pytest.raises(ValueError, match="uir_fkl.weight"):
        UIRForwardKL(weight=-1.0)
    with pytest.raises(ValueError, match="max_answer_tokens"):
        UIRReplay(max_answer_tokens=0)
    with pytest.raises(ValueError, match="uir_replay needs text-only inquiries"):
        UIRReplay().before_task(context(tiny_llava()))
