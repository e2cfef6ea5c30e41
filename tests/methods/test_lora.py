"""LoRA through its CL-method hooks on a real (tiny) LlavaModel: identity at init, merge exactness, what trains,
the plain layout after merging, and a save/load round trip of the merged LLM."""

import math
from pathlib import Path

import pytest
import torch
from tiny_llava import D_MODEL, batch_loss, context, image_batch, logits, tiny_llava

from mllm_cl.methods import build_methods
from mllm_cl.methods.lora import LoRA
from mllm_cl.methods.lora_layers import LoRALinear, lora_parameters
from mllm_cl.weights import load_llm, save_llm


def _randomise_adapters(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def test_default_rank_is_half_the_width_with_rslora_scale() -> None:
    model = tiny_llava()
    method, ctx = LoRA(), context(model)
    method.before_task(ctx)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 2 * 4  # per block: attn.qkv, attn.proj, mlp.fc, mlp.proj
    rank = D_MODEL // 2
    assert ctx.log["lora_rank"] == rank
    for layer in layers:
        assert layer.rank == rank and layer.lora_a.shape[0] == rank and layer.lora_b.shape[1] == rank
        assert layer.scale == pytest.approx(8.0 / math.sqrt(rank))  # rsLoRA: alpha / sqrt(r), alpha = 8
    assert LoRALinear(torch.nn.Linear(4, 4), rank=4, alpha=8.0, rslora=False).scale == 2.0  # plain: alpha / r


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_fresh_adapters_keep_the_logits_and_merging_is_exact(arch: str) -> None:
    model, batch = tiny_llava(arch), image_batch()
    before = logits(model, batch)
    method, ctx = LoRA(), context(model)
    method.before_task(ctx)
    model.train()  # dropout on the adapter input is live, yet B = 0 makes the update vanish
    assert torch.equal(logits(model, batch), before)
    model.eval()
    _randomise_adapters(model)
    adapted = logits(model, batch)
    assert (adapted - before).abs().max() > 1e-2  # the adapters now matter
    method.after_task(ctx)
    assert ctx.log["lora_merged_layers"] == 8
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert (logits(model, batch) - adapted).abs().max() <= 1e-5


def test_only_adapters_and_projector_get_gradients_and_lm_head_is_never_adapted() -> None:
    model, batch = tiny_llava(), image_batch()
    method, ctx = LoRA(), context(model)
    method.before_task(ctx)
    assert isinstance(model.llm.lm_head, torch.nn.Linear) and not isinstance(model.llm.lm_head, LoRALinear)
    model.train()
    _randomise_adapters(model)  # with B = 0, A would get no gradient
    batch_loss(model, batch).backward()
    adapters = {id(p) for p in lora_parameters(model)}
    for name, p in model.named_parameters():
        should_train = id(p) in adapters or name.startswith("projector.")
        assert p.requires_grad == should_train, name
        assert (p.grad is not None) == should_train, name
        if should_train:
            assert p.grad.abs().sum() > 0, name
    for name in ("llm.token_embedding.weight", "llm.lm_head.weight", "llm.blocks.0.attn.qkv.base.weight"):
        assert model.get_parameter(name).grad is None


def test_merged_llm_has_the_plain_layout_trains_whole_and_round_trips(tmp_path: Path) -> None:
    model, batch = tiny_llava(), image_batch()
    keys = {k: v.shape for k, v in model.llm.state_dict().items()}
    method, ctx = LoRA(), context(model)
    method.before_task(ctx)
    assert set(model.llm.state_dict()) != set(keys)  # wrapped: base.weight, lora_a, lora_b
    _randomise_adapters(model)
    method.after_task(ctx)
    assert {k: v.shape for k, v in model.llm.state_dict().items()} == keys
    assert all(p.requires_grad for p in model.llm.parameters())  # the next task (or naive FT) trains it whole
    save_llm(model.llm, tmp_path / "llm")
    reloaded = load_llm(tmp_path / "llm")
    ids, mask = batch["input_ids"][:1], batch["attention_mask"][:1]  # text-only row
    with torch.no_grad():
        expected = model.llm(ids, attention_mask=mask).logits
        assert torch.equal(reloaded(ids, attention_mask=mask).logits, expected)


def test_lora_runs_first_in_a_composition_and_tasks_chain() -> None:
    model, batch = tiny_llava(), image_batch()
    methods = build_methods(["sac", "lora"])
    assert [m.name for m in methods] == ["lora", "sac"]
    lora = methods[0]
    for index in range(2):  # two tasks: adapters added, changed, merged, added again on the merged weights
        ctx = context(model, index=index)
        lora.before_task(ctx)
        start = logits(model, batch)
        _randomise_adapters(model)
        adapted = logits(model, batch)
        lora.after_task(ctx)
        assert (logits(model, batch) - adapted).abs().max() <= 1e-5
        assert (adapted - start).abs().max() > 1e-2
