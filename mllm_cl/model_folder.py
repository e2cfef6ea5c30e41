"""Hugging Face-layout model folders on disk: read every tensor (single file or sharded), write atomically.

A folder holds `config.json`, `model.safetensors` (or shards listed in `model.safetensors.index.json`)
and optionally `tokenizer.json` and friends. Only safetensors are read: nothing is ever unpickled.
Writes go to a temporary file or folder next to the target and are renamed into place, so a crash
leaves either the old version or the new one, never half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mllm_cl.errors import UserError
from mllm_cl.json_files import read_json

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
STAGING_SUFFIX = ".tmp"  # a folder being written: `.NAME.<random>.tmp` beside it
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


class ModelFolderError(UserError, RuntimeError):
    """A model folder that is missing, incomplete or unreadable; the message names the file."""


def read_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise ModelFolderError(f"{path} not found: a model folder needs config.json (Hugging Face layout)")
    return read_json(path, ModelFolderError, dict, "a JSON object of settings")


def index_shards(index: Path) -> tuple[dict[str, str], list[Path]]:
    """A checkpoint index's tensor -> shard map and its shard files (model.safetensors.index.json, or the
    pytorch_model.bin.index.json convert.py reads), checked: every shard a file name in the index's folder."""
    weight_map = read_json(index, ModelFolderError, dict).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelFolderError(f"{index} is not a checkpoint index: it needs \"weight_map\", an object from "
                               f"tensor names to shard files, got {weight_map!r:.80}")
    if not all(isinstance(name, str) for name in weight_map.values()):
        raise ModelFolderError(f"{index}: every shard in \"weight_map\" must be a file name (a string), got "
                               f"{sorted({repr(n) for n in weight_map.values() if not isinstance(n, str)})[:3]}")
    names = sorted(set(weight_map.values()))
    escaping = [n for n in names if Path(n).name != n or n in ("", ".", "..")]
    if escaping:
        raise ModelFolderError(f"{index} names shard(s) {escaping} outside the folder: a shard must be a "
                               "file name in the folder itself")
    missing = [n for n in names if not (index.parent / n).is_file()]
    if missing:
        raise ModelFolderError(f"{index} names shard(s) that do not exist: {missing}")
    return weight_map, [index.parent / name for name in names]


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a folder: the single file, or every shard named by the index."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"model folder {folder} does not exist")
    if (folder / INDEX_FILE).is_file():
        return index_shards(folder / INDEX_FILE)[1]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    found = sorted(p.name for p in folder.iterdir())
    pickles = [n for n in found if n.endswith((".bin", ".pt", ".pth"))]
    hint = (f" (found pickle files {pickles}, which are never unpickled: `python convert.py {folder} OUT_DIR` "
            "writes them as safetensors)") if pickles else ""
    raise ModelFolderError(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}; it holds {found}")


def read_safetensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file; an unreadable file, or NaN or inf in a tensor, is a ModelFolderError."""
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise ModelFolderError(f"cannot read {path}: {e}") from None
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelFolderError(f"{path}: tensor {key!r} holds NaN or inf values (a diverged run or a "
                                   "damaged file); it is not loaded")
    return tensors


def check_float_weights(tensors: dict[str, torch.Tensor], where: str | Path,
                        keys: Iterable[str] | None = None) -> None:
    """A ModelFolderError when a weight (each of `keys`, default all) is not floating point: an integer tensor
    copied into a model would silently become whole numbers."""
    for key in sorted(tensors if keys is None else keys):
        if key in tensors and not tensors[key].is_floating_point():
            raise ModelFolderError(f"{where}: weight {key!r} is {tensors[key].dtype}; model weights must be floating "
                                   "point (float32, bfloat16 or float16): was the file converted wrongly?")


def read_tensors(folder: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors file(s), by key. A key found in two shards is an error."""
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for path in weight_files(folder):
        for key, tensor in read_safetensors(path, device).items():
            if key in tensors:
                raise ModelFolderError(f"key {key!r} appears in both {origin[key]} and {path}")
            tensors[key], origin[key] = tensor, path
    return tensors


