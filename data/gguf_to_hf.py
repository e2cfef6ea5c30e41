"""Convert a llama.cpp LLaMA GGUF (SmolLM2) into a Hugging Face LLaMA folder: weights, config, tokenizer.

Usage: python data/gguf_to_hf.py MODEL.gguf OUT_FOLDER

Weights are dequantised to float32, so the folder holds exactly the values llama.cpp computes with
(bfloat16 would round them a second time). The tokenizer is rebuilt from the GGUF's `tokenizer.ggml.*`
metadata: a byte-level BPE (tokens, merges), control tokens as special tokens, and SmolLM2's pre-tokenizer
(llama.cpp's `smollm`: every digit alone, then GPT-2's split regex).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mllm_cl.gguf import GGUFError, GGUFFile, hf_llama_config, hf_llama_tensors  # noqa: E402
from mllm_cl.model_folder import write_model_folder  # noqa: E402

# llama.cpp token types (tokenizer.ggml.token_type) this converter treats apart; control and user-defined
# tokens are never split (the others: 2 unknown, 5 unused, 6 byte, are ordinary vocabulary entries here).
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4


def _pre_tokenizer(name: str) -> pre_tokenizers.PreTokenizer:
    """llama.cpp's `tokenizer.ggml.pre` -> the equivalent `tokenizers` pre-tokenizer."""
    if name == "smollm":  # llama.cpp splits with "\p{N}" (one digit at a time), then GPT-2's regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    raise GGUFError(f"tokenizer.ggml.pre = {name!r} is not mapped to a Hugging Face pre-tokenizer; "
                    "add its split rules to data/gguf_to_hf.py")


def build_tokenizer(metadata: dict[str, Any]) -> Tokenizer:
    """A `tokenizers.Tokenizer` from a GGUF's gpt2-style BPE metadata."""
    if metadata.get("tokenizer.ggml.model") != "gpt2":
        raise GGUFError(f"tokenizer.ggml.model = {metadata.get('tokenizer.ggml.model')!r}; "
                        "only byte-level BPE ('gpt2') is converted")
    tokens = metadata["tokenizer.ggml.tokens"]
    token_types = metadata.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens))
    merges = [tuple(merge.split(" ")) for merge in metadata["tokenizer.ggml.merges"]]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise GGUFError(f"tokenizer.ggml.merges holds {len(bad)} entries that are not 'left right', e.g. {bad[0]}")
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFError(f"tokenizer.ggml.tokens holds duplicates ({len(tokens)} tokens, {len(vocab)} distinct)")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(metadata.get("tokenizer.ggml.pre", "default"))
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_tokens([AddedToken(tokens[i], special=token_types[i] == CONTROL, normalized=False)
                          for i in range(len(tokens)) if token_types[i] in (CONTROL, USER_DEFINED)])
    return tokenizer


def tokenizer_files(metadata: dict[str, Any], max_length: int) -> dict[str, dict[str, Any]]:
    """`tokenizer_config.json` and `special_tokens_map.json` contents (special token strings, chat template)."""
    tokens = metadata["tokenizer.ggml.tokens"]
    token_types = metadata.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens))
    special = {}
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id"),
                      ("unk", "unknown_token_id")):
        if f"tokenizer.ggml.{key}" in metadata:
            special[f"{role}_token"] = tokens[metadata[f"tokenizer.ggml.{key}"]]
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": max_length,
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": bool(metadata.get("tokenizer.ggml.add_space_prefix", False)),
        "clean_up_tokenization_spaces": False,
        "additional_special_tokens": [t for t, kind in zip(tokens, token_types) if kind == CONTROL
                                      and t not in special.values()],
        **special,
    }
    if "tokenizer.chat_template" in metadata:
        config["chat_template"] = metadata["tokenizer.chat_template"]
    special_map = {k: v for k, v in config.items() if k.endswith("_token") or k == "additional_special_tokens"}
    return {"tokenizer_config.json": config, "special_tokens_map.json": special_map}


def convert(gguf_path: str | Path, out_folder: str | Path) -> Path:
    """Write `out_folder` = config.json, model.safetensors (float32), tokenizer and generation config."""
    gguf = GGUFFile(gguf_path)
    config = hf_llama_config(gguf)
    with tempfile.TemporaryDirectory() as tokenizer_dir:  # written first, then copied in with the weights
        build_tokenizer(gguf.metadata).save(str(Path(tokenizer_dir) / "tokenizer.json"))
        files = tokenizer_files(gguf.metadata, config["max_position_embeddings"])
        files["generation_config.json"] = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                                           if k in config}
        for name, content in files.items():
            (Path(tokenizer_dir) / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
        return write_model_folder(out_folder, hf_llama_tensors(gguf), config, copy_from=tokenizer_dir)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python data/gguf_to_hf.py MODEL.gguf OUT_FOLDER")
    try:
        print(f"wrote {convert(sys.argv[1], sys.argv[2])}")
    except GGUFError as e:
        sys.exit(f"error: {e}")
