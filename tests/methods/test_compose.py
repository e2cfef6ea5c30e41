"""Composing CL methods by name: expansion, order, option errors, Soft Targets' hook, and a two-task loop that
runs every hook of a large composition on a real (tiny) LlavaModel."""

import pytest
import torch
import torch.nn.functional as F
from tiny_llava import PAD, context, endless_inquiries, image_batch, tiny_llava

from mllm_cl.config import IGNORE_INDEX, ConfigError
from mllm_cl.data import collate
from mllm_cl.llm import LMOutput
from mllm_cl.losses import causal_lm_loss
from mllm_cl.methods import METHOD_NAMES, Method, build_methods
from mllm_cl.methods.lora import LoRA
from mllm_cl.methods.rehearsal import Rehearsal
from mllm_cl.methods.soft_targets import SoftTargets


def test_msgm_with_rehearsal_expands_to_lora_soft_targets_rehearsal_in_hook_order() -> None:
    methods = build_methods(["msgm", "rehearsal"])
    assert [type(m) for m in methods] == [LoRA, SoftTargets, Rehearsal]
    assert [m.name for m in build_methods(["rehearsal", "msgm"])] == ["lora", "rehearsal", "soft_targets"]
    assert [m.name for m in build_methods(["lora", "msgm", "lora"])] == ["lora", "soft_targets"]  # no duplicates
    assert [m.name for m in build_methods(["ewc", "sac", "msgm"])] == ["lora", "soft_targets", "sac", "ewc"]


def test_every_listed_name_builds_and_naive_does_nothing() -> None:
    for name in METHOD_NAMES:
        assert build_methods([name])
    (naive,) = build_methods(["naive"])
    assert type(naive) is Method
    model = tiny_llava()
    ctx, loss = context(model), torch.tensor(1.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    naive.before_task(ctx)
    assert naive.loss(ctx, {}, None, loss) is loss
    naive.after_task(ctx)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_llava_c_is_lora_then_uir_then_sac_with_paper_2s_lora() -> None:
    lora, uir, sac = build_methods(["llava_c"], {"lora": {"rank": 4, "alpha": 8.0, "rslora": False},
                                                 "sac": {"alpha": 0.2}})
    assert [type(m).__name__ for m in (lora, uir, sac)] == ["LoRA", "UIR", "SACMethod"]
    assert (lora.rank, lora.alpha, lora.rslora, sac.alpha, sac.rule) == (4, 8.0, False, 0.2, "nuclear")
    assert "llava_c" in METHOD_NAMES


def test_options_reach_the_parts_of_a_composite() -> None:
    lora, soft = build_methods(["msgm"], {"lora": {"rank": 4, "alpha": 16.0}, "soft_targets": {"a": 0.1}})
    assert (lora.rank, lora.alpha, soft.a) == (4, 16.0, 0.1)


def test_unknown_names_and_misplaced_options_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown CL method 'sgm'; known: naive, lora"):
        build_methods(["sgm"])
    with pytest.raises(ValueError, match=r"options given for method\(s\) \['ewc'\] that are not in methods"):
        build_methods(["lora"], {"ewc": {"weight": 1.0}})
    with pytest.raises(ValueError, match="under its parts' names"):
        build_methods(["msgm"], {"msgm": {"a": 0.1}})
    with pytest.raises(ValueError, match=r"method_options\['lora'\].*lora takes only rank, alpha, dropout, rslora"):
        build_methods(["lora"], {"lora": {"r": 8}})
    with pytest.raises(ValueError, match="soft_targets.a must be in"):
        build_methods(["soft_targets"], {"soft_targets": {"a": 1.0}})


def test_soft_targets_loss_hook_gives_label_smoothing_with_eps_a_n_over_n_minus_1() -> None:
    ctx = context(tiny_llava())
    method = build_methods(["soft_targets"], {"soft_targets": {"a": 0.1}})[0]
    assert method.needs_logits
    logits, labels = torch.randn(2, 6, 64), torch.randint(0, 64, (2, 6))
    labels[0, :2] = IGNORE_INDEX
    n = 64
    shifted, targets = logits[:, :-1].reshape(-1, n), labels[:, 1:].reshape(-1)
    keep = targets != IGNORE_INDEX
    expected = F.cross_entropy(shifted[keep], targets[keep], label_smoothing=0.1 * n / (n - 1))
    loss = method.loss(ctx, {"labels": labels}, LMOutput(logits, None, None), causal_lm_loss(logits, labels))
    assert torch.allclose(loss, expected, atol=1e-6)


def _samples(task: int) -> list[dict]:
    """Six text samples and one image sample of a task; ids in a task-specific range."""
    batch = image_batch(seed=task)
    rows = [[1, 10 * task + i, 10 * task + i + 1, 10 * task + i + 2, 2] for i in range(6)]
    samples = [{"input_ids": torch.tensor(r), "labels": torch.tensor(r), "pixel_values": None} for r in rows]
    samples.append({"input_ids": batch["input_ids"][1], "labels": batch["labels"][1],
                    "pixel_values": batch["pixel_values"][0]})
    return samples


def test_a_two_task_loop_runs_every_hook_of_a_large_composition() -> None:
    """The continual stage's order: start state, frozen copy, before_task, steps with each loss hook, after_task."""
    model = tiny_llava()
    plain_keys = set(model.state_dict())
    vision = {k: v.clone() for k, v in model.vision.state_dict().items()}
    methods = build_methods(["msgm", "rehearsal", "uir", "lwf", "ewc", "sac"],
                            {"rehearsal": {"share": 0.2}, "ewc": {"fisher_batches": 2}, "sac": {"alpha": 0.5}})
    assert [m.name for m in methods] == ["lora", "soft_targets", "rehearsal", "uir", "lwf", "sac", "ewc"]
    replayed = []
    for index in range(2):
        ctx = context(model, index=index, name=f"task{index}", inquiry_batches=lambda: endless_inquiries([[3, 4, 5]]),
                      loss_fn=lambda m, b: causal_lm_loss(m(b["input_ids"], attention_mask=b["attention_mask"],
                                                             pixel_values=b["pixel_values"]).logits, b["labels"]))
        ctx.train_samples = _samples(index)
        ctx.task_batches = lambda n, ctx=ctx: (collate(ctx.train_samples[i:i + 2], PAD) for i in range(0, 2 * n, 2))
        ctx.take_start_state()
        ctx.snapshot_previous()
        for method in methods:
            method.before_task(ctx)
        replayed.append(ctx.log["rehearsal_replayed"])
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        model.train()
        for step in range(2):
            batch = collate(ctx.train_samples[3 * step:3 * step + 4], PAD)
            output = model(batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])
            loss = causal_lm_loss(output.logits, batch["labels"])
            for method in methods:
                loss = method.loss(ctx, batch, output, loss)
            assert torch.isfinite(loss)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        for method in methods:
            method.after_task(ctx)
        assert set(model.state_dict()) == plain_keys
        assert ctx.log["lora_merged_layers"] == 8
        assert "uir_last" in ctx.log and "lwf_last" in ctx.log and ctx.log["ewc_fisher_mean"] > 0
        assert ("ewc_last" in ctx.log) == (index == 1)  # the penalty starts with the second task
    assert replayed == [0, 1]  # 20% of task 0's 7 samples joined task 1
    assert all(torch.equal(v, vision[k]) for k, v in model.vision.state_dict().items())


