"""L2P on a tiny LlavaModel: prompt selection against hand-computed cosines, the prompts' splice into the model
(a row without prompts is the base model's row), frozen parts, the surrogate key loss, saving, and a task through
the hooks."""

import math
from pathlib import Path

import pytest
import torch
from tiny_llava import P, batch_loss, context, image_batch, logits, tiny_llava

from mllm_cl.config import IMAGE_PLACEHOLDER_ID
from mllm_cl.llava import PromptPool, load_llava, save_llava
from mllm_cl.methods.l2p import L2P

KEYS = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [-1.0, 0.5, 2.0]]


def _hand_pool() -> PromptPool:
    pool = PromptPool(size=4, length=2, top_n=2, d_key=3, d_model=5)
    with torch.no_grad():
        pool.keys.copy_(torch.tensor(KEYS))
        pool.prompts.copy_(torch.arange(4 * 2 * 5, dtype=torch.float32).view(4, 2, 5))
    return pool


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _started(model: torch.nn.Module, **options) -> tuple:
    method = L2P(**options)
    ctx = context(model)
    method.before_task(ctx)
    return ctx, method


def test_selection_picks_the_hand_computed_top_keys() -> None:
    pool = _hand_pool()
    # row 0: one image; row 1: text only; row 2: two images (the query is the mean over both)
    input_ids = torch.tensor([[5] + [IMAGE_PLACEHOLDER_ID] * 2 + [6, 7, 0],
                              [5, 6, 7, 8, 9, 10],
                              [IMAGE_PLACEHOLDER_ID] * 4 + [6, 7]])
    features = torch.tensor([[[2.0, 0.2, 0.0], [2.0, 0.0, 0.2]],  # image 0, 2 tokens
                             [[-1.0, 0.5, 2.0], [-1.0, 0.5, 2.0]],  # image 1 (row 2)
                             [[0.0, 0.0, 2.0], [0.0, 1.0, 2.0]]])  # image 2 (row 2)
    queries = {0: [2.0, 0.1, 0.1], 2: [-0.5, 0.5, 2.0]}  # mean over each row's image tokens, by hand
    tops = {0: [0, 2], 2: [3, 1]}  # by the cosines below: row 2's best key is the last one
    prompts, mask = pool(input_ids, features)
    assert prompts.shape == (3, 4, 5) and mask.tolist() == [[1] * 4, [0] * 4, [1] * 4]
    for row, query in queries.items():
        cosines = [_cosine(query, key) for key in KEYS]
        top = sorted(range(4), key=lambda k: -cosines[k])[:2]
        assert top == tops[row]
        expected = torch.cat([pool.prompts[k] for k in top])  # (2 * length, 5), most similar first
        assert torch.equal(prompts[row], expected)
    query_rows, has_image = pool.queries(input_ids, features)
    assert torch.allclose(query_rows[[0, 2]], torch.tensor([queries[0], queries[2]]))
    assert has_image.tolist() == [True, False, True]


def test_an_empty_pool_or_no_pool_is_the_base_model_and_text_rows_get_no_prompt() -> None:
    base, model, batch = tiny_llava(), tiny_llava(), image_batch()
    real = batch["attention_mask"].bool()
    expected = logits(base, batch)
    model.prompt_pool = PromptPool(0, 5, 0, model.vision.config.d_model, model.llm.config.d_model)
    assert torch.allclose(logits(model, batch)[real], expected[real], atol=1e-6)
    model.prompt_pool = None
    assert torch.equal(logits(model, batch), expected)
    _started(model, pool_size=4, prompt_length=3, top_n=2)
    prompted = logits(model, batch)
    assert prompted.shape == expected.shape  # the prompts' positions are dropped from the output
    text_row, image_row = real[0], real[1]  # image_batch: row 0 text only, row 1 one image
    assert torch.allclose(prompted[0][text_row], expected[0][text_row], atol=1e-5)
    assert (prompted[1][image_row] - expected[1][image_row]).abs().max() > 1e-2


def test_generation_reads_the_prompts_like_the_forward() -> None:
    model = tiny_llava()
    _started(model, pool_size=4, prompt_length=3, top_n=2)
    batch = image_batch()
    ids, mask, pixels = batch["input_ids"][1:], batch["attention_mask"][1:], batch["pixel_values"]
    out = model.generate(ids, mask, pixels, max_new_tokens=4)
    with torch.no_grad():  # greedy by hand through the forward pass, no KV cache
        sequence = ids[0].tolist()
        for _ in range(4):
            sequence.append(int(model(torch.tensor([sequence]), pixel_values=pixels).logits[0, -1].argmax()))
    assert out.tokens[0].tolist() == sequence[-4:]


