"""MoELoRA (CoIN's mixture of LoRA experts) on a tiny LlavaModel: gates per token, one expert = plain LoRA, the
layer against a per-expert hand computation, identity at init, tasks through the hooks, the experts saved with the
model (beside a plain LLM folder), and a continual sequence resumed from a saved task."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_continual import stage
from tiny_llava import D_MODEL, batch_loss, context, image_batch, logits, tiny_llava

from mllm_cl.llava import LlavaModel, load_llava, save_llava
from mllm_cl.methods import build_methods
from mllm_cl.methods.lora_layers import LoRALinear
from mllm_cl.methods.moelora import MoELoRA, MoELoRALinear, MoELoRAResumeError, default_experts, moelora_layers
from mllm_cl.model_folder import ModelFolderError
from mllm_cl.stages import run_stage
from mllm_cl.weights import load_llm


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
    with pytest.raises(MoELoRAResumeError, match="without MoELoRA experts"):
        MoELoRA().before_task(context(tiny_llava(), index=1))


@pytest.mark.parametrize("options", [dict(rank=0), dict(rank=4, experts=3), dict(experts=0), dict(alpha=-1.0),
                                     dict(dropout=1.0)])
def test_bad_options_are_refused(options: dict) -> None:
    with pytest.raises(ValueError, match="moelora"):
        MoELoRA(**options)


def _trained_moe_llava(arch: str = "gpt_neox") -> tuple[LlavaModel, MoELoRA]:
    """A tiny LLaVA with experts as training leaves them: non-zero B, the gate's random init."""
    model, method = tiny_llava(arch), MoELoRA(rank=4, experts=2)
    method.before_task(context(model))
    with torch.no_grad():
        for layer in moelora_layers(model.llm):
            layer.lora_b.normal_(std=0.3)
    return model, method


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_a_saved_folder_holds_the_experts_beside_the_plain_llm(tmp_path: Path, arch: str) -> None:
    model, method = _trained_moe_llava(arch)
    batch, base = image_batch(), tiny_llava(arch)  # the same seed: the weights the experts were added to
    objects, before = [id(p) for p in model.parameters()], {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = logits(model, batch)
    assert not torch.equal(expected, logits(base, batch))  # the experts change the outputs

    folder = save_llava(model, tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "llm", "moelora.safetensors",
                                                        "projector.safetensors", "vision"]
    assert json.loads((folder / "config.json").read_text())["moelora"] == {"rank": 4, "alpha": 8.0, "experts": 2}
    saved = load_file(str(folder / "moelora.safetensors"))
    assert len(saved) == 3 * 8 and saved["blocks.0.attn.qkv.gate"].shape == (2, D_MODEL)
    assert torch.equal(saved["blocks.1.mlp.proj.lora_b"], model.llm.blocks[1].mlp.proj.lora_b.detach())
    assert [id(p) for p in model.parameters()] == objects  # saving left the model in memory as it was
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()) and len(moelora_layers(model)) == 8

    plain = load_llm(folder / "llm")  # other tools read llm/ as the base LLM
    assert plain.state_dict().keys() == base.llm.state_dict().keys()
    assert all(torch.equal(v, base.llm.state_dict()[k]) for k, v in plain.state_dict().items())

    loaded = load_llava(folder).eval()
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert torch.equal(logits(loaded, batch), expected)
    assert all(layer.dropout.p == 0.0 for layer in moelora_layers(loaded.llm))
    layers = moelora_layers(loaded.llm)
    method.before_task(context(loaded, index=1))  # a resumed run's next task goes on with the saved experts
    assert moelora_layers(loaded.llm) == layers and all(layer.dropout.p == 0.05 for layer in layers)


def test_the_transformers_layout_refuses_experts(tmp_path: Path) -> None:
    model, _ = _trained_moe_llava()
    with pytest.raises(ModelFolderError, match="MoELoRA experts saves only in our layout"):
        save_llava(model, tmp_path / "hf", layout="hf")
    assert not (tmp_path / "hf").exists()


