"""O-LoRA through its hooks on a tiny LlavaModel: the orthogonality penalty against hand computations, frozen
earlier LoRAs, the forward pass against W x plus every task's update by hand, and saved = evaluated models (also
through a real two-task continual run)."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny_llava import batch_loss, context, image_batch, logits, tiny_llava

from mllm_cl.config import EvalSpec, StageConfig, TaskSpec, TrainConfig
from mllm_cl.continual import evaluate_model, load_init
from mllm_cl.llava import load_llava, save_llava
from mllm_cl.methods import REGISTRY
from mllm_cl.methods.olora import OLoRA, OLoRALinear, OLoRAResumeError, olora_layers
from mllm_cl.stages import run_stage


def _train_stand_in(model: torch.nn.Module, seed: int) -> None:
    """Seeded values for the current task's A and B (B = 0 would leave the task's update at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in olora_layers(model).values():
            for p in (layer.lora_a, layer.lora_b):
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))


def _layer(previous_a: list[list[float]], new_a: list[list[float]]) -> OLoRALinear:
    base = torch.nn.Linear(3, 2)
    previous = (torch.tensor(previous_a), torch.zeros(2, len(previous_a))) if previous_a else None
    layer = OLoRALinear(base, rank=len(new_a), alpha=2.0, previous=previous)
    with torch.no_grad():
        layer.lora_a.copy_(torch.tensor(new_a))
    return layer


def test_penalty_equals_hand_computation_and_vanishes_for_orthogonal_subspaces() -> None:
    previous = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]  # earlier tasks span e1, e2
    # A_prev A_t^T = [[0.5], [-2]]: |0.5| + |-2|
    assert _layer(previous, [[0.5, -2.0, 3.0]]).orthogonality().item() == 2.5
    # [[1, 0], [1, -1]]: 1 + 0 + 1 + 1
    assert _layer(previous, [[1.0, 1.0, 0.0], [0.0, -1.0, 2.0]]).orthogonality().item() == 3.0
    assert _layer(previous, [[0.0, 0.0, 3.0]]).orthogonality().item() == 0.0  # e3: orthogonal to both
    assert _layer([], [[0.5, -2.0, 3.0]]).orthogonality().item() == 0.0  # the first task has nothing to avoid


def test_loss_adds_weighted_penalty_and_l2_of_the_new_lora() -> None:
    model = tiny_llava()
    method = OLoRA(rank=2, orthogonal_weight=0.5, l2_weight=0.1)
    ctx = context(model)
    method.before_task(ctx)
    _train_stand_in(model, seed=1)
    method.after_task(ctx)
    ctx = context(model, index=1)
    method.before_task(ctx)
    _train_stand_in(model, seed=2)
    total = method.loss(ctx, {}, None, torch.tensor(1.0))
    orthogonal, l2 = 0.0, 0.0
    for name, layer in olora_layers(model.llm).items():  # by hand, elementwise, from the method's own copies
        a_prev, a_new = method.previous[name][0].tolist(), layer.lora_a.tolist()
        orthogonal += sum(abs(sum(p * q for p, q in zip(row, new))) for row in a_prev for new in a_new)
        l2 += sum(v * v for row in a_new for v in row) ** 0.5
        l2 += sum(v * v for row in layer.lora_b.tolist() for v in row) ** 0.5
    assert orthogonal > 0.1
    assert total.item() == pytest.approx(1.0 + 0.5 * orthogonal + 0.1 * l2, rel=1e-5)
    assert ctx.log["olora_orthogonal_last"] == pytest.approx(orthogonal, rel=1e-5)


