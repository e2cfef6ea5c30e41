"""A thin wrapper over a Hugging Face `tokenizer.json` (the `tokenizers` library) with the model's special ids.

`encode` never adds special tokens and never turns special-token text found in the data (a caption that
contains "</s>") into the special id: the templates in conversation.py place every special token themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as BackendTokenizer

from mllm_cl.errors import UserError
from mllm_cl.json_files import read_json
from mllm_cl.sentencepiece_model import (SentencePieceError, llama_tokenizer, read_sentencepiece_model,
                                         recorded_special_ids)

TOKENIZER_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = "tokenizer.model"  # read when a folder has no tokenizer.json (the original LLaMA/Vicuna/LLaVA)
ADDED_TOKENS_FILE = "added_tokens.json"
# Read in this order; the first file that names a token wins. Token strings are mapped to ids through the vocab.
TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")
ID_FILES = ("generation_config.json", "config.json")
# Used only when no config file names the token (a bare tokenizer.json).
FALLBACK_NAMES = {"bos": ("<s>", "<|endoftext|>", "<|startoftext|>"), "eos": ("</s>", "<|endoftext|>", "<|eos|>")}


def lone_surrogate(text: str) -> str | None:
    """How to name the first lone surrogate in `text` ("\\ud800 at character 5"), or None. JSON's escapes can
    write one; no tokenizer takes it (`TextInputSequence must be str`), since it is not a Unicode character."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"a lone surrogate {text[e.start]!r} at character {e.start}"
    return None


class TokenizerError(UserError, ValueError):
    """A tokenizer file or folder that cannot be used; the message names the file and the fix."""


class Tokenizer:
    """Text <-> ids, plus `bos_id`, `eos_id` and `pad_id` (pad falls back to eos)."""

    def __init__(self, backend: BackendTokenizer, bos_id: int | None, eos_id: int, pad_id: int, source: str = ""):
        self.backend = backend
        self.backend.encode_special_tokens = True  # "</s>" inside data text is plain text, not the eos id
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.source = source

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def max_id(self) -> int:
        """The largest token id the tokenizer can produce (ids need not be dense)."""
        return max(self.backend.get_vocab(with_added_tokens=True).values())

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids if i >= 0], skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id})")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a model folder's `tokenizer.json` (else its SentencePiece `tokenizer.model`), or `path` itself (either
    file), with its special ids."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if path.is_dir() and not file.is_file() and (path / SENTENCEPIECE_FILE).is_file():
        file = path / SENTENCEPIECE_FILE
    folder = file.parent
    if not file.is_file():
        raise TokenizerError(f"{file} not found: a model folder needs the Hugging Face tokenizer.json or the "
                             f"SentencePiece {SENTENCEPIECE_FILE}")
    recorded: dict[str, int | None] = {}
    if file.suffix == ".model":
        backend, recorded = _sentencepiece_backend(file)
    else:
        try:
            backend = BackendTokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises a bare Exception on malformed files
            raise TokenizerError(f"{file} is not a valid tokenizer.json: {e}") from None
    special = {name: _special_id(name, file, backend, recorded) for name in ("bos", "eos", "pad")}
    if special["eos"] is None:
        raise TokenizerError(f"cannot tell the end-of-sequence token of {file}: set \"eos_token\" in "
                             f"{folder / 'tokenizer_config.json'} (or \"eos_token_id\" in config.json)")
    pad = special["pad"] if special["pad"] is not None else special["eos"]
    return Tokenizer(backend, special["bos"], special["eos"], pad, source=str(file))


def write_tokenizer_json(source: str | Path, out: str | Path) -> Path:
    """Write the tokenizer.json equivalent to the SentencePiece `source` (a tokenizer.model, or a folder holding
    one; the tokenizer_config.json beside it is read too) to `out`: a `.json` path is the file itself, any other
    path a folder to write tokenizer.json into. Returns the file written."""
    source, out = Path(source), Path(out)
    backend, _ = _sentencepiece_backend(source / SENTENCEPIECE_FILE if source.is_dir() else source)
    out = out if out.suffix == ".json" else out / TOKENIZER_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    backend.save(str(out))
    return out