def test_a_missing_or_damaged_experts_file_is_a_clear_error(tmp_path: Path) -> None:
    folder = save_llava(_trained_moe_llava()[0], tmp_path / "model")
    path, config = folder / "moelora.safetensors", (folder / "config.json").read_text()
    tensors = load_file(str(path))
    save_file({k: v for k, v in tensors.items() if k != "blocks.0.attn.qkv.gate"}, str(path))
    with pytest.raises(ModelFolderError, match=r"moelora.safetensors does not hold the experts that .*config.json "
                                               r"describes .*blocks.0.attn.qkv.gate is missing, expected \(2, 32\)"):
        load_llava(folder)
    save_file({**tensors, "blocks.0.attn.qkv.gate": tensors["blocks.0.attn.qkv.gate"][:1]}, str(path))
    with pytest.raises(ModelFolderError, match=r"blocks.0.attn.qkv.gate is \(1, 32\), expected \(2, 32\)"):
        load_llava(folder)
    save_file({k.replace(".attn.qkv.", ".norm_1."): v for k, v in tensors.items()}, str(path))
    with pytest.raises(ModelFolderError, match=r"\['blocks.0.norm_1', 'blocks.1.norm_1'\] are not linear layers"):
        load_llava(folder)
    save_file(tensors, str(path))
    (folder / "config.json").write_text(config.replace('"experts": 2', '"experts": 4'))  # shapes of 4 experts
    with pytest.raises(ModelFolderError, match=r"blocks.0.attn.qkv.gate is \(2, 32\), expected \(4, 32\).* and 5 "
                                               "more; save the model again"):
        load_llava(folder)
    (folder / "config.json").write_text(config.replace('"experts": 2', '"experts": 3'))
    with pytest.raises(ModelFolderError, match=r"config.json: \"moelora\" must be .* with E dividing r, got "
                                               r"\{'alpha': 8.0, 'experts': 3, 'rank': 4\}"):
        load_llava(folder)
    (folder / "config.json").write_text(config)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ModelFolderError, match="cannot read .*moelora.safetensors"):
        load_llava(folder)
    path.unlink()
    with pytest.raises(ModelFolderError, match="cannot read .*moelora.safetensors"):
        load_llava(folder)


def test_experts_of_other_settings_than_the_options_are_an_error() -> None:
    model, _ = _trained_moe_llava()
    with pytest.raises(ValueError, match="set moelora's options to the experts'"):
        MoELoRA(rank=4, experts=4).before_task(context(model, index=1))


def test_a_sequence_interrupted_after_its_first_task_resumes_to_the_same_result(world: Path, init_model: Path,
                                                                                tmp_path: Path) -> None:
    [method] = build_methods(["moelora"])
    assert isinstance(method, MoELoRA)
    cfg = stage(world, init_model, tmp_path / "whole", ["moelora"], {"moelora": {"rank": 4, "experts": 2}})
    cfg.tasks = cfg.tasks[:2]
    run_stage(cfg)
    whole = json.loads((tmp_path / "whole/results.json").read_text())
    assert [after["method_log"]["moelora_layers"] for after in whole["after_task"]] == [8, 8]

    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut/task_2_count")  # interrupted after task 1: task 2 starts from task 1's folder
    run_stage(replace(cfg, out_dir=str(tmp_path / "cut")))
    resumed = json.loads((tmp_path / "cut/results.json").read_text())

    def scores(results: dict) -> list[dict]:  # every figure but the seconds each part took
        return [{k: v for k, v in after.items() if k != "seconds"} for after in results["after_task"]]

    assert scores(resumed) == scores(whole)
    final = load_llava(tmp_path / "whole/task_2_count/model").state_dict()
    again = load_llava(tmp_path / "cut/task_2_count/model").state_dict()
    assert any(".lora_b" in k for k in final) and final.keys() == again.keys()
    assert all(torch.equal(final[k], again[k]) for k in final)
