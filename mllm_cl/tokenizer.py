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

TOKENIZER_FILE = "tokenizer.json"
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
    """Load `path/tokenizer.json` (a model folder) or `path` itself (a tokenizer.json file), with its special ids."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    folder = file.parent
    if not file.is_file():
        hint = " (a folder with only tokenizer.model, a SentencePiece file, must be converted to tokenizer.json)" \
            if (folder / "tokenizer.model").is_file() else ""
        raise TokenizerError(f"{file} not found: a model folder needs the Hugging Face tokenizer.json{hint}")
    try:
        backend = BackendTokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises a bare Exception on malformed files
        raise TokenizerError(f"{file} is not a valid tokenizer.json: {e}") from None
    special = {name: _special_id(name, folder, backend) for name in ("bos", "eos", "pad")}
    if special["eos"] is None:
        raise TokenizerError(f"cannot tell the end-of-sequence token of {file}: set \"eos_token\" in "
                             f"{folder / 'tokenizer_config.json'} (or \"eos_token_id\" in config.json)")
    pad = special["pad"] if special["pad"] is not None else special["eos"]
    return Tokenizer(backend, special["bos"], special["eos"], pad, source=str(file))


def _special_id(name: str, folder: Path, backend: BackendTokenizer) -> int | None:
    for file_name in TOKEN_FILES:
        data = _read_json(folder / file_name)
        token = data.get(f"{name}_token")
        if isinstance(token, dict):  # {"content": "</s>", "lstrip": false, ...}
            token = token.get("content")
        if isinstance(token, str):
            surrogate = lone_surrogate(token)
            token_id = backend.token_to_id(token) if surrogate is None else None
            if token_id is None:
                raise TokenizerError(f"{folder / file_name} names {name}_token {token!r}, which is not in "
                                     f"{folder / TOKENIZER_FILE}; fix the token or remove the key")
            return token_id
    for file_name in ID_FILES:
        token_id = _read_json(folder / file_name).get(f"{name}_token_id")
        if isinstance(token_id, list):  # generation_config may list several stop ids: the first is the eos
            token_id = token_id[0] if token_id else None
        if isinstance(token_id, int):
            return token_id
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