def _sentencepiece_backend(file: Path) -> tuple[BackendTokenizer, dict[str, int | None]]:
    """transformers' LlamaTokenizer from `file` and the config files beside it; also the special ids the model
    file records (the config files override them)."""
    folder = file.parent
    config = _read_json(folder / TOKEN_FILES[0])
    try:
        model = read_sentencepiece_model(file)
        pieces = [p.piece for p in model.pieces]
        named = {name: found for name in ("bos", "eos", "unk", "pad") if (found := _named_token(name, folder))}
        for name, (token, config_file) in named.items():
            if token not in pieces:
                raise _unknown_token(config_file, f"{name}_token", token, file)
        tokens = {name: token for name, (token, _) in named.items()}
        backend = llama_tokenizer(model, legacy=_flag(config, "legacy", False, folder),
                                  add_prefix_space=_flag(config, "add_prefix_space", None, folder),
                                  special_tokens=[*tokens.values(), *_extra_special_tokens(file, pieces)],
                                  bos_token=tokens.get("bos"), eos_token=tokens.get("eos"),
                                  add_bos_token=_flag(config, "add_bos_token", False, folder),
                                  add_eos_token=_flag(config, "add_eos_token", False, folder))
    except SentencePieceError as e:
        raise TokenizerError(str(e)) from None
    return backend, recorded_special_ids(model)


def _flag(config: dict[str, Any], key: str, default: bool | None, folder: Path) -> bool | None:
    value = config.get(key, default)
    if value is not None and not isinstance(value, bool):
        raise TokenizerError(f"{folder / TOKEN_FILES[0]}: \"{key}\" must be true or false, not {value!r}")
    return value


def _extra_special_tokens(model_file: Path, pieces: list[str]) -> list[str]:
    """Tokens the config files beside `model_file` mark special besides bos/eos/unk/pad. Each must already be a
    piece (at its id): this reader adds no tokens to the SentencePiece vocabulary."""
    folder, special = model_file.parent, []
    for file_name in TOKEN_FILES:
        tokens = _read_json(folder / file_name).get("additional_special_tokens")
        for token in tokens if isinstance(tokens, list) else []:
            token = token.get("content") if isinstance(token, dict) else token
            if token not in pieces:
                raise _unknown_token(folder / file_name, "additional_special_tokens entry", token, model_file)
            special.append(token)
    decoder = _read_json(folder / TOKEN_FILES[0]).get("added_tokens_decoder")
    entries = [(TOKEN_FILES[0], token_id, token) for token_id, token in
               (decoder.items() if isinstance(decoder, dict) else ())]
    entries += [(ADDED_TOKENS_FILE, token_id, token) for token, token_id in
                _read_json(folder / ADDED_TOKENS_FILE).items()]
    for file_name, token_id, token in entries:
        content = token.get("content") if isinstance(token, dict) else token
        index = int(token_id) if str(token_id).isdigit() else -1
        if not 0 <= index < len(pieces) or pieces[index] != content:
            raise TokenizerError(f"{folder / file_name} adds token {content!r} as id {token_id}, which is not the "
                                 f"piece {model_file} holds there; convert the folder to tokenizer.json with "
                                 f"transformers' save_pretrained")
        if isinstance(token, dict) and token.get("special"):
            special.append(content)
    return special


def _named_token(name: str, folder: Path) -> tuple[str, Path] | None:
    """The `{name}_token` string the first of TOKEN_FILES names, with that file; None if none does."""
    for file_name in TOKEN_FILES:
        token = _read_json(folder / file_name).get(f"{name}_token")
        if isinstance(token, dict):  # {"content": "</s>", "lstrip": false, ...}
            token = token.get("content")
        if isinstance(token, str):
            return token, folder / file_name
    return None


def _unknown_token(config_file: Path, key: str, token: str, tokenizer_file: Path) -> TokenizerError:
    return TokenizerError(f"{config_file} names {key} {token!r}, which is not in {tokenizer_file}; fix the token "
                          f"or remove the key")


def _special_id(name: str, file: Path, backend: BackendTokenizer, recorded: dict[str, int | None]) -> int | None:
    """The id of the `name` token: named by a config file, else given by id, else recorded in the tokenizer file
    (SentencePiece's trainer_spec), else found among FALLBACK_NAMES."""
    folder = file.parent
    named = _named_token(name, folder)
    if named is not None:
        token, config_file = named
        token_id = backend.token_to_id(token) if lone_surrogate(token) is None else None
        if token_id is None:
            raise _unknown_token(config_file, f"{name}_token", token, file)
        return token_id
    for file_name in ID_FILES:
        token_id = _read_json(folder / file_name).get(f"{name}_token_id")
        if isinstance(token_id, list):  # generation_config may list several stop ids: the first is the eos
            token_id = token_id[0] if token_id else None
        if isinstance(token_id, int):
            return token_id
    if recorded:
        return recorded.get(name)
    for token in FALLBACK_NAMES.get(name, ()):
        token_id = backend.token_to_id(token)
        if token_id is not None:
            return token_id
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = read_json(path, TokenizerError)
    return data if isinstance(data, dict) else {}
