"""The training loop on a tiny regression model: exact resume, non-finite loss, loss terms, accumulation, log."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mllm_cl.optim import lr_at
from mllm_cl.run_state import load_checkpoint
from mllm_cl.config import TrainConfig
from mllm_cl.trainer import NonFiniteLossError, Trainer, input_tokens


class Block(nn.Module):
    def __init__(self, d: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(F.gelu(self.fc(x)))


class TinyModel(nn.Module):
    def __init__(self, dropout: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(4, 16)
        self.blocks = nn.ModuleList(Block(16, dropout) for _ in range(2))
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x.to(self.inp.weight.dtype))
        for block in self.blocks:
            x = block(x)
        return self.head(x).float()


def _dataset(n: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(42)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, :1] - 0.5 * x[:, 1:2]).sin()
    mask = (torch.rand(n, generator=g) > 0.3).float()  # per-sample "supervised" flag, like a label mask
    mask[:4] = 1.0
    return {"x": x, "y": y, "mask": mask}


def batches_fn(micro: int, n: int = 32):
    data = _dataset(n)

    def batches(epoch: int) -> list[dict[str, torch.Tensor]]:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))  # same list for the same epoch
        return [{k: v[order[i:i + micro]] for k, v in data.items()} for i in range(0, n, micro)]

    return batches


def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    err = ((model(batch["x"]) - batch["y"]) ** 2).squeeze(-1)
    n = batch["mask"].sum()
    return (err * batch["mask"]).sum() / n.clamp(min=1), n


def _config(**kw) -> TrainConfig:
    base = dict(steps=6, global_batch_size=8, micro_batch_size=4, lrs={"head.": 3e-2, "": 1e-2}, weight_decay=0.1,
                warmup_ratio=0.2, log_every=2, save_every=2, precision="fp32", device="cpu")
    return TrainConfig(**{**base, **kw})


def _train(out_dir: Path, term=None, model=None, micro: int = 4, **kw) -> tuple[TinyModel, Trainer]:
    """Train TinyModel; `term(trainer, loss) -> loss` changes each micro-batch's loss (as a CL method's term)."""
    model = model or TinyModel()

    def loss_with_term(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        loss, n = loss_fn(model, batch)
        return (term(trainer, loss) if term else loss), n

    trainer = Trainer(model, loss_with_term, batches_fn(micro), _config(micro_batch_size=micro, **kw), out_dir)
    trainer.fit()
    return model, trainer


def interrupt_at(step: int):
    def term(trainer: Trainer, loss: torch.Tensor) -> torch.Tensor:
        if trainer.step == step:
            raise KeyboardInterrupt
        return loss

    return term


def _assert_equal_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert x.dtype == y.dtype and torch.equal(x, y), name


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_is_exact(tmp_path: Path, precision: str) -> None:
    # 6 steps of 2 micro-batches, 8 micro-batches per epoch; the checkpoint of step 4 sits at the
    # very end of epoch 0, so the resumed run must first move on to epoch 1
    full, _ = _train(tmp_path / "full", precision=precision)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "cut", term=interrupt_at(5), precision=precision)  # dies in step 6
    state = json.loads((tmp_path / "cut/checkpoint/state.json").read_text())
    assert (state["step"], state["epoch"], state["index"]) == (4, 0, 8)
    resumed, trainer = _train(tmp_path / "cut", model=TinyModel(seed=1), resume=True, precision=precision)
    assert trainer.step == 6 and trainer.epoch == 1
    _assert_equal_weights(full, resumed)
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut/log.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]
    full_log = (tmp_path / "full/log.jsonl").read_text().splitlines()
    resumed_log = (tmp_path / "cut/log.jsonl").read_text().splitlines()
    assert [json.loads(a)["loss"] for a in full_log] == [json.loads(b)["loss"] for b in resumed_log]


def test_resume_refuses_changed_settings_and_fresh_run_refuses_old_checkpoint(tmp_path: Path) -> None:
    _train(tmp_path, steps=2)
    with pytest.raises(FileExistsError, match="resume=True"):
        _train(tmp_path, steps=2)
    _, trainer = _train(tmp_path, steps=2, resume=True)  # already complete: nothing more to do
    assert trainer.step == 2 and trainer.last_record["step"] == 2
    with pytest.raises(ValueError, match="weight_decay"):
        _train(tmp_path, steps=2, resume=True, weight_decay=0.0)


def test_activation_checkpointing_gives_the_same_run(tmp_path: Path) -> None:
    plain, _ = _train(tmp_path / "plain", steps=3)
    checkpointed, _ = _train(tmp_path / "ckpt", steps=3, activation_checkpointing=True)
    for (name, x), y in zip(plain.state_dict().items(), checkpointed.state_dict().values()):
        assert torch.allclose(x, y, rtol=0, atol=1e-6), name
    assert "forward" not in checkpointed.blocks[0].__dict__  # switched off again after fit()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    def poison(trainer, loss):
        return loss * float("nan") if trainer.step == 2 else loss

    model = TinyModel()
    with pytest.raises(NonFiniteLossError, match=r"step 3: the loss is nan.*checkpoint") as info:
        _train(tmp_path, term=poison, model=model)
    assert str(tmp_path / "checkpoint") in str(info.value)
    saved = load_checkpoint(tmp_path / "checkpoint")
    assert saved["state"]["step"] == 2
    for name, p in model.named_parameters():  # the poisoned step was never applied
        assert torch.equal(saved["weights"][name], p), name


def test_a_non_finite_loss_with_finite_gradients_is_not_applied_either(tmp_path: Path) -> None:
    def inf_constant(trainer, loss):  # +inf that carries no gradient: only the loss shows it
        return loss + torch.tensor(float("inf")) if trainer.step == 2 else loss

    model = TinyModel()
    with pytest.raises(NonFiniteLossError, match=r"step 3: the loss is inf"):
        _train(tmp_path, term=inf_constant, model=model)
    saved = load_checkpoint(tmp_path / "checkpoint")
    assert saved["state"]["step"] == 2
    for name, p in model.named_parameters():
        assert torch.equal(saved["weights"][name], p), name


def test_a_loss_term_changes_the_gradient(tmp_path: Path) -> None:
    def l2(trainer, loss):  # adds 0.5 * ||head.weight||^2, whose gradient is head.weight itself
        return loss + 0.5 * trainer.model.head.weight.pow(2).sum()

    grads, weights = [], []
    for name, term in (("plain", None), ("l2", l2)):
        model = TinyModel()
        weights.append(model.head.weight.detach().clone())
        model.head.weight.register_hook(lambda grad: grads.append(grad.clone()))  # the step's one backward
        _train(tmp_path / name, term=term, model=model, steps=1, global_batch_size=4)
    assert len(grads) == 2 and torch.equal(weights[0], weights[1])
    assert torch.allclose(grads[1] - grads[0], weights[0], atol=1e-6)


def test_gradient_accumulation_equals_one_big_batch(tmp_path: Path) -> None:
    # micro-batches hold different numbers of supervised samples: the step must weight them by count
    kw = dict(steps=3, global_batch_size=16, warmup_ratio=0.0)
    accumulated, _ = _train(tmp_path / "acc", model=TinyModel(dropout=0.0), micro=4, **kw)
    big, _ = _train(tmp_path / "big", model=TinyModel(dropout=0.0), micro=16, **kw)
    for (name, x), y in zip(accumulated.state_dict().items(), big.state_dict().values()):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6), name
    logs = [[json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
            for run in ("acc", "big")]
    for a, b in zip(*logs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["tokens"] == b["tokens"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    naive, _ = _train(tmp_path / "naive", model=TinyModel(dropout=0.0), micro=16, **kw)
    assert torch.equal(naive.head.weight, big.head.weight)  # and the comparison is deterministic


def test_log_has_the_documented_fields(tmp_path: Path, capsys) -> None:
    _train(tmp_path, steps=5)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 5]
    fields = {"step", "total_steps", "epoch", "loss", "lr", "lrs", "grad_norm", "tokens", "tokens_per_s",
              "input_tokens_per_s", "elapsed_s", "eta_s", "gpu_mem_gib", "loss_scale", "skipped_steps"}
    for r in records:
        assert set(r) == fields
        assert r["total_steps"] == 5 and r["loss"] > 0 and r["tokens_per_s"] > 0 and r["gpu_mem_gib"] is None
        assert r["input_tokens_per_s"] is None  # these batches have no input_ids
        assert r["lrs"]["head."] == pytest.approx(lr_at(r["step"] - 1, 5, 3e-2, 0.2))
        assert r["lr"] == r["lrs"]["head."] and r["skipped_steps"] == 0 and r["loss_scale"] == 1.0
    epoch_1 = batches_fn(4)(1)
    assert records[-1]["eta_s"] == 0
    assert records[-1]["tokens"] == _dataset()["mask"].sum() + epoch_1[0]["mask"].sum() + epoch_1[1]["mask"].sum()
    out = capsys.readouterr().out
    assert "step 2/5 | loss " in out and "tok/s | eta " in out


def test_tok_per_s_counts_the_tokens_the_model_reads(tmp_path: Path, capsys) -> None:
    """A LLaVA batch supervises a few answer tokens but feeds the model every unpadded position: the progress line
    reports both, and their ratio is that of the counts."""
    data = _dataset(16)
    mask = torch.ones(16, 12, dtype=torch.long)
    mask[::2, 9:] = 0  # every other sample padded after 9 positions
    data |= {"input_ids": torch.zeros(16, 12, dtype=torch.long), "attention_mask": mask}

    def batches(epoch: int) -> list[dict[str, torch.Tensor]]:
        return [{k: v[i:i + 4] for k, v in data.items()} for i in range(0, 16, 4)]

    trainer = Trainer(TinyModel(), loss_fn, batches, _config(steps=2, log_every=1), tmp_path)
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    for step, r in enumerate(records):
        rows = slice(8 * step, 8 * step + 8)
        expected = float(mask[rows].sum()) / float(data["mask"][rows].sum())
        assert r["input_tokens_per_s"] / r["tokens_per_s"] == pytest.approx(expected, rel=1e-9)
    assert "tok/s (" in capsys.readouterr().out
    assert input_tokens({"input_ids": torch.zeros(2, 5)}) == 10 and input_tokens([torch.zeros(3)]) == 0


def test_no_supervised_tokens_or_no_batches_is_an_error(tmp_path: Path) -> None:
    def no_tokens(model, batch):
        return model(batch["x"]).sum() * 0, 0

    trainer = Trainer(TinyModel(), no_tokens, batches_fn(4), _config(), tmp_path / "a")
    with pytest.raises(ValueError, match="no supervised token"):
        trainer.fit()
    trainer = Trainer(TinyModel(), loss_fn, lambda epoch: [], _config(), tmp_path / "b")
    with pytest.raises(ValueError, match="nothing to train on"):
        trainer.fit()


def test_resume_survives_a_cut_log_line_and_removes_a_killed_save(tmp_path: Path) -> None:
    full, _ = _train(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "cut", term=interrupt_at(5))
    with open(tmp_path / "cut/log.jsonl", "a") as log:
        log.write('{"step": 6, "loss": 0.1')  # a kill in the middle of a log write
    (tmp_path / "cut/.checkpoint.k1ll3d.tmp").mkdir()  # a save killed before its swap
    resumed, trainer = _train(tmp_path / "cut", model=TinyModel(seed=1), resume=True)
    _assert_equal_weights(full, resumed)
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut/log.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6] and not (tmp_path / "cut/.checkpoint.k1ll3d.tmp").exists()


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint_and_says_so(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    from safetensors import SafetensorError

    import mllm_cl.run_state as run_state
    from mllm_cl.model_folder import ModelFolderError

    real_save = run_state.save_file
    saves = []

    def filling_disk(tensors, path):  # the second checkpoint finds the disk full
        saves.append(path)
        if sum("weights" in p for p in saves) > 1:
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                                  "\"No space left on device\" })")
        real_save(tensors, path)

    monkeypatch.setattr(run_state, "save_file", filling_disk)
    with pytest.raises(ModelFolderError, match=rf"cannot write {tmp_path / 'checkpoint'}: .*No space left on device.*; "
                                               rf"the previous {tmp_path / 'checkpoint'} is kept as it was"):
        _train(tmp_path, steps=4, save_every=2)
    assert load_checkpoint(tmp_path / "checkpoint")["state"]["step"] == 2  # whole, and resumable
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".checkpoint")] == []  # no half copy left


def test_a_micro_batch_that_processes_cannot_share_is_made_smaller_and_said(capsys) -> None:
    from mllm_cl.config import ConfigError
    from mllm_cl.trainer import micro_batch_for

    fits = _config(global_batch_size=8, micro_batch_size=4)
    assert micro_batch_for(fits, 2) is fits and capsys.readouterr().out == ""
    assert micro_batch_for(_config(global_batch_size=8, micro_batch_size=8), 2).micro_batch_size == 4
    assert "micro_batch_size 8 -> 4: global_batch_size=8 is shared by 2 processes, 4 samples each" in \
        capsys.readouterr().out
    assert micro_batch_for(_config(global_batch_size=24, micro_batch_size=8), 2).micro_batch_size == 6
    assert micro_batch_for(_config(global_batch_size=12, micro_batch_size=12), 4).micro_batch_size == 3
    with pytest.raises(ConfigError, match="global_batch_size=9 cannot be shared by 2 processes: make it a multiple"):
        micro_batch_for(_config(global_batch_size=9, micro_batch_size=3), 2)
