"""The tokenizer wrapper: special ids from each kind of config file, no special tokens added, clear errors.

`byte_tokenizer_folder` (also used by test_conversation.py and test_data.py) writes a byte-level BPE with no
merges: every UTF-8 byte is one token, so the ids of any text are known independently of the library.
"""

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers

from mllm_cl.tokenizer import Tokenizer, TokenizerError, load_tokenizer

SPECIALS = ["<|endoftext|>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<pad>"]


def byte_to_char() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the ByteLevel alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_ids(text: str) -> list[int]:
    """The expected ids of `text` under the byte tokenizer: one id per UTF-8 byte, id = byte value."""
    return list(text.encode("utf-8"))


def special_id(token: str) -> int:
    return 256 + SPECIALS.index(token)


def byte_tokenizer_folder(folder: Path, **config_files: dict) -> Path:
    """tokenizer.json (byte b has id b, then SPECIALS) plus the given JSON files, e.g. tokenizer_config={...}."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {char: b for b, char in byte_to_char().items()}
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIALS)
    backend.save(str(folder / "tokenizer.json"))
    for name, content in config_files.items():
        (folder / f"{name}.json").write_text(json.dumps(content))
    return folder


def test_special_ids_from_tokenizer_config(tmp_path: Path) -> None:
    folder = byte_tokenizer_folder(tmp_path, tokenizer_config={
        "bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>", "pad_token": "<pad>"})
    tok = load_tokenizer(folder)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (special_id("<s>"), special_id("</s>"), special_id("<pad>"))
    assert tok.vocab_size == 256 + len(SPECIALS)
    assert load_tokenizer(folder / "tokenizer.json").eos_id == special_id("</s>")  # the file itself works too


def test_special_ids_from_id_files_and_pad_fallback(tmp_path: Path) -> None:
    folder = byte_tokenizer_folder(tmp_path, generation_config={"bos_token_id": 3, "eos_token_id": [7, 8]},
                                   config={"eos_token_id": 9, "pad_token_id": 5})
    tok = load_tokenizer(folder)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (3, 7, 5)  # generation_config wins over config.json

    folder = byte_tokenizer_folder(tmp_path / "b", special_tokens_map={"eos_token": "<|im_end|>"})
    tok = load_tokenizer(folder)
    assert tok.eos_id == tok.pad_id == special_id("<|im_end|>")  # pad falls back to eos
    assert tok.bos_id == special_id("<s>")  # no config names a bos: the vocab's "<s>"


def test_bare_tokenizer_json_uses_known_names(tmp_path: Path) -> None:
    tok = load_tokenizer(byte_tokenizer_folder(tmp_path) / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (special_id("<s>"), special_id("</s>"), special_id("</s>"))


def test_encode_adds_nothing_and_reads_special_text_as_text(tmp_path: Path) -> None:
    tok = load_tokenizer(byte_tokenizer_folder(tmp_path))
    assert tok.encode("hi </s>") == byte_ids("hi </s>")  # no bos, and "</s>" in data is not the eos id
    assert tok.encode("é") == [0xC3, 0xA9]
    ids = [special_id("<s>")] + tok.encode("a b") + [special_id("</s>"), -200]
    assert tok.decode(ids) == "a b"
    assert tok.decode(ids, skip_special=False) == "<s>a b</s>"
    assert tok.token_to_id("<|im_end|>") == special_id("<|im_end|>") and tok.token_to_id("nope") is None
    assert isinstance(tok, Tokenizer) and "vocab_size" in repr(tok)


def test_errors_name_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"tokenizer\.json not found.*SentencePiece tokenizer\.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\0")  # read when there is no tokenizer.json: test_sentencepiece_model
    with pytest.raises(TokenizerError, match=r"tokenizer\.model is not a valid SentencePiece model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)
    folder = byte_tokenizer_folder(tmp_path / "c", tokenizer_config={"eos_token": "<eot>"})
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json names eos_token '<eot>'"):
        load_tokenizer(folder)
