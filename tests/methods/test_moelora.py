"""MoELoRA (CoIN's mixture of LoRA experts) on a tiny LlavaModel: gates per token, one expert = plain LoRA, the
layer against a per-expert hand computation, identity at init, and tasks through the hooks."""

import pytest
import torch
from tiny_llava import D_MODEL, batch_loss, context, image_batch, logits, tiny_llava

from mllm_cl.methods.lora_layers import LoRALinear
from mllm_cl.methods.moelora import MoELoRA, MoELoRALinear, MoELoRAResumeError, default_experts, moelora_layers


def _moe(experts: int, rank: int = 4, seed: int = 0) -> MoELoRALinear:
    torch.manual_seed(seed)
    layer = MoELoRALinear(torch.nn.Linear(6, 5), rank=rank, alpha=8.0, experts=experts)
    with torch.no_grad():
        layer.lora_b.normal_()
    return layer


def test_gates_are_a_distribution_per_token() -> None:
    layer = _moe(experts=4)
    x = torch.randn(2, 7, 6)
    gates = layer.gates(x)
    assert gates.shape == (2, 7, 4) and bool((gates > 0).all())
    assert (gates.sum(-1) - 1).abs().max() <= 1e-6
    assert (gates[0, 0] - gates[1, 3]).abs().max() > 1e-3  # per token, not one mix for the layer


def test_one_expert_is_plain_lora_of_the_same_rank() -> None:
    moe = _moe(experts=1)
    lora = LoRALinear(moe.base, rank=4, alpha=8.0, rslora=False)  # plain alpha / r, as CoIN's scaling
    with torch.no_grad():
        lora.lora_a.copy_(moe.lora_a)
        lora.lora_b.copy_(moe.lora_b)
    assert moe.scale == lora.scale == 2.0
    x = torch.randn(3, 6)
    assert (moe(x) - lora(x)).abs().max() <= 1e-6


def test_layer_equals_the_gated_sum_of_experts_by_hand() -> None:
    layer = _moe(experts=2)
    x = torch.randn(3, 6)
    w, b, a, up, gate = (t.detach() for t in (layer.base.weight, layer.base.bias, layer.lora_a, layer.lora_b,
                                                layer.gate))
    expected = []
    for token in x:  # h = W x + b + s * sum_e g_e B_e A_e x, g = softmax(W_g x); expert e owns rank rows 2e, 2e+1
        logits_e = [float(gate[e] @ token) for e in range(2)]
        g = torch.tensor(logits_e).exp() / torch.tensor(logits_e).exp().sum()
        h = w @ token + b
        for e in range(2):
            h = h + 2.0 * g[e] * (up[:, 2 * e:2 * e + 2] @ (a[2 * e:2 * e + 2] @ token))
        expected.append(h)
    assert (layer(x) - torch.stack(expected)).abs().max() <= 1e-5


def test_fresh_experts_start_at_b_zero_with_small_a_and_keep_the_logits() -> None:
    model, batch = tiny_llava(), image_batch()
    before = logits(model, batch)
    ctx = context(model)
    MoELoRA(rank=4, experts=2).before_task(ctx)
    layers = moelora_layers(model.llm)
    assert len(layers) == 8 and all(not bool(layer.lora_b.any()) for layer in layers)
    model.train()  # dropout on the experts' input is live; B = 0 silences them
    assert torch.equal(logits(model, batch), before)
    big = MoELoRALinear(torch.nn.Linear(256, 256), rank=64, alpha=128.0, experts=8)
    assert big.lora_a.std().item() == pytest.approx(0.01, rel=0.03)  # A ~ N(0, 0.01^2)


def test_defaults_follow_the_demo_rank_and_coins_experts() -> None:
    assert [default_experts(r) for r in (1, 4, 12, 128)] == [1, 4, 6, 8]
    model = tiny_llava()
    ctx = context(model)
    MoELoRA().before_task(ctx)
    assert ctx.log["moelora_rank"] == D_MODEL // 32 and ctx.log["moelora_experts"] == 1
    assert all(layer.scale == 2.0 for layer in moelora_layers(model.llm))  # alpha = 2 rank, s = alpha / r


def test_tasks_run_through_the_hooks_and_keep_training_the_same_experts() -> None:
    model, batch = tiny_llava(), image_batch()
    method = MoELoRA(rank=4, experts=2)
    ctx = context(model)
    method.before_task(ctx)
    first = [id(p) for layer in moelora_layers(model.llm) for p in (layer.lora_a, layer.lora_b, layer.gate)]
    model.train()
    with torch.no_grad():
        for layer in moelora_layers(model.llm):
            layer.lora_b.normal_(std=0.1)
    batch_loss(model, batch).backward()
    trained = {id(p) for layer in moelora_layers(model.llm) for p in (layer.lora_a, layer.lora_b, layer.gate)}
    for name, p in model.named_parameters():
        should_train = id(p) in trained or name.startswith("projector.")
        assert p.requires_grad == should_train and (p.grad is not None) == should_train, name
        if should_train:
            assert p.grad.abs().sum() > 0, name
    adapted = logits(model.eval(), batch)
    method.after_task(ctx)
    assert ctx.log["moelora_layers"] == 8
    assert torch.equal(logits(model, batch), adapted)  # nothing merged: the model evaluated is the trained one

    model.llm.requires_grad_(True)  # as another method's after_task may leave it
    ctx = context(model, index=1)
    method.before_task(ctx)
    again = [id(p) for layer in moelora_layers(model.llm) for p in (layer.lora_a, layer.lora_b, layer.gate)]
    assert again == first and len(moelora_layers(model.llm)) == 8
    assert {id(p) for p in model.llm.parameters() if p.requires_grad} == set(first)


def test_a_later_task_without_experts_is_an_error() -> None:
    with pytest.raises(MoELoRAResumeError, match="without its MoELoRA experts"):
        MoELoRA().before_task(context(tiny_llava(), index=1))


@pytest.mark.parametrize("options", [dict(rank=0), dict(rank=4, experts=3), dict(experts=0), dict(alpha=-1.0),
                                     dict(dropout=1.0)])
def test_bad_options_are_refused(options: dict) -> None:
    with pytest.raises(ValueError, match="moelora"):
        MoELoRA(**options)