def check_not_an_input(output: str | Path, inputs: dict[str, str | Path | None], what: str) -> None:
    """A ModelFolderError when the file `output` would replace an input: it is one of `inputs` (name -> path; a
    folder counts with everything inside it), e.g. a scores file written into the model folder it scores."""
    target = Path(output).resolve()
    for name, source in inputs.items():
        if not source or not Path(source).exists():  # a preset's name, an unused option
            continue
        source = Path(source).resolve()
        if target == source:
            raise ModelFolderError(f"{what} {output} would write over {name} (an input of this run): choose another "
                                   "path")
        if source in target.parents:
            raise ModelFolderError(f"{what} {output} would write inside {name} {source} (an input of this run): "
                                   "choose a path outside it")


def check_replaceable(output: str | Path, ours: Callable[[Any], bool], what: str, kind: str) -> None:
    """A ModelFolderError when the file `output` exists and is not a `kind` this command writes (`ours` judges its
    JSON): scores never replace a benchmark, an image, or another run's results."""
    path = Path(output)
    if not path.exists():
        return
    if path.is_file():
        try:
            if ours(json.loads(path.read_bytes())):
                return
        except (ValueError, UnicodeDecodeError, RecursionError):  # not JSON: not ours either
            pass
    raise ModelFolderError(f"{what} {output} exists and is not {kind}: refusing to replace it; choose a new path")


def check_writable(path: str | Path) -> Path:
    """Make sure a file can be written at `path` (creating its folder) before a long job computes what goes
    there; a folder in the way or an unwritable place is a ModelFolderError naming the path."""
    path = Path(path)
    if path.is_dir():
        raise ModelFolderError(f"{path} is a folder; give the path of a file to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as e:
        raise ModelFolderError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_tensors(path: str | Path, tensors: dict[str, torch.Tensor],
                        metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file` through a temporary file and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(contiguous, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except (SafetensorError, OSError) as e:  # a full disk, most often: say that nothing was lost
        Path(tmp).unlink(missing_ok=True)
        kept = f"the previous {path} is kept as it was" if path.exists() else "no partial file is left"
        raise ModelFolderError(f"cannot write {path}: {e}; {kept}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staged_folder(folder: str | Path) -> Iterator[Path]:
    """Build a folder in a staging folder beside `folder`; swap it in whole when the block ends without error.

    On an error the staging folder is removed and `folder` is left as it was. During the swap the previous
    version sits at `.NAME.old` for an instant, so a reader that finds no `folder` can fall back to it; a
    `.NAME.old` left by a swap that was killed is kept until the new `folder` is in place, so at every
    instant one complete version exists.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=STAGING_SUFFIX))
    os.chmod(staging, 0o755)  # mkdtemp creates 0700; a model folder is meant to be shared
    try:
        try:
            yield staging
        except (SafetensorError, OSError) as e:  # a full disk, most often: say that nothing was lost
            kept = f"the previous {folder} is kept as it was" if folder.exists() else "no partial copy is left"
            raise ModelFolderError(f"cannot write {folder}: {e}; {kept}") from None
        old = folder.with_name(f".{folder.name}.old")
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(staging, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # already gone after a successful swap


def remove_stale_staging(folder: str | Path) -> list[Path]:
    """Delete the staging folders of `folder` that a killed write left behind; return them."""
    folder = Path(folder)
    stale = sorted(folder.parent.glob(f".{folder.name}.*{STAGING_SUFFIX}")) if folder.parent.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def write_model_folder(folder: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any],
                       copy_from: str | Path | None = None) -> Path:
    """Write `config.json` + `model.safetensors` as one atomic folder swap.

    `copy_from` names a folder whose tokenizer files are copied along. An existing folder at the target
    is replaced only once the new one is complete.
    """
    with staged_folder(folder) as staging:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(staging / SINGLE_FILE),
                  metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if copy_from is not None:
            copy_tokenizer_files(copy_from, staging)
    return Path(folder)


def copy_tokenizer_files(source: str | Path, target: str | Path) -> None:
    """Copy whichever of TOKENIZER_FILES `source` holds into the folder `target`."""
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, Path(target) / name)