def test_only_the_pool_gets_gradients_and_the_key_term_is_the_hand_cosine() -> None:
    model, batch = tiny_llava(), image_batch()
    ctx, method = _started(model, pool_size=4, prompt_length=3, top_n=2, key_weight=0.1)
    model.train()
    task_loss = batch_loss(model, batch)
    total = method.loss(ctx, batch, None, task_loss)
    with torch.no_grad():
        image = batch["pixel_values"]
        query = model.vision(image)[0].mean(dim=0).tolist()  # image_batch has one image, in row 1
        cosines = sorted((_cosine(query, key) for key in model.prompt_pool.keys.tolist()), reverse=True)
    assert float((task_loss - total).detach()) == pytest.approx(0.1 * (cosines[0] + cosines[1]) / 2, rel=1e-4)
    assert ctx.log["l2p_key_match_last"] == pytest.approx((cosines[0] + cosines[1]) / 2, rel=1e-5)
    total.backward()
    pool = model.prompt_pool
    frozen = [p for name, p in model.named_parameters() if not name.startswith("prompt_pool.")]
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
    assert float(pool.keys.grad.abs().sum()) > 0 and float(pool.prompts.grad.abs().sum()) > 0
    chosen = pool.similarity(pool.queries(batch["input_ids"], model.vision(image))[0][1:]).topk(2).indices[0]
    unused = [k for k in range(4) if k not in chosen.tolist()]
    assert float(pool.prompts.grad[unused].abs().sum()) == 0  # only the selected prompts are read


def test_a_task_through_the_hooks_trains_the_pool_alone_and_saves_it(tmp_path: Path) -> None:
    model, batch = tiny_llava(), image_batch()
    frozen_before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx, method = _started(model, pool_size=6, prompt_length=2, top_n=3)
    pool_before = {k: v.clone() for k, v in model.prompt_pool.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    first = None
    for _ in range(5):
        optimizer.zero_grad()
        loss = method.loss(ctx, batch, None, batch_loss(model, batch))
        loss.backward()
        optimizer.step()
        first = float(loss.detach()) if first is None else first
    method.after_task(ctx)
    assert float(method.loss(ctx, batch, None, batch_loss(model, batch)).detach()) < first
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen_before.items())
    assert any(not torch.equal(v, model.prompt_pool.state_dict()[k]) for k, v in pool_before.items())
    assert ctx.log["l2p_trained_parameters"] == 6 * 2 * 32 + 6 * 24

    save_llava(model.eval(), tmp_path / "model")
    loaded = load_llava(tmp_path / "model")
    assert torch.equal(loaded.prompt_pool.prompts, model.prompt_pool.prompts) and loaded.prompt_pool.top_n == 3
    assert torch.equal(logits(loaded, batch), logits(model, batch))
    _, again = _started(loaded, pool_size=6, prompt_length=2, top_n=3)  # the next task keeps the saved pool
    assert torch.equal(loaded.prompt_pool.prompts, model.prompt_pool.prompts)
    with pytest.raises(ValueError, match="set l2p's options"):
        _started(loaded, pool_size=6, prompt_length=2, top_n=2)


def test_a_batch_without_images_is_plain_cross_entropy_with_a_zero_gradient_for_the_pool() -> None:
    model = tiny_llava()
    ctx, method = _started(model)
    batch = image_batch()
    text = {"input_ids": batch["input_ids"][:1], "attention_mask": batch["attention_mask"][:1],
            "labels": batch["labels"][:1], "pixel_values": None}
    task_loss = batch_loss(model, text)
    assert not task_loss.requires_grad  # everything it reads is frozen
    loss = method.loss(ctx, text, None, task_loss)
    assert torch.equal(loss.detach(), task_loss)
    loss.backward()  # a text-only task trains without error, and changes nothing
    pool = model.prompt_pool
    assert torch.equal(pool.prompts.grad, torch.zeros_like(pool.prompts)) and pool.keys.grad is None
    assert P == model.num_image_tokens


def test_options_are_range_checked() -> None:
    for options in ({"pool_size": 0}, {"prompt_length": 0}, {"top_n": 0}, {"top_n": 21}, {"key_weight": -0.1}):
        with pytest.raises(ValueError, match="l2p"):
            L2P(**options)
    with pytest.raises(ValueError, match="top_n <= size"):
        PromptPool(2, 1, 3, 4, 4)