@pytest.mark.parametrize("options, message", [
    ({"lora": {"rank": -1}}, "lora.rank must be a positive integer"),
    ({"lora": {"rank": 0}}, "lora.rank must be a positive integer"),
    ({"lora": {"rank": "four"}}, "method_options['lora'].rank: expected an integer, got 'four'"),
    ({"lora": {"dropout": 1.0}}, "lora.dropout in [0, 1)"),
    ({"ewc": {"weight": float("nan")}}, "method_options['ewc'].weight must be a finite number, got nan"),
    ({"ewc": {"weight": -1.0}}, "ewc needs weight >= 0"),
    ({"ewc": {"fisher_batches": 0}}, "fisher_batches >= 1"),
    ({"uir": {"weight": float("inf")}}, "method_options['uir'].weight must be a finite number, got inf"),
    ({"rehearsal": {"share": 2.0}}, "rehearsal.share must be in [0, 1]"),
    ({"lwf": {"temperature": 0.0}}, "temperature > 0"),
])
def test_method_options_are_checked_by_type_and_range(options, message) -> None:
    with pytest.raises(ConfigError) as error:
        build_methods(list(options), options)
    assert message in str(error.value)


def test_uir_without_inquiries_is_refused_before_the_model_loads(tmp_path) -> None:
    from mllm_cl.config import StageConfig, StageError, TaskSpec
    from mllm_cl.continual import run_continual

    cfg = StageConfig(stage="continual", init=str(tmp_path / "no-such-model"), out_dir=str(tmp_path / "out"),
                      tasks=[TaskSpec(name="t", train="a.json", test="b.json")], methods=["llava_c"])
    with pytest.raises(StageError, match="uir needs text-only inquiries: set `inquiries`"):
        run_continual(cfg)  # the missing init would be the error if the model were loaded first
    assert not (tmp_path / "out").exists()
