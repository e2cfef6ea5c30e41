"""ModelMix and SAC as CL methods on a real (tiny) LlavaModel: endpoints, the vision tower, and LoRA composed."""

import copy

import pytest
import torch
from tiny_llava import context, image_batch, logits, perturb_, tiny_llava

from mllm_cl import consolidation, spectral
from mllm_cl.config import ConfigError, TrainConfig
from mllm_cl.losses import forward_loss
from mllm_cl.methods import build_methods
from mllm_cl.methods.consolidation_methods import ModelMixMethod, SACMethod
from mllm_cl.methods.lora_layers import LoRALinear, lora_parameters, merge_lora
from mllm_cl.trainer import Trainer


def _trained(seed: int = 0):
    """A model, its task context with the start weights kept, and the model "trained" (perturbed) from there."""
    model = tiny_llava(seed=seed)
    ctx = context(model)
    ctx.take_start_state()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    perturb_(model.projector, scale=0.05, seed=1)
    perturb_(model.llm, scale=0.05, seed=2)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    return model, ctx, start, trained


def _vision(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("vision.")}


def test_start_state_is_the_llm_and_projector_only() -> None:
    model, ctx, start, _ = _trained()
    assert set(ctx.start_state) == {k for k in start if not k.startswith("vision.")}
    assert any(k.startswith("projector.") for k in ctx.start_state)
    assert all(torch.equal(ctx.start_state[k], start[k]) for k in ctx.start_state)


@pytest.mark.parametrize("cls", [ModelMixMethod, SACMethod])
def test_alpha_one_keeps_the_trained_weights_and_alpha_zero_restores_the_start(cls) -> None:
    for alpha, expected in ((1.0, "trained"), (0.0, "start")):
        model, ctx, start, trained = _trained()
        cls(alpha=alpha).after_task(ctx)
        target = trained if expected == "trained" else start
        state = model.state_dict()
        assert all(torch.equal(state[k], target[k]) for k in state), (alpha, expected)
        assert ctx.log[f"{cls.name}_alpha"] == alpha


def test_modelmix_moves_alpha_of_the_way_and_the_vision_tower_never_changes() -> None:
    model, ctx, start, trained = _trained()
    ModelMixMethod(alpha=0.3).after_task(ctx)
    state = model.state_dict()
    for key in ctx.start_state:
        assert torch.allclose(state[key], start[key] + 0.3 * (trained[key] - start[key]), atol=1e-6), key
    assert all(torch.equal(v, start[k]) for k, v in _vision(state).items())
    assert all(not p.requires_grad for p in model.vision.parameters())


def test_sac_writes_the_consolidated_weights_biases_get_modelmix_and_vision_stays() -> None:
    model, ctx, start, trained = _trained()
    SACMethod(alpha=0.4).after_task(ctx)
    state = model.state_dict()
    expected = spectral.sac({k: start[k] for k in ctx.start_state}, {k: trained[k] for k in ctx.start_state}, 0.4)
    for key in ctx.start_state:
        assert torch.allclose(state[key], expected[key], atol=1e-6), key
        if start[key].dim() == 1:  # biases and norms: ModelMix
            assert torch.allclose(state[key], start[key] + 0.4 * (trained[key] - start[key]), atol=1e-6), key
    moved = state["llm.blocks.0.attn.qkv.weight"] - start["llm.blocks.0.attn.qkv.weight"]
    update = trained["llm.blocks.0.attn.qkv.weight"] - start["llm.blocks.0.attn.qkv.weight"]
    assert 0 < moved.norm() < update.norm()  # part of the way, not all of it
    assert all(torch.equal(v, start[k]) for k, v in _vision(state).items())


def test_an_unchanged_model_stays_unchanged() -> None:  # e.g. the hooks replayed on a finished task's model
    model = tiny_llava()
    ctx = context(model)
    ctx.take_start_state()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    SACMethod(alpha=0.5).after_task(ctx)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_model_cast_to_the_compute_dtype_during_training_is_consolidated_in_that_dtype() -> None:
    model, ctx, start, _ = _trained()
    model.llm.to(torch.bfloat16)  # as the trainer's mixed precision leaves it
    model.projector.to(torch.bfloat16)
    ModelMixMethod(alpha=0.0).after_task(ctx)
    state = model.state_dict()
    assert all(torch.equal(state[k], start[k].to(torch.bfloat16)) for k in ctx.start_state)


