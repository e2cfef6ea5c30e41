"""GGUF reader: files written here byte by byte, read back; Q/K un-permutation; GGUF -> HF LLaMA end to end."""

import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from mllm_cl.gguf import (GGUFError, GGUFFile, hf_llama_name, hf_llama_tensors, permute_rotary_rows,
                          unpermute_rotary_rows)

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- a GGUF writer and reference quantisers

U8, I8, U16, I16, U32, I32, F32V, BOOL, STR, ARR, U64, I64, F64 = 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12
FORMATS = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32V: "<f", BOOL: "<?", U64: "<Q",
           I64: "<q", F64: "<d"}
T_F32, T_F16, T_Q4_1, T_Q8_0 = 0, 1, 3, 8


def encode_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def encode_value(value_type: int, value) -> bytes:
    if value_type == STR:
        return encode_string(value)
    if value_type == ARR:
        item_type, items = value
        return struct.pack("<IQ", item_type, len(items)) + b"".join(encode_value(item_type, v) for v in items)
    return struct.pack(FORMATS[value_type], value)


def gguf_bytes(metadata, tensors, alignment=32, version=3, magic=b"GGUF") -> bytes:
    """metadata: [(key, type, value)]; tensors: [(name, torch-order shape, ggml type, raw bytes)]."""
    out = bytearray(magic + struct.pack("<IQQ", version, len(tensors), len(metadata)))
    for key, value_type, value in metadata:
        out += encode_string(key) + struct.pack("<I", value_type) + encode_value(value_type, value)
    offset, blobs = 0, []
    for name, shape, ggml_type, raw in tensors:
        offset = -(-offset // alignment) * alignment
        out += encode_string(name) + struct.pack("<I", len(shape))
        out += b"".join(struct.pack("<Q", d) for d in reversed(shape)) + struct.pack("<IQ", ggml_type, offset)
        blobs.append((offset, raw))
        offset += len(raw)
    start = -(-len(out) // alignment) * alignment
    out += bytes(start - len(out))
    for offset, raw in blobs:
        out += bytes(start + offset - len(out)) + raw
    return bytes(out)


def quantise_q8_0(x: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Blocks of 32: d = max|x| / 127 stored as fp16, q = round(x / d). Returns bytes and d * q."""
    raw, expected = bytearray(), []
    for block in x.reshape(-1, 32):
        d = np.float16(np.abs(block).max() / 127)
        q = np.clip(np.round(block / np.float32(d)) if d else np.zeros(32), -127, 127).astype(np.int8)
        raw += d.tobytes() + q.tobytes()
        expected += [float(d) * int(v) for v in q]
    return bytes(raw), np.array(expected, dtype=np.float32)


def quantise_q4_1(x: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Blocks of 32: m = min, d = (max - min) / 15 (both fp16), q = round((x - m) / d) in 0..15; byte j holds
    element j in its low nibble and element j + 16 in its high nibble. Returns bytes and d * q + m."""
    raw, expected = bytearray(), []
    for block in x.reshape(-1, 32):
        m = np.float16(block.min())
        d = np.float16((block.max() - block.min()) / 15)
        q = np.clip(np.round((block - np.float32(m)) / np.float32(d)), 0, 15).astype(np.uint8)
        raw += d.tobytes() + m.tobytes() + bytes(int(q[j]) | int(q[j + 16]) << 4 for j in range(16))
        expected += [float(d) * int(v) + float(m) for v in q]
    return bytes(raw), np.array(expected, dtype=np.float32)


def write(tmp_path: Path, data: bytes, name: str = "model.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------- header, metadata, tensors

@pytest.mark.parametrize("version,alignment", [(3, 32), (2, 64)])
def test_metadata_and_tensors_round_trip(tmp_path: Path, version: int, alignment: int) -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 5)).astype(np.float32)
    b = rng.standard_normal((4, 8)).astype(np.float16)
    c = rng.standard_normal((3, 64)).astype(np.float32)
    d = (rng.standard_normal((2, 96)) * 0.1 + 0.3).astype(np.float32)
    c_raw, c_expected = quantise_q8_0(c)
    d_raw, d_expected = quantise_q4_1(d)
    metadata = [
        ("general.architecture", STR, "llama"), ("general.alignment", U32, alignment),
        ("a.u8", U8, 200), ("a.i8", I8, -5), ("a.u16", U16, 60000), ("a.i16", I16, -3000), ("a.i32", I32, -7),
        ("a.u64", U64, 2**40), ("a.i64", I64, -(2**40)), ("a.f64", F64, 0.125), ("a.bool", BOOL, True),
        ("a.eps", F32V, 1e-5), ("a.words", ARR, (STR, ["<s>", "Ġthe", "naïve", ""])),
        ("a.ints", ARR, (I32, [3, -1, 2])), ("a.nested", ARR, (ARR, [(U8, [1, 2]), (U8, [])])),
    ]
    tensors = [("a", a.shape, T_F32, a.tobytes()), ("b", b.shape, T_F16, b.tobytes()),
               ("c", c.shape, T_Q8_0, c_raw), ("d", d.shape, T_Q4_1, d_raw)]
    gguf = GGUFFile(write(tmp_path, gguf_bytes(metadata, tensors, alignment, version)))

    assert gguf.version == version and gguf.alignment == alignment and gguf.data_offset % alignment == 0
    expected_meta = {key: value for key, _, value in metadata}
    expected_meta.update({"a.eps": 1e-5, "a.words": ["<s>", "Ġthe", "naïve", ""], "a.ints": [3, -1, 2],
                          "a.nested": [[1, 2], []]})
    assert gguf.metadata == expected_meta
    assert {n: (i.shape, i.type_name) for n, i in gguf.tensors.items()} == {
        "a": ((3, 5), "F32"), "b": ((4, 8), "F16"), "c": ((3, 64), "Q8_0"), "d": ((2, 96), "Q4_1")}
    assert all(info.offset % alignment == 0 for info in gguf.tensors.values())
    np.testing.assert_array_equal(gguf.tensor("a"), a)
    np.testing.assert_array_equal(gguf.tensor("b"), b.astype(np.float32))
    np.testing.assert_array_equal(gguf.tensor("c"), c_expected.reshape(3, 64))
    np.testing.assert_array_equal(gguf.tensor("d"), d_expected.reshape(2, 96))
    # the quantisers are sane: within half a step (plus fp16 rounding of the scales) of the input
    assert np.abs(gguf.tensor("c") - c).max() < 0.6 * np.abs(c).max() / 127 + 1e-2
    assert np.abs(gguf.tensor("d") - d).max() < 0.6 * (d.max() - d.min()) / 15 + 1e-2


def test_q4_1_nibble_order(tmp_path: Path) -> None:
    """Low nibbles are elements 0..15, high nibbles elements 16..31: d = 0.5, m = -1."""
    block = np.float16(0.5).tobytes() + np.float16(-1).tobytes() + bytes(j | (15 - j) << 4 for j in range(16))
    gguf = GGUFFile(write(tmp_path, gguf_bytes([], [("t", (32,), T_Q4_1, block)])))
    q = list(range(16)) + list(range(15, -1, -1))
    np.testing.assert_array_equal(gguf.tensor("t"), 0.5 * np.array(q, dtype=np.float32) - 1)


def test_q8_0_signed_values(tmp_path: Path) -> None:
    block = np.float16(0.25).tobytes() + np.arange(-16, 16, dtype=np.int8).tobytes()
    gguf = GGUFFile(write(tmp_path, gguf_bytes([], [("t", (32,), T_Q8_0, block)])))
    np.testing.assert_array_equal(gguf.tensor("t"), 0.25 * np.arange(-16, 16, dtype=np.float32))


# ---------------------------------------------------------------- bad files

def test_bad_files_give_clear_errors(tmp_path: Path) -> None:
    tensors = [("w", (2, 32), T_F32, np.ones((2, 32), np.float32).tobytes())]
    good = gguf_bytes([("general.name", STR, "x" * 40)], tensors)
    with pytest.raises(GGUFError, match="not a GGUF file: it starts with b'GGML'"):
        GGUFFile(write(tmp_path, gguf_bytes([], tensors, magic=b"GGML"), "magic.gguf"))
    with pytest.raises(GGUFError, match="version 1"):
        GGUFFile(write(tmp_path, gguf_bytes([], tensors, version=1), "v1.gguf"))
    with pytest.raises(GGUFError, match=r"truncated: reading metadata 'general.name'"):
        GGUFFile(write(tmp_path, good[:50], "cut_meta.gguf"))
    with pytest.raises(GGUFError, match=r"truncated: tensor 'w' ends at byte"):
        GGUFFile(write(tmp_path, good[:-8], "cut_data.gguf"))
    with pytest.raises(GGUFError, match="only 2 bytes"):
        GGUFFile(write(tmp_path, b"GG", "tiny.gguf"))
    with pytest.raises(GGUFError, match="does not exist"):
        GGUFFile(tmp_path / "missing.gguf")
    q4_k = gguf_bytes([], [("k", (256,), 12, bytes(144))])
    gguf = GGUFFile(write(tmp_path, q4_k, "q4k.gguf"))
    with pytest.raises(GGUFError, match="tensor 'k' has ggml type 12; this reader dequantises F32, F16, Q4_1, Q8_0"):
        gguf.tensor("k")
    with pytest.raises(GGUFError, match="has no tensor 'nope'"):
        gguf.tensor("nope")


# ---------------------------------------------------------------- llama.cpp -> Hugging Face

def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py permutation, written out with numpy."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_head,head_dim", [(3, 8), (2, 64)])
def test_unpermute_inverts_llama_cpp_permutation(n_head: int, head_dim: int) -> None:
    w = np.random.default_rng(1).standard_normal((n_head * head_dim, 10)).astype(np.float32)
    permuted = torch.from_numpy(llama_cpp_permute(w, n_head))
    torch.testing.assert_close(unpermute_rotary_rows(permuted, n_head), torch.from_numpy(w), rtol=0, atol=0)
    torch.testing.assert_close(permute_rotary_rows(torch.from_numpy(w), n_head), permuted, rtol=0, atol=0)
    # within a head, llama.cpp's row 2i is HF row i and row 2i+1 is HF row i + head_dim/2
    half = head_dim // 2
    for i in range(half):
        assert torch.equal(permuted[head_dim + 2 * i], torch.from_numpy(w[head_dim + i]))
        assert torch.equal(permuted[head_dim + 2 * i + 1], torch.from_numpy(w[head_dim + half + i]))


def test_hf_names() -> None:
    assert hf_llama_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert hf_llama_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_llama_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_llama_name("output.weight") == "lm_head.weight"
    with pytest.raises(GGUFError, match="'blk.0.attn_qkv.weight' has no Hugging Face LLaMA counterpart"):
        hf_llama_name("blk.0.attn_qkv.weight")


def load_converter():
    spec = importlib.util.spec_from_file_location("gguf_to_hf", ROOT / "data" / "gguf_to_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    from tokenizers.pre_tokenizers import ByteLevel
    merges = ["Ġ t", "h e", "Ġt he", "Ġ c", "a t", "Ġc at"]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(ByteLevel.alphabet())
    tokens = specials + alphabet + ["Ġt", "he", "Ġthe", "Ġc", "at", "Ġcat"]
    return tokens, [3] * len(specials) + [1] * (len(tokens) - len(specials)), merges


def test_gguf_to_hf_llama_matches_transformers(tmp_path: Path) -> None:
    """A random HF LLaMA written as llama.cpp would (permuted q/k, Q8_0 embeddings), converted back: same logits."""
    transformers = pytest.importorskip("transformers")
    tokens, token_types, merges = tiny_vocab()
    config = transformers.LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    reference = transformers.LlamaForCausalLM(config).eval()
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    gguf_tensors = []
    embedding_raw, embedding = quantise_q8_0(state["model.embed_tokens.weight"])
    gguf_tensors.append(("token_embd.weight", state["model.embed_tokens.weight"].shape, T_Q8_0, embedding_raw))
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(2):
        for hf, ours in names.items():
            w = state[f"model.layers.{i}.{hf}.weight"]
            if ours in ("attn_q", "attn_k"):
                w = llama_cpp_permute(w, 4 if ours == "attn_q" else 2)
            gguf_tensors.append((f"blk.{i}.{ours}.weight", w.shape, T_F32, np.ascontiguousarray(w).tobytes()))
    gguf_tensors.append(("output_norm.weight", (64,), T_F32, state["model.norm.weight"].tobytes()))
    metadata = [("general.architecture", STR, "llama"), ("llama.block_count", U32, 2),
                ("llama.context_length", U32, 128), ("llama.embedding_length", U32, 64),
                ("llama.feed_forward_length", U32, 96), ("llama.attention.head_count", U32, 4),
                ("llama.attention.head_count_kv", U32, 2), ("llama.rope.freq_base", F32V, 10000.0),
                ("llama.attention.layer_norm_rms_epsilon", F32V, 1e-5), ("llama.rope.dimension_count", U32, 16),
                ("tokenizer.ggml.model", STR, "gpt2"), ("tokenizer.ggml.pre", STR, "smollm"),
                ("tokenizer.ggml.tokens", ARR, (STR, tokens)), ("tokenizer.ggml.token_type", ARR, (I32, token_types)),
                ("tokenizer.ggml.merges", ARR, (STR, merges)), ("tokenizer.ggml.bos_token_id", U32, 1),
                ("tokenizer.ggml.eos_token_id", U32, 2), ("tokenizer.ggml.padding_token_id", U32, 2),
                ("tokenizer.chat_template", STR, "{{ messages }}")]
    path = write(tmp_path, gguf_bytes(metadata, gguf_tensors))

    hf = hf_llama_tensors(GGUFFile(path))
    torch.testing.assert_close(hf["model.layers.1.self_attn.k_proj.weight"],
                               reference.state_dict()["model.layers.1.self_attn.k_proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(hf["model.embed_tokens.weight"], torch.from_numpy(embedding).reshape(-1, 64),
                               rtol=0, atol=0)

    folder = load_converter().convert(path, tmp_path / "hf")
    converted = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert converted.config.rms_norm_eps == 1e-5 and converted.config.num_key_value_heads == 2
    with torch.no_grad():
        reference.model.embed_tokens.weight.copy_(torch.from_numpy(embedding).reshape(-1, 64))  # quantised
        ids = torch.tensor([[5, 9, 200, 17, 3, 44, 101]])
        torch.testing.assert_close(converted(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    the, cat = tokens.index("Ġthe"), tokens.index("Ġcat")
    assert tokenizer.encode(" the cat 42<|im_end|>", add_special_tokens=False) == [
        the, cat, tokens.index("Ġ"), tokens.index("4"), tokens.index("2"), 2]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token == "<|im_start|>"
    assert tokenizer.chat_template == "{{ messages }}"


def test_tokenizer_rejects_unknown_pre_tokenizer() -> None:
    tokens, token_types, merges = tiny_vocab()
    converter = load_converter()
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "mystery", "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.token_type": token_types, "tokenizer.ggml.merges": merges}
    with pytest.raises(GGUFError, match="'mystery' is not mapped"):
        converter.build_tokenizer(metadata)
