"""A training run's checkpoint folder: everything needed to resume it exactly, written atomically.

    checkpoint/
      weights.safetensors    trainable params, by name, in the model's dtype
      masters.safetensors    their fp32 masters (bf16/fp16 runs only)
      optimizer.safetensors  optimizer state tensors, "{param name}/{key}" (e.g. "llm.blocks.0.attn.qkv.weight/exp_avg")
      optimizer.json         the rest of the optimizer state (param groups, non-tensor values)
      rng.safetensors        torch CPU and CUDA generator states
      state.json             step, data position, loss scaler, python/numpy RNG states, config

The folder is built under a temporary name and renamed into place, so a crash leaves the
previous checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mllm_cl.errors import UserError
from mllm_cl.model_folder import staged_folder

CHECKPOINT_DIR = "checkpoint"
_OPTIMIZER_FLAGS = ("fused", "foreach", "capturable", "differentiable")  # how to run, not what to resume


class CheckpointError(UserError, RuntimeError):
    """A checkpoint folder that is missing a file, unreadable, or does not fit the current run."""


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {path}: {e}; delete the checkpoint folder to restart afresh") from None


# ---------------------------------------------------------------- random number generators

def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON part: python + numpy, tensor part: torch CPU + every CUDA device)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    json_part = {"python": [version, list(internal), gauss],
                 "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = state
    return json_part, tensors


def set_rng_state(json_part: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = json_part["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = json_part["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((k for k in tensors if k.startswith("cuda_")), key=lambda k: int(k.split("_")[1]))
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


# ---------------------------------------------------------------- optimizer state <-> tensors + JSON

def _param_names(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> list[list[str]]:
    """The name of every param of every group, in the optimizer's order (`names`: id(param) -> name)."""
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def optimizer_state(optimizer: torch.optim.Optimizer,
                    names: dict[int, str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten `optimizer.state_dict()` into tensors keyed "{param name}/{key}" and a JSON-able rest."""
    state = optimizer.state_dict()
    index_to_name = [n for group in _param_names(optimizer, names) for n in group]
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index_to_name[index]}/{key}"] = value
            else:
                scalars.setdefault(index_to_name[index], {})[key] = value
    groups = [{k: v for k, v in group.items() if k != "params"} for group in state["param_groups"]]
    meta = {"param_groups": groups, "param_names": _param_names(optimizer, names), "scalars": scalars}
    return tensors, meta


def load_optimizer_state(optimizer: torch.optim.Optimizer, names: dict[int, str],
                         tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    current = _param_names(optimizer, names)
    if meta["param_names"] != current:
        raise CheckpointError("the checkpoint's optimizer has other param groups than this run "
                              f"({[len(g) for g in meta['param_names']]} params per group saved, "
                              f"{[len(g) for g in current]} now): resume with the same model, trainable "
                              "params and learning-rate prefixes")
    index_of = {n: i for i, n in enumerate(n for group in current for n in group)}
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        name, field = key.rsplit("/", 1)
        state.setdefault(index_of[name], {})[field] = tensor
    for name, values in meta["scalars"].items():
        state.setdefault(index_of[name], {}).update(values)
    groups = []
    for saved, live in zip(meta["param_groups"], optimizer.state_dict()["param_groups"]):
        group = {k: v for k, v in saved.items() if k not in _OPTIMIZER_FLAGS}
        groups.append({**live, **group})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---------------------------------------------------------------- the folder

def save_checkpoint(out_dir: str | Path, *, weights: dict[str, torch.Tensor], masters: dict[str, torch.Tensor],
                    optimizer: tuple[dict[str, torch.Tensor], dict[str, Any]], state: dict[str, Any]) -> Path:
    """Write `out_dir/checkpoint/` atomically; `optimizer` is `optimizer_state(...)`'s (tensors, JSON part),
    `state` the run's JSON part (step, data position, ...)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = out_dir / CHECKPOINT_DIR
    with staged_folder(folder) as staging:
        _save(staging / "weights.safetensors", weights)
        if masters:
            _save(staging / "masters.safetensors", masters)
        opt_tensors, opt_meta = optimizer
        _save(staging / "optimizer.safetensors", opt_tensors)
        (staging / "optimizer.json").write_text(json.dumps(opt_meta) + "\n")
        rng_json, rng_tensors = rng_state()
        _save(staging / "rng.safetensors", rng_tensors)
        (staging / "state.json").write_text(json.dumps({**state, "rng": rng_json}, indent=1) + "\n")
    return folder


def find_checkpoint(out_dir: str | Path) -> Path | None:
    """`out_dir/checkpoint`, or the previous one if a crash hit between the two renames of a save."""
    for name in (CHECKPOINT_DIR, f".{CHECKPOINT_DIR}.old"):
        folder = Path(out_dir) / name
        if (folder / "state.json").is_file():
            return folder
    return None


def remove_checkpoint(out_dir: str | Path) -> None:
    """Delete `out_dir`'s checkpoint (and a leftover previous one) once the run it resumes is finished."""
    for name in (CHECKPOINT_DIR, f".{CHECKPOINT_DIR}.old"):
        shutil.rmtree(Path(out_dir) / name, ignore_errors=True)


def load_checkpoint(folder: str | Path) -> dict[str, Any]:
    """{"state", "weights", "masters", "optimizer_tensors", "optimizer_meta", "rng_tensors"} from a folder."""
    folder = Path(folder)
    required = ["state.json", "weights.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors"]
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {folder} lacks {missing}; delete it to restart from scratch")
    try:
        state = json.loads((folder / "state.json").read_text())
        optimizer_meta = json.loads((folder / "optimizer.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {folder} has a corrupt JSON file: {e}") from None
    masters_path = folder / "masters.safetensors"
    return {"state": state, "weights": _load(folder / "weights.safetensors"),
            "masters": _load(masters_path) if masters_path.is_file() else {},
            "optimizer_tensors": _load(folder / "optimizer.safetensors"), "optimizer_meta": optimizer_meta,
            "rng_tensors": _load(folder / "rng.safetensors")}