def test_earlier_loras_are_frozen_and_the_forward_pass_adds_every_task_update() -> None:
    model, batch = tiny_llava(), image_batch()
    w0 = model.llm.blocks[0].attn.qkv.weight.detach().clone()
    b0 = model.llm.blocks[0].attn.qkv.bias.detach().clone()
    method = OLoRA(rank=2, alpha=4.0, dropout=0.0)
    ctx = context(model)
    method.before_task(ctx)
    _train_stand_in(model, seed=1)
    first = model.llm.blocks[0].attn.qkv
    a1, b1 = first.lora_a.detach().clone(), first.lora_b.detach().clone()
    method.after_task(ctx)
    assert type(model.llm.blocks[0].attn.qkv) is torch.nn.Linear  # merged between tasks

    method.before_task(context(model, index=1))
    _train_stand_in(model, seed=2)
    layer = model.llm.blocks[0].attn.qkv
    assert isinstance(layer, OLoRALinear) and layer.previous_a.shape == (2, 32)
    assert (layer.base.weight - w0).abs().max() <= 1e-6  # the first LoRA was taken back out of W
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(4))
    scale = 4.0 / 2
    expected = x @ w0.t() + b0 + scale * (x @ a1.t() @ b1.t()) + scale * (x @ layer.lora_a.t() @ layer.lora_b.t())
    assert (layer(x) - expected).abs().max() <= 1e-5

    model.train()
    batch_loss(model, batch).backward()
    for current in olora_layers(model.llm).values():
        assert current.previous_a.grad is None and current.previous_b.grad is None
        assert not current.previous_a.requires_grad and not current.base.weight.requires_grad
        assert current.lora_a.grad.abs().sum() > 0 and current.lora_b.grad.abs().sum() > 0
    assert model.llm.lm_head.weight.grad is None and model.projector[0].weight.grad is not None


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_two_tasks_through_the_hooks_save_and_reload_as_evaluated(arch: str, tmp_path: Path) -> None:
    model, batch = tiny_llava(arch), image_batch()
    method = OLoRA()  # defaults: rank d / 32 = 1, alpha 2 rank
    for index in range(2):
        ctx = context(model, index=index)
        start = logits(model, batch)
        method.before_task(ctx)
        assert ctx.log["olora_rank"] == 1
        assert all(layer.scale == 2.0 for layer in olora_layers(model.llm).values())
        assert (logits(model, batch) - start).abs().max() <= 1e-5  # B = 0; W taken apart and put back: rounding
        model.train()  # live dropout falls on the earlier LoRAs' input too (as in the authors' code)
        assert ((logits(model, batch) - start).abs().max() > 1e-3) == (index > 0)
        model.eval()
        _train_stand_in(model, seed=index)
        adapted = logits(model, batch)
        assert (adapted - start).abs().max() > 1e-2
        method.after_task(ctx)
        assert not olora_layers(model.llm) and ctx.log["olora_rank_total"] == index + 1
        in_memory = logits(model, batch)
        assert (in_memory - adapted).abs().max() <= 1e-5
        save_llava(model, tmp_path / f"task_{index}")
        assert torch.equal(logits(load_llava(tmp_path / f"task_{index}").eval(), batch), in_memory)


def test_a_replayed_task_with_untrained_adapters_is_an_error() -> None:
    model = tiny_llava()
    method, ctx = OLoRA(), context(model)
    method.before_task(ctx)
    with pytest.raises(OLoRAResumeError, match="cannot resume"):
        method.after_task(ctx)


@pytest.mark.parametrize("options", [dict(rank=0), dict(alpha=0.0), dict(dropout=1.0), dict(orthogonal_weight=-1.0),
                                     dict(l2_weight=-0.1)])
def test_bad_options_are_refused(options: dict) -> None:
    with pytest.raises(ValueError, match="olora"):
        OLoRA(**options)


def test_a_continual_run_saves_the_model_it_evaluates(world: Path, init_model: Path, tmp_path: Path) -> None:
    assert REGISTRY["olora"] is OLoRA
    tasks = [TaskSpec(name=t, train=str(world / f"tasks/{t}/train.json"), test=str(world / f"tasks/{t}/test.json"),
                      image_folder=str(world)) for t in ("color", "count")]
    cfg = StageConfig(stage="continual", out_dir=str(tmp_path / "run"), init=str(init_model), tasks=tasks,
                      template="pythia", max_len=200, methods=["olora"], method_options={"olora": {"rank": 2}},
                      eval=EvalSpec(nl_files=[str(world / "nl/facts_mc.jsonl")], nl_limit=4, vl_limit=4,
                                    batch_size=8, max_new_tokens=2),
                      train=TrainConfig(steps=2, global_batch_size=4, micro_batch_size=4, lrs={"": 1e-2},
                                        log_every=1, device="cpu", resume=True))
    last = run_stage(cfg)
    results = json.loads((tmp_path / "run/results.json").read_text())
    logs = [after["method_log"] for after in results["after_task"]]
    assert [log["olora_rank_total"] for log in logs] == [2, 4]
    assert logs[0]["olora_orthogonal_last"] == 0.0 < logs[1]["olora_orthogonal_last"]
    model, tokenizer, reload = load_init(replace(cfg, init=str(last)))
    scores = evaluate_model(model, tokenizer, reload)
    assert scores == {k: v for k, v in results["after_task"][-1].items() if k not in ("method_log", "seconds")}

    shutil.rmtree(tmp_path / "run/task_2_count")  # interrupted in task 2: task 1's merged model cannot resume it
    with pytest.raises(OLoRAResumeError, match="cannot resume"):
        run_stage(cfg)
