"""UIR through its CL-method hooks on a real (tiny) LlavaModel, with collated text-only inquiry batches."""

import json
from pathlib import Path

import pytest
import torch
from test_tokenizer import byte_tokenizer_folder
from tiny_llava import context, endless_inquiries, image_batch, perturb_, tiny_llava

from mllm_cl.config import IMAGE_PLACEHOLDER_ID
from mllm_cl.data import TextOnlyInquiries, collate
from mllm_cl.losses import causal_lm_loss
from mllm_cl.methods import build_methods
from mllm_cl.methods.uir import UIR
from mllm_cl.tokenizer import load_tokenizer

INQUIRIES = [[3, 9, 4, 12, 7], [8, 1, 2]]  # right-padded into one batch by the collate


def _task_step(model: torch.nn.Module, batch: dict) -> tuple:
    output = model(batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])
    return output, causal_lm_loss(output.logits, batch["labels"])


def _uir_ctx(model: torch.nn.Module, rows: list[list[int]] = INQUIRIES, **kwargs):
    ctx = context(model, inquiry_batches=lambda: endless_inquiries(rows), **kwargs)
    ctx.snapshot_previous()
    method = UIR()
    method.before_task(ctx)
    return ctx, method


def test_zero_while_the_model_equals_its_frozen_copy_then_positive() -> None:
    model, batch = tiny_llava(), image_batch()
    ctx, method = _uir_ctx(model)
    output, task_loss = _task_step(model, batch)
    assert method.loss(ctx, batch, output, task_loss) == task_loss  # exactly: the term is 0
    assert ctx.log["uir_last"] == 0.0
    perturb_(model.llm.blocks[1], scale=0.05)
    output, task_loss = _task_step(model, batch)
    total = method.loss(ctx, batch, output, task_loss)
    assert ctx.log["uir_last"] > 1e-4
    assert torch.isclose(total - task_loss, torch.tensor(ctx.log["uir_last"]), rtol=1e-4)


def test_term_matches_an_independent_mean_squared_error_over_real_tokens() -> None:
    model, batch = tiny_llava(), image_batch()
    ctx, method = _uir_ctx(model)
    reference = tiny_llava()  # a second copy of the start weights, built independently
    perturb_(model.llm, scale=0.02)
    output, task_loss = _task_step(model, batch)
    term = method.loss(ctx, batch, output, task_loss) - task_loss
    with torch.no_grad():
        squared = []
        for row in INQUIRIES:  # one inquiry at a time: no padding anywhere
            ids = torch.tensor([row])
            new = model.llm(ids, return_hidden=True).hidden[0]
            old = reference.llm(ids, return_hidden=True).hidden[0]
            squared.append((new - old).pow(2))  # (T, D)
    expected = torch.cat(squared).mean()
    assert torch.allclose(term, expected, rtol=1e-4, atol=1e-7)


def test_gradients_reach_only_the_trained_model() -> None:
    model, batch = tiny_llava(), image_batch()
    ctx, method = _uir_ctx(model)
    previous = ctx.previous_model()
    assert all(not p.requires_grad for p in previous.parameters())
    perturb_(model.llm, scale=0.02)
    model.train()
    output, task_loss = _task_step(model, batch)
    (method.loss(ctx, batch, output, task_loss) - task_loss).backward()
    assert all(p.grad is None for p in previous.parameters())
    llm_grads = [p.grad for p in model.llm.parameters()]
    assert all(g is not None for g in llm_grads) and sum(float(g.abs().sum()) for g in llm_grads) > 0
    assert all(p.grad is None for p in model.vision.parameters())


def test_frozen_copy_shares_the_vision_tower_and_is_in_the_compute_dtype() -> None:
    model = tiny_llava()
    ctx = context(model, compute_dtype=torch.bfloat16)
    previous = ctx.snapshot_previous()
    assert ctx.snapshot_previous() is previous and ctx.previous_model() is previous  # built once per task
    assert previous.vision is model.vision
    assert previous.llm is not model.llm and previous.projector is not model.projector
    assert {p.dtype for p in previous.llm.parameters()} | {p.dtype for p in previous.projector.parameters()} \
        == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the trained model is untouched
    assert not previous.training and not previous.vision.training


def test_previous_model_before_snapshot_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="snapshot_previous"):
        context(tiny_llava()).previous_model()


def test_inquiries_with_image_placeholders_are_refused() -> None:
    model, batch = tiny_llava(), image_batch()
    ctx, method = _uir_ctx(model, rows=[[3, 4, IMAGE_PLACEHOLDER_ID, 5]])
    output, task_loss = _task_step(model, batch)
    with pytest.raises(ValueError, match="text-only"):
        method.loss(ctx, batch, output, task_loss)


def test_missing_or_empty_inquiries_are_a_clear_error() -> None:
    with pytest.raises(ValueError, match="inquiries"):
        UIR().before_task(context(tiny_llava()))
    model, batch = tiny_llava(), image_batch()
    empty = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.zeros(2, 3, dtype=torch.long)}

    def endless():
        while True:
            yield empty

    ctx = context(model, inquiry_batches=endless)
    ctx.snapshot_previous()
    method = UIR()
    method.before_task(ctx)
    output, task_loss = _task_step(model, batch)
    with pytest.raises(ValueError, match="no real"):
        method.loss(ctx, batch, output, task_loss)


def test_inquiries_from_a_llava_json_file(tmp_path: Path) -> None:
    tokenizer = load_tokenizer(byte_tokenizer_folder(tmp_path / "tok"))
    records = [{"id": "a", "conversations": [{"from": "human", "value": "Why?"}, {"from": "gpt", "value": "No."}]},
               {"id": "b", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"}]},
               {"id": "c", "conversations": [{"from": "human", "value": "Who is it?"}]}]
    path = tmp_path / "inquiries.json"
    path.write_text(json.dumps(records))
    inquiries = TextOnlyInquiries(path, tokenizer, "pythia", max_len=32)
    assert len(inquiries) == 2  # the image entry is passed over
    samples = [inquiries[0], inquiries[1]]
    for s in samples:  # the byte tokenizer's ids exceed the tiny model's vocabulary: fold them into it
        s["input_ids"] = s["input_ids"] % 64
    batch = collate(samples, pad_id=0)
    assert "labels" not in batch

    def endless():
        while True:
            yield batch

    model, task = tiny_llava(), image_batch()
    (method,) = build_methods(["uir"])
    ctx = context(model, inquiry_batches=endless)
    ctx.snapshot_previous()
    method.before_task(ctx)
    output, task_loss = _task_step(model, task)
    assert method.loss(ctx, task, output, task_loss) == task_loss
    perturb_(model.llm.norm)
    output, task_loss = _task_step(model, task)
    assert method.loss(ctx, task, output, task_loss) > task_loss
