"""LwF and online EWC through their CL-method hooks on a real (tiny) LlavaModel, against independent computations."""

import pytest
import torch
import torch.nn.functional as F
from tiny_llava import batch_loss, context, image_batch, perturb_, text_batch, tiny_llava

from mllm_cl.config import IGNORE_INDEX
from mllm_cl.methods import build_methods
from mllm_cl.methods.ewc import EWC
from mllm_cl.methods.lora_layers import lora_parameters
from mllm_cl.methods.lwf import LwF

TASK_A = [text_batch([[1, 5, 9, 13, 2], [4, 4, 8]]), text_batch([[7, 3, 11, 6]]), text_batch([[2, 9, 9, 10, 5, 1]])]
TASK_B = [text_batch([[20, 21, 22, 23]]), text_batch([[30, 31, 2], [33, 34, 35, 36, 37]])]


def _step(model: torch.nn.Module, batch: dict) -> tuple:
    output = model(batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])
    return output, batch_loss(model, batch)


# ---------------------------------------------------------------- LwF

def test_lwf_is_zero_for_equal_models_and_matches_an_independent_kl_after_a_change() -> None:
    model, batch = tiny_llava(), image_batch()
    ctx = context(model)
    ctx.snapshot_previous()
    (method,) = build_methods(["lwf"], {"lwf": {"weight": 0.5, "temperature": 2.0}})
    assert method.needs_previous
    output, loss = _step(model, batch)
    assert method.loss(ctx, batch, output, loss) == loss
    assert ctx.log["lwf_last"] == 0.0

    reference = tiny_llava()  # the start weights, built independently of the frozen copy
    perturb_(model.projector, scale=0.1)  # reaches the image row only through the projector
    perturb_(model.llm.blocks[0], scale=0.02)
    output, loss = _step(model, batch)
    term = method.loss(ctx, batch, output, loss) - loss
    with torch.no_grad():
        old = reference(batch["input_ids"], attention_mask=batch["attention_mask"],
                        pixel_values=batch["pixel_values"]).logits
    kls = []
    for b, t in (batch["labels"][:, 1:] != IGNORE_INDEX).nonzero().tolist():  # position t predicts label t+1
        p_old = F.softmax(old[b, t] / 2.0, -1)
        log_new = F.log_softmax(output.logits[b, t] / 2.0, -1)
        kls.append((p_old * (p_old.log() - log_new)).sum())
    expected = 0.5 * 2.0**2 * torch.stack(kls).mean()
    assert term > 1e-4
    assert torch.allclose(term, expected, rtol=1e-4)


def test_lwf_gradients_reach_only_the_trained_model() -> None:
    model, batch = tiny_llava(), image_batch()
    ctx = context(model)
    previous = ctx.snapshot_previous()
    perturb_(model.llm, scale=0.02)
    model.train()
    output, loss = _step(model, batch)
    (LwF().loss(ctx, batch, output, loss) - loss).backward()
    assert all(p.grad is None for p in previous.parameters())
    assert model.llm.lm_head.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- EWC

def _ewc_ctx(model: torch.nn.Module, batches: list[dict], index: int = 0):
    return context(model, index=index, loss_fn=batch_loss, task_batches=lambda n: iter(batches[:n]))


def _fisher(model: torch.nn.Module, batches: list[dict]) -> dict[str, torch.Tensor]:
    """Mean over batches of the squared gradient of each trainable parameter, via torch.autograd.grad."""
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    total = [torch.zeros_like(p) for p in params]
    for batch in batches:
        grads = torch.autograd.grad(batch_loss(model, batch), params, allow_unused=True)
        total = [t if g is None else t + g.pow(2) for t, g in zip(total, grads)]
    return {n: t / len(batches) for n, t in zip(names, total)}


