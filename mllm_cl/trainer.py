"""The one training loop: mixed precision, gradient accumulation, warmup + cosine AdamW, checkpoints, resume.

    fit():  for each optimizer step:
                for each micro-batch:  loss, n_tokens = loss_fn(model, batch); backward
                unscale, clip, AdamW on the fp32 masters, log, checkpoint

Under torchrun (`train.distributed`, `mllm_cl.parallel`) each of the W ranks takes global_batch / (micro x W)
micro-batches of every step: step s's global micro-batches are those a one-process run takes, rank r the
r-th consecutive share of them. Token counts are summed over the ranks, so the step's gradient is the same
token-weighted mean, and randomness inside a micro-batch (LoRA dropout) is keyed by the micro-batch's place
in the epoch, not by the rank: one process without an engine, 1 rank x 8 micro-batches and 2 ranks x 4 train
the same model. Rank 0 writes the log and the checkpoints.

The loop knows nothing of continual learning: a CL method changes the loss through `loss_fn`, which the
continual stage composes from the methods' hooks (`mllm_cl.methods.base.Method`), and acts before and after
a task around `fit()`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mllm_cl import distributed
from mllm_cl.checkpointing import disable_checkpointing, enable_checkpointing
from mllm_cl.config import RESUMABLE_TRAIN_FIELDS, ConfigError, TrainConfig
from mllm_cl.data import EpochBatches
from mllm_cl.device import resolve_device
from mllm_cl.errors import UserError
from mllm_cl.llm import LanguageModel, compile_blocks, uncompile_blocks
from mllm_cl.losses import LossResult
from mllm_cl.model_folder import remove_stale_staging
from mllm_cl.optim import build_optimizer, embedding_param_names, set_lr
from mllm_cl.parallel import Engine, blocks_of, full_tensor, shard_like
from mllm_cl.precision import MixedPrecision, resolve_dtype
from mllm_cl.run_state import (CHECKPOINT_DIR, find_checkpoint, load_checkpoint, load_optimizer_state,
                               optimizer_state, save_checkpoint, set_rng_state)
from mllm_cl.seeding import derive_seed, seed_everything

LOG_FILE = "log.jsonl"


class NonFiniteLossError(UserError, RuntimeError):
    """The loss (or, without loss scaling, the gradient) became inf/nan; the last good checkpoint is kept."""


LossFn = Callable[[nn.Module, Any], LossResult]  # (mean loss, how many tokens or samples it averages over, ...)
BatchesFn = Callable[[int], Sequence[Any]]


def micro_batch_for(cfg: TrainConfig, world: int) -> TrainConfig:
    """`cfg` with a micro batch that `world` processes can share: each process takes the same number of
    micro-batches of every step, so global_batch_size must divide by micro_batch_size x world. When it does not
    but the global batch divides by `world`, the largest micro batch <= the given one that does is chosen (and
    said); a step then sees the same samples, in smaller micro-batches. Otherwise ConfigError."""
    if cfg.global_batch_size % (cfg.micro_batch_size * world) == 0:
        return cfg
    if cfg.global_batch_size % world:
        raise ConfigError(f"global_batch_size={cfg.global_batch_size} cannot be shared by {world} processes: make it a "
                          f"multiple of {world}")
    micro = next(m for m in range(cfg.micro_batch_size, 0, -1) if cfg.global_batch_size % (m * world) == 0)
    print(f"micro_batch_size {cfg.micro_batch_size} -> {micro}: global_batch_size={cfg.global_batch_size} is shared "
          f"by {world} processes, {cfg.global_batch_size // world} samples each", flush=True)
    return replace(cfg, micro_batch_size=micro)


class Trainer:
    """Trains `model` on `loss_fn(model, batch) -> LossResult(loss, n_tokens)` over `batches_fn(epoch)`.

    `loss` is the mean over the micro-batch's `n_tokens` supervised tokens (or samples); the step's
    loss is their token-weighted mean, so accumulating micro-batches equals one large batch.
    `batches_fn(epoch)` returns a sequence (len + indexing) of micro-batches, the same every time
    it is called with the same epoch: a resume re-reads it from the saved position. Trailing
    micro-batches that do not fill an optimizer step are dropped. Tensors in a batch (also inside
    dicts, lists, tuples) are moved to the device.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, batches_fn: BatchesFn, config: TrainConfig,
                 out_dir: str | Path = "runs/train") -> None:
        self.model, self.loss_fn, self.batches_fn = model, loss_fn, batches_fn
        self.config, self.out_dir = config, Path(out_dir)
        self.device = resolve_device(config.device)
        self.step = 0  # optimizer steps taken
        self.epoch, self.index = 0, 0  # data position: the next micro-batch is batches_fn(epoch)[index]
        self.tokens = 0  # supervised tokens trained on
        self.total_steps = 0
        self.precision: MixedPrecision | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.checkpoint_path: Path | None = None  # the last checkpoint written or resumed from
        self.last_record: dict[str, Any] = {}
        self.engine: Engine | None = None
        self.world, self.rank = 1, 0  # processes sharing each step, and which one this is

    # ---------------------------------------------------------------- set-up

    def fit(self) -> dict[str, Any]:
        """Run the whole task; returns the last log record."""
        cfg = self.config
        kind = distributed.engine(cfg.distributed)
        self.world, self.rank = distributed.world_size(), distributed.rank()
        if cfg.global_batch_size % (cfg.micro_batch_size * self.world):
            raise ConfigError(f"global_batch_size={cfg.global_batch_size} must be a multiple of micro_batch_size="
                              f"{cfg.micro_batch_size} x {self.world} processes: each process takes the same number "
                              "of micro-batches of every step")
        # a save that was killed before its swap
        distributed.on_main(lambda: remove_stale_staging(self.out_dir / CHECKPOINT_DIR))
        existing = find_checkpoint(self.out_dir)
        if existing is not None and not cfg.resume:
            raise FileExistsError(f"{existing} holds a checkpoint of an earlier run: set resume=True to continue "
                                  f"it, or use another out_dir (or delete {self.out_dir}) to start afresh")
        seed_everything(cfg.seed)
        self.model.to(self.device)
        self.model.train()
        dtype = resolve_dtype(cfg.precision, self.device)
        no_decay = () if cfg.decay_embeddings else embedding_param_names(self.model)
        if kind == "fsdp":  # the shards are the masters: shard first, then keep no copies
            if cfg.compile:
                raise ConfigError("train.compile is not supported with train.distributed=fsdp; use ddp, or no compile")
            self.engine = Engine(self.model, self.loss_fn, kind, self.device, dtype)
            self.precision = MixedPrecision(self.model, dtype, sharded=True)
        else:  # DDP reduces the grads of the params as they will be: in the compute dtype
            self.precision = MixedPrecision(self.model, dtype)
            self.engine = Engine(self.model, self.loss_fn, kind, self.device)
        self.optimizer = build_optimizer(self.precision.named_master_params(), cfg.lrs, cfg.weight_decay,
                                         betas=tuple(cfg.betas), no_decay_names=no_decay)
        self.total_steps = cfg.steps or cfg.epochs * (self._epoch_batches(0)[1] // cfg.accumulation)
        blocks = _checkpoint_blocks(self.model) if cfg.activation_checkpointing else []
        enable_checkpointing(blocks)
        llms = [m for m in self.model.modules() if isinstance(m, LanguageModel)] if cfg.compile else []
        for llm in llms:
            compile_blocks(llm, cfg.compile)
        try:
            if existing is not None:
                self._resume(existing)
            else:
                self._start_log()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            self._loop()
            self.engine.finish()
            self.precision.release()  # the model leaves in full precision: fp32 masters, original frozen weights
        finally:
            self.engine = None
            disable_checkpointing(blocks)
            for llm in llms:
                uncompile_blocks(llm)
        return self.last_record

    def _epoch_batches(self, epoch: int) -> tuple[Sequence[Any], int]:
        batches = self.batches_fn(epoch)
        n = len(batches)
        if n < self.config.accumulation:
            raise ValueError(f"epoch {epoch} has {n} micro-batch(es), fewer than one optimizer step needs "
                             f"(global_batch_size / micro_batch_size = {self.config.accumulation}): "
                             "nothing to train on; check the data files and batch sizes")
        return batches, n

    # ---------------------------------------------------------------- the loop

    def _loop(self) -> None:
        cfg, accumulation = self.config, self.config.accumulation
        batches, n_batches = self._epoch_batches(self.epoch)
        start_time, start_step = time.perf_counter(), self.step
        interval = _new_interval(start_time)
        while self.step < self.total_steps:
            if self.index + accumulation > n_batches:
                self.epoch, self.index = self.epoch + 1, 0
                batches, n_batches = self._epoch_batches(self.epoch)
            set_lr(self.optimizer, self.step, self.total_steps, cfg.warmup_ratio, cfg.min_lr_ratio)
            loss_sum, n_step, reference, seen = self._accumulate(batches)
            # the loss is read at the step's host sync for the gradient norm; a non-finite one skips the step.
            # The engine's reduction averaged the ranks' grads: x world makes it their sum.
            result = self.precision.step(self.optimizer, cfg.max_grad_norm,
                                         grad_multiplier=self.world * reference / n_step, loss=loss_sum)
            loss = result.loss / n_step
            if not math.isfinite(loss):
                raise NonFiniteLossError(f"step {self.step + 1}: the loss is {loss}; training stopped. "
                                         f"{self._last_good()}")
            if not result.taken and not self.precision.dynamic:
                raise NonFiniteLossError(f"step {self.step + 1}: the loss is {loss:.4f} but the gradient norm is "
                                         f"{result.grad_norm}; training stopped. {self._last_good()}")
            self.step += 1
            self.index += accumulation
            self.tokens += int(n_step)
            interval["loss"] += result.loss
            interval["tokens"] += n_step
            interval["input_tokens"] += seen
            interval["grad_norm"] += result.grad_norm if result.taken else 0.0
            interval["steps"] += 1
            if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                self._log(interval, result.scale, start_time, start_step)
                interval = _new_interval(time.perf_counter())
            if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == self.total_steps:
                self.save()

    def _accumulate(self, batches: Sequence[Any]) -> tuple[torch.Tensor, float, float, float]:
        """Forward + backward over one step's micro-batches; returns (sum of n_i loss_i as a 0-dim tensor, N, R,
        the input tokens the model read: `input_tokens`), summed over the ranks.

        Micro-batch i is back-propagated with weight n_i / R, R = (tokens of the first one) x
        accumulation, a guess of the step's total N fixed before any backward; `precision.step`
        then multiplies the grads by R / N, so the step's grad is that of sum_i n_i loss_i / N.
        With several ranks R is the same on each: their first micro-batches' tokens, summed, x their count.
        """
        loss_sum = torch.zeros((), device=self.device)
        n_step = reference = seen = 0.0
        share = self.config.accumulation // self.world
        first = self.index + self.rank * share  # this rank's part of the step's global micro-batches
        for i in range(first, first + share):
            last = i == first + share - 1
            torch.manual_seed(derive_seed(self.config.seed, "micro-batch", self.epoch, i))
            seen += input_tokens(batches[i])  # before the copy to the device: no host sync per micro-batch
            batch = _to_device(batches[i], self.device)
            with self.engine.sync(last):
                loss, n_tokens = self.engine(batch)[:2]
                n = float(n_tokens)
                if self.world > 1 and i == first:
                    total = distributed.all_reduce_sum(torch.tensor([n], dtype=torch.float64, device=self.device))
                    reference = float(total) * share or float(share)
                if n == 0:
                    if self.world > 1 and last:  # the step's gradient reduction runs in this backward
                        self.precision.backward(torch.nan_to_num(loss) * 0.0)
                    continue
                if not reference:
                    reference = n * self.config.accumulation
                self.precision.backward(loss * (n / reference))
            loss_sum += loss.detach().float() * n
            n_step += n
        if self.world > 1:
            counts = torch.tensor([n_step, seen], device=self.device)
            totals = distributed.all_reduce_sum(torch.cat([loss_sum.reshape(1), counts]))
            loss_sum, n_step, seen = totals[0], float(totals[1]), float(totals[2])
        if n_step == 0:
            last = self.index + self.config.accumulation - 1
            raise ValueError(f"step {self.step + 1}: micro-batches {self.index}..{last} "
                             f"of epoch {self.epoch} have no supervised token (n_tokens = 0 in each): refusing "
                             "to train on nothing; check the labels/loss mask of these samples")
        return loss_sum, n_step, reference, seen

    # ---------------------------------------------------------------- progress

    def _start_log(self) -> None:
        if not distributed.is_main():
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / LOG_FILE).write_text("")

    def _log(self, interval: dict[str, float], scale: float, start_time: float, start_step: int) -> None:
        now = time.perf_counter()
        elapsed = now - start_time
        seconds_per_step = elapsed / max(1, self.step - start_step)
        group_lrs = {g["prefix"]: g["lr"] for g in self.optimizer.param_groups}
        lrs = {prefix: group_lrs[prefix] for prefix in self.config.lrs if prefix in group_lrs}  # config order
        record = {
            "step": self.step, "total_steps": self.total_steps, "epoch": self.epoch,
            "loss": interval["loss"] / interval["tokens"], "lr": next(iter(lrs.values())), "lrs": lrs,
            "grad_norm": interval["grad_norm"] / interval["steps"], "tokens": self.tokens,
            "tokens_per_s": interval["tokens"] / max(now - interval["time"], 1e-9),
            "input_tokens_per_s": (interval["input_tokens"] / max(now - interval["time"], 1e-9)
                                   if interval["input_tokens"] else None),
            "elapsed_s": elapsed, "eta_s": seconds_per_step * (self.total_steps - self.step),
            "gpu_mem_gib": (torch.cuda.max_memory_allocated(self.device) / 2 ** 30
                            if self.device.type == "cuda" else None),
            "loss_scale": scale, "skipped_steps": self.precision.skipped_steps,
        }
        if self.engine.kind != "none":  # tokens and tokens_per_s are those of all the processes
            record.update(processes=self.world, engine=self.engine.kind)
        self.last_record = record
        if not distributed.is_main():
            return
        with open(self.out_dir / LOG_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        speed = (f"{record['input_tokens_per_s']:,.0f} tok/s ({record['tokens_per_s']:,.0f} supervised)"
                 if record["input_tokens_per_s"] else f"{record['tokens_per_s']:,.0f} tok/s")
        line = (f"step {self.step}/{self.total_steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                f"{speed} | eta {_duration(record['eta_s'])}")
        if record["gpu_mem_gib"] is not None:
            line += f" | mem {record['gpu_mem_gib']:.1f} GiB"
        if self.precision.dynamic:
            line += f" | scale {scale:g} | skipped {record['skipped_steps']}"
        print(line, flush=True)

    # ---------------------------------------------------------------- checkpoints

    def _names(self) -> dict[int, str]:
        return {id(m): name for name, m in self.precision.named_master_params()}

    def save(self) -> Path:
        """Write out_dir/checkpoint (atomically) for the current step."""
        precision_state = self.precision.state_dict()
        state = {"step": self.step, "total_steps": self.total_steps, "epoch": self.epoch, "index": self.index,
                 "tokens": self.tokens, "scaler": precision_state["scaler"], "config": asdict(self.config)}
        # whole tensors: FSDP's shards are gathered (every rank takes part); rank 0 writes them
        weights = {name: full_tensor(p.detach()) for name, p in self.precision.params}
        optimizer_tensors, optimizer_meta = optimizer_state(self.optimizer, self._names())
        optimizer_tensors = {key: full_tensor(t) for key, t in optimizer_tensors.items()}
        self.checkpoint_path = distributed.on_main(lambda: save_checkpoint(
            self.out_dir, weights=weights, masters=precision_state["masters"],
            optimizer=(optimizer_tensors, optimizer_meta), state=state))
        return self.checkpoint_path

    def _resume(self, folder: Path) -> None:
        saved = load_checkpoint(folder)
        state = saved["state"]
        before, now = _comparable(state["config"]), _comparable(asdict(self.config))
        keys = sorted(set(before) | set(now))
        changed = {k: (before.get(k), now.get(k)) for k in keys if before.get(k) != now.get(k)}
        if changed or state["total_steps"] != self.total_steps:
            raise ValueError(f"cannot resume from {folder}: settings differ from the saved run (saved, now): "
                             f"{changed or {'total_steps': (state['total_steps'], self.total_steps)}}; resume "
                             "with the same settings, or start afresh in another out_dir")
        params = dict(self.precision.params)
        weights = saved["weights"]
        if sorted(weights) != sorted(params):
            missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
            raise ValueError(f"cannot resume from {folder}: trainable params missing from it {missing[:5]}, "
                             f"saved but not trainable now {extra[:5]}")
        with torch.no_grad():
            for name, p in params.items():
                if weights[name].shape != p.shape:
                    raise ValueError(f"cannot resume from {folder}: {name!r} has shape {tuple(weights[name].shape)} "
                                     f"there and {tuple(p.shape)} in the model")
                p.copy_(shard_like(weights[name], p))
        self.precision.load_state_dict({"masters": saved["masters"], "scaler": state["scaler"]})
        by_name = dict(self.precision.named_master_params())
        optimizer_tensors = {key: shard_like(t, by_name[key.rsplit("/", 1)[0]]) if t.dim() else t
                             for key, t in saved["optimizer_tensors"].items()}
        load_optimizer_state(self.optimizer, self._names(), optimizer_tensors, saved["optimizer_meta"])
        set_rng_state(state["rng"], saved["rng_tensors"])
        self.step, self.epoch, self.index, self.tokens = state["step"], state["epoch"], state["index"], state["tokens"]
        self.checkpoint_path = folder
        log = self.out_dir / LOG_FILE
        records = [_record(line) for line in (log.read_text(errors="replace").splitlines() if log.is_file() else [])]
        kept = [json.dumps(r) for r in records if r is not None and r.get("step", math.inf) <= self.step]
        distributed.barrier()  # every rank has read the log before rank 0 rewrites it
        if distributed.is_main():
            log.write_text("".join(line + "\n" for line in kept))
        self.last_record = json.loads(kept[-1]) if kept else {}
        print(f"resumed from {folder} at step {self.step}/{self.total_steps} (epoch {self.epoch}, "
              f"micro-batch {self.index})", flush=True)

    def _last_good(self) -> str:
        if self.checkpoint_path is None:
            return "No checkpoint was written yet."
        return f"The last good checkpoint, {self.checkpoint_path}, is kept."


def train_on(model: nn.Module, dataset: Any, loss_fn: LossFn, config: TrainConfig, out_dir: str | Path) -> Trainer:
    """Fit `model` on a map-style dataset in seeded, resumable micro-batch orders (`data.EpochBatches`)."""
    micro, seed = config.micro_batch_size, config.seed
    trainer = Trainer(model, loss_fn, lambda epoch: EpochBatches(dataset, micro, seed, epoch), config, out_dir)
    trainer.fit()
    return trainer


# ---------------------------------------------------------------- helpers

def _record(line: str) -> dict[str, Any] | None:
    """A log line's record, or None for a line a kill cut short (or any other line that is not one)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The settings a resumed run must share with the saved one (logging, saving and device may change)."""
    return {k: v for k, v in config.items() if k not in RESUMABLE_TRAIN_FIELDS}


def _checkpoint_blocks(model: nn.Module) -> list[nn.Module]:
    blocks = blocks_of(model)
    if not blocks:
        raise ValueError("activation_checkpointing=True, but the model has no nn.ModuleList named 'blocks' to "
                         "checkpoint; set activation_checkpointing=False")
    return blocks


def _new_interval(start: float) -> dict[str, float]:
    """What the progress log sums between two of its lines."""
    return {"loss": 0.0, "tokens": 0.0, "input_tokens": 0.0, "time": start, "grad_norm": 0.0, "steps": 0}


def input_tokens(batch: Any) -> int:
    """The token positions a batch feeds the model (image placeholders included, padding not): what "tok/s"
    counts. 0 for a batch without `input_ids`."""
    if not isinstance(batch, dict) or not isinstance(batch.get("input_ids"), torch.Tensor):
        return 0
    mask = batch.get("attention_mask")
    return int(mask.sum()) if isinstance(mask, torch.Tensor) else batch["input_ids"].numel()


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