def test_lora_then_sac_merges_first_then_consolidates_to_the_plain_layout() -> None:
    model, batch = tiny_llava(), image_batch()
    plain_keys = set(model.state_dict())
    methods = build_methods(["sac", "lora"], {"sac": {"alpha": 0.5}})
    assert [m.name for m in methods] == ["lora", "sac"]  # after_task runs in this order: merge, then consolidate
    ctx = context(model)
    ctx.take_start_state()
    start = {k: v.clone() for k, v in ctx.start_state.items()}
    for method in methods:
        method.before_task(ctx)
    assert any(isinstance(m, LoRALinear) for m in model.modules())
    with torch.no_grad():  # "training": only the adapters and the projector move
        for p in lora_parameters(model):
            p.normal_(std=0.1)
    perturb_(model.projector, scale=0.05)
    merged = copy.deepcopy(model)
    merge_lora(merged.llm)
    new = {k: v for k, v in merged.state_dict().items() if k in start}
    for method in methods:
        method.after_task(ctx)
    assert set(model.state_dict()) == plain_keys
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    expected = spectral.sac(start, new, 0.5)
    state = model.state_dict()
    for key in start:
        assert torch.allclose(state[key], expected[key], atol=1e-5), key
    assert (logits(model, batch) - logits(merged, batch)).abs().max() > 1e-3  # consolidated, not just merged


def test_missing_start_state_and_bad_alpha_are_clear_errors() -> None:
    with pytest.raises(RuntimeError, match="started from"):
        ModelMixMethod().after_task(context(tiny_llava()))
    with pytest.raises(ValueError, match=r"sac.alpha must be in \[0, 1\]"):
        build_methods(["sac"], {"sac": {"alpha": 1.5}})


def test_sac_rule_is_a_method_option() -> None:
    assert build_methods(["sac"], {"sac": {"alpha": 0.3, "rule": "top"}})[0].rule == "top"
    assert build_methods(["sac"])[0].rule == "nuclear"
    with pytest.raises(ConfigError, match="sac.rule must be one of nuclear, top"):
        build_methods(["sac"], {"sac": {"rule": "middle"}})


@pytest.mark.parametrize("name", ["modelmix", "sac"])
def test_consolidation_after_a_bf16_run_is_computed_from_fp32(tmp_path, name) -> None:
    """Paper 2 at alpha 0.2 after a short bf16 run (updates ~1e-4 per weight): the trainer hands back the fp32
    masters, so the result equals the consolidation computed in fp32 from the same start and end weights.
    From the bf16 copy, theta_old + 0.2 * Delta would round back towards theta_old (rel. error ~1e-3)."""
    model = tiny_llava()
    model.vision.requires_grad_(False)
    vision = {k: v.clone() for k, v in model.vision.state_dict().items()}
    ctx = context(model)
    ctx.take_start_state()
    batch = image_batch()
    config = TrainConfig(steps=3, global_batch_size=2, micro_batch_size=2, lrs={"": 1e-4}, warmup_ratio=0.0,
                         max_grad_norm=0.0, precision="bf16", device="cpu")
    trainer = Trainer(model, forward_loss, lambda epoch: [batch], config, tmp_path)
    trainer.fit()
    masters = {k: m.detach().clone() for k, m in trainer.precision.named_master_params()}
    end = {k: masters.get(k, v) for k, v in ctx.start_state.items()}
    update = max(float((end[k] - v).abs().mean()) for k, v in ctx.start_state.items())
    assert 3e-5 < update < 1e-3  # about 1e-4 per weight
    expected = (consolidation.modelmix if name == "modelmix" else consolidation.sac)(ctx.start_state, end, 0.2)
    build_methods([name], {name: {"alpha": 0.2}})[0].after_task(ctx)
    state = model.state_dict()
    for key, value in expected.items():
        assert state[key].dtype == torch.float32, key
        error = float((state[key] - value).norm() / value.norm())
        assert error <= 1e-6, (key, error)
    assert all(torch.equal(model.vision.state_dict()[k], v) for k, v in vision.items())  # frozen: exact again