def test_ewc_fisher_matches_squared_gradients_and_is_zero_where_no_gradient_flows() -> None:
    model = tiny_llava()
    method = EWC(weight=10.0, fisher_batches=3)
    model.train()
    method.after_task(_ewc_ctx(model, TASK_A))
    assert model.training  # the mode is restored
    assert all(p.grad is None for p in model.parameters())  # no gradient is left behind
    expected = _fisher(model, TASK_A)
    assert set(method.fisher) == set(expected)
    assert not any(name.startswith("vision.") for name in method.fisher)  # frozen: no estimate
    for name, value in expected.items():
        assert torch.allclose(method.fisher[name], value, rtol=1e-5, atol=1e-12), name
    # text-only batches: the projector gets no gradient, so no Fisher; the LLM does
    assert all(float(f.abs().sum()) == 0 for n, f in method.fisher.items() if n.startswith("projector."))
    assert method.fisher["llm.blocks.0.attn.qkv.weight"].sum() > 0
    unused = sorted(set(range(64)) - {i for b in TASK_A for i in b["input_ids"].flatten().tolist()})
    assert method.fisher["llm.token_embedding.weight"][unused].abs().sum() == 0  # rows never looked up


def test_ewc_penalty_is_zero_at_the_anchor_and_weighted_fisher_distance_away() -> None:
    model, batch = tiny_llava(), image_batch()
    method = EWC(weight=10.0, fisher_batches=3)
    ctx = _ewc_ctx(model, TASK_A)
    output, loss = _step(model, batch)
    assert method.loss(ctx, batch, output, loss) is loss  # before any task: no penalty
    method.after_task(ctx)
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    output, loss = _step(model, batch)
    assert method.loss(ctx, batch, output, loss) == loss
    perturb_(model.llm, scale=0.01)
    output, loss = _step(model, batch)
    term = method.loss(ctx, batch, output, loss) - loss
    expected = 0.5 * 10.0 * sum(float((f * (model.get_parameter(n).detach() - anchor[n]).pow(2)).sum())
                                for n, f in method.fisher.items())
    assert term > 0 and term.item() == pytest.approx(expected, rel=1e-4)
    term.backward()
    assert model.llm.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_online_ewc_combines_two_tasks_as_decay_f1_plus_f2() -> None:
    model = tiny_llava()
    method = EWC(decay=0.7, fisher_batches=2)
    method.after_task(_ewc_ctx(model, TASK_A, index=0))
    f1 = _fisher(model, TASK_A[:2])
    perturb_(model.llm, scale=0.02)  # "training" on task B
    method.after_task(_ewc_ctx(model, TASK_B, index=1))
    f2 = _fisher(model, TASK_B[:2])
    for name in f1:
        assert torch.allclose(method.fisher[name], 0.7 * f1[name] + f2[name], rtol=1e-5, atol=1e-12), name
        assert torch.equal(method.anchor[name], model.get_parameter(name).detach())  # anchor: the latest weights


def test_ewc_penalty_reaches_lora_adapters_on_a_later_task() -> None:
    model, batch = tiny_llava(), image_batch()
    ewc, lora = EWC(fisher_batches=3), build_methods(["lora"])[0]
    ewc.after_task(_ewc_ctx(model, TASK_A))  # task 1 without adapters
    ctx = _ewc_ctx(model, TASK_A, index=1)
    lora.before_task(ctx)  # task 2 with adapters: the base weights are frozen, only B A moves
    output, loss = _step(model, batch)
    assert ewc.loss(ctx, batch, output, loss) == loss  # fresh adapters: still at the anchor
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(std=0.05)
    output, loss = _step(model, batch)
    term = ewc.loss(ctx, batch, output, loss) - loss
    assert term > 0
    term.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(model))


def test_ewc_without_task_data_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="loss_fn and task_batches"):
        EWC().after_task(context(tiny_llava()))
    with pytest.raises(ValueError, match="no batch"):
        EWC().after_task(_ewc_ctx(tiny_llava(), []))


def test_ewc_anchors_on_the_consolidated_weights_the_next_task_starts_from() -> None:
    model, batch = tiny_llava(), image_batch()
    methods = build_methods(["ewc", "modelmix"], {"ewc": {"fisher_batches": 2}, "modelmix": {"alpha": 0.5}})
    assert [m.name for m in methods] == ["modelmix", "ewc"]
    ctx = _ewc_ctx(model, TASK_A)
    ctx.take_start_state()
    perturb_(model.llm, scale=0.05)  # "training"
    for method in methods:
        method.after_task(ctx)
    ewc = methods[1]
    assert all(torch.equal(ewc.anchor[n], model.get_parameter(n).detach()) for n in ewc.anchor)
    output, loss = _step(model, batch)
    assert ewc.loss(context(model, index=1), batch, output, loss) == loss  # the next task starts at the anchor
