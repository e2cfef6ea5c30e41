"""PyTorch pickle checkpoints (`pytorch_model.bin`, or the shards `pytorch_model.bin.index.json` lists) converted
into a safetensors folder, the only weights this project reads. Every file goes through
`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers: nothing is unpickled.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from mllm_cl.model_folder import (INDEX_FILE, SINGLE_FILE, ModelFolderError, atomic_save_tensors,
                                  check_not_an_input, index_shards, staged_folder)

BIN_FILE = "pytorch_model.bin"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"
SENTENCEPIECE_FILE = "tokenizer.model"
TOKENIZER_FILE = "tokenizer.json"

# (tokenizer.model to read, tokenizer.json to write): the SentencePiece -> tokenizers conversion, when there is one
TokenizerConverter = Callable[[Path, Path], None]


def bin_shards(folder: Path) -> tuple[dict[str, str] | None, list[Path]]:
    """(the index's tensor -> shard map, or None for a single file; the .bin files to read), checked."""
    if (folder / BIN_INDEX_FILE).is_file():
        return index_shards(folder / BIN_INDEX_FILE)
    if (folder / BIN_FILE).is_file():
        return None, [folder / BIN_FILE]
    raise ModelFolderError(f"{folder} has neither {BIN_FILE} nor {BIN_INDEX_FILE}: there are no PyTorch weights to "
                           f"convert; it holds {sorted(p.name for p in folder.iterdir())}")


def _refusal(error: Exception) -> str:
    """The part of torch's long weights-only refusal that says what it met."""
    text = " ".join(str(error).split())
    reason = text.partition("WeightsUnpickler error:")[2] or text or type(error).__name__
    return re.split(r" (?:Please use|Check the documentation)", reason)[0].strip()


def read_bin(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one `torch.save`d state dict, read with the weights-only loader."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelFolderError(f"{path}: torch.load(weights_only=True) refuses it ({_refusal(e)}): it holds more than "
                               "tensors, or is not a PyTorch checkpoint, and a full unpickle could run any code; it is "
                               "not converted. Save the state dict alone (torch.save(model.state_dict(), ...)) where "
                               "you trust the file") from None
    except (RuntimeError, EOFError) as e:  # torch's words for a truncated or damaged archive
        reason = str(e).split(". ")[0] or "it ends too early"
        raise ModelFolderError(f"{path} cannot be read as a PyTorch checkpoint ({reason}): a damaged or partial "
                               "download? Download it again") from None
    if not isinstance(state, dict) or not state:
        raise ModelFolderError(f"{path} holds a {type(state).__name__}, not a state dict (a non-empty dict from names "
                               "to tensors): save model.state_dict()")
    wrong = [f"{k!r} ({type(v).__name__})" for k, v in state.items()
             if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if wrong:
        raise ModelFolderError(f"{path} is not a state dict of tensors: {', '.join(wrong[:3])} "
                               f"{'is' if len(wrong) == 1 else 'are'} not a named tensor; save model.state_dict()")
    return state


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors with every one that shares storage with an earlier one (tied weights, views) cloned: safetensors
    refuses shared storage."""
    seen: set[int] = set()
    out = {}
    for key, tensor in tensors.items():
        storage = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if storage in seen else tensor
        seen.add(storage)
    return out


def safetensors_name(bin_name: str) -> str:
    """transformers' name for a shard's safetensors twin: pytorch_model-00001-of-00002.bin ->
    model-00001-of-00002.safetensors."""
    return bin_name.removeprefix("pytorch_").removesuffix(".bin") + ".safetensors"


def convert_bin_folder(source: str | Path, out: str | Path,
                       convert_tokenizer: TokenizerConverter | None = None) -> Path:
    """Write `out`: the weights of `source` as safetensors (one file, or shards and an index that mirror the .bin
    index), and every other file of `source` but its .bin files and their index. `out` must be new or empty; it
    appears whole or not at all. `convert_tokenizer` writes tokenizer.json from a SentencePiece tokenizer.model
    when `source` has no tokenizer.json."""
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise ModelFolderError(f"model folder {source} does not exist")
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise ModelFolderError(f"{out} exists and is not an empty folder: choose a new folder (nothing is replaced)")
    check_not_an_input(out, {"the folder to convert": source}, "the output folder")
    ready = [name for name in (SINGLE_FILE, INDEX_FILE) if (source / name).exists()]
    if ready:
        raise ModelFolderError(f"{source} already holds safetensors weights ({', '.join(ready)}): load it as it is")
    weight_map, shards = bin_shards(source)
    names = {path.name: safetensors_name(path.name) for path in shards}
    if len(set(names.values())) != len(names):
        raise ModelFolderError(f"{source / BIN_INDEX_FILE}: its shards {sorted(names)} would not get one safetensors "
                               "name each; rename them pytorch_model-0000K-of-0000N.bin")
    with staged_folder(out) as staging:
        found: dict[str, str] = {}
        total = 0
        for path in shards:
            tensors = read_bin(path)
            atomic_save_tensors(staging / (names[path.name] if weight_map else SINGLE_FILE), _unshared(tensors),
                                metadata={"format": "pt"})
            found |= {key: path.name for key in tensors}
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors  # one shard in memory at a time
        if weight_map is not None:
            if found != weight_map:
                odd = sorted(k for k in found.keys() | weight_map.keys() if found.get(k) != weight_map.get(k))
                raise ModelFolderError(f"{source / BIN_INDEX_FILE} does not list what its shards hold: {odd[:5]} "
                                       f"(the index says {[weight_map.get(k) for k in odd[:5]]}, the shards "
                                       f"{[found.get(k) for k in odd[:5]]})")
            index = {"metadata": {"total_size": total}, "weight_map": {k: names[v] for k, v in weight_map.items()}}
            (staging / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        skipped = {BIN_INDEX_FILE, *(p.name for p in source.glob("*.bin"))}
        for path in sorted(source.iterdir()):
            if path.name not in skipped:
                (shutil.copytree if path.is_dir() else shutil.copy2)(path, staging / path.name)
        # The lead's SentencePiece reader plugs in here: tokenizer.model -> tokenizer.json (convert.py passes it).
        if convert_tokenizer is not None and (source / SENTENCEPIECE_FILE).is_file() \
                and not (source / TOKENIZER_FILE).is_file():
            convert_tokenizer(source / SENTENCEPIECE_FILE, staging / TOKENIZER_FILE)
    return out
