"""A small reader for GGUF files (llama.cpp's weight format) and their conversion to Hugging Face LLaMA tensors.

GGUF (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), little-endian throughout:

    magic "GGUF" | version u32 (2 or 3) | n_tensors u64 | n_metadata u64
    n_metadata x (key: string, value_type u32, value)       string = u64 length + UTF-8 bytes
    n_tensors  x (name: string, n_dims u32, dims u64[n_dims] fastest-first, ggml_type u32, offset u64)
    padding to `general.alignment` (default 32), then the tensor data; each offset is relative to its start.

The file is memory-mapped with numpy; quantised blocks are dequantised with vectorised numpy.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mllm_cl.errors import UserError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# Metadata value types: id -> struct format of the fixed-size scalars (u8 i8 u16 i16 u32 i32 f32 bool u64 i64 f64).
SCALAR_TYPES: dict[int, str] = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
                                11: "<q", 12: "<d"}
FLOAT32_TYPE, STRING_TYPE, ARRAY_TYPE = 6, 8, 9

# ggml tensor types this reader dequantises: id -> (name, elements per block, bytes per block).
# These are the types of SmolLM2-135M-Instruct.Q4_1.gguf (Q8_0 embeddings, Q4_1 linears, F32 norms) plus F16.
F32, F16, Q4_1, Q8_0 = 0, 1, 3, 8
TENSOR_TYPES: dict[int, tuple[str, int, int]] = {
    F32: ("F32", 1, 4),
    F16: ("F16", 1, 2),
    Q4_1: ("Q4_1", 32, 2 + 2 + 16),  # fp16 d, fp16 m, 16 bytes of nibbles: d * q + m
    Q8_0: ("Q8_0", 32, 2 + 32),  # fp16 d, 32 int8: d * q
}


class GGUFError(UserError, ValueError):
    """A GGUF file that is not GGUF, is cut short, or holds something this reader does not handle."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (slowest-first): GGUF's dims reversed
    ggml_type: int
    offset: int  # absolute byte offset in the file

    @property
    def type_name(self) -> str:
        return TENSOR_TYPES.get(self.ggml_type, (f"ggml type {self.ggml_type}",))[0]

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def n_bytes(self) -> int:
        _, block, size = TENSOR_TYPES[self.ggml_type]
        return self.n_elements // block * size


class _Cursor:
    """Reads little-endian values from a byte buffer, naming the file when it runs out."""

    def __init__(self, buffer: memoryview, path: Path) -> None:
        self.buffer, self.path, self.pos = buffer, path, 0

    def take(self, n: int, what: str) -> memoryview:
        if self.pos + n > len(self.buffer):
            raise GGUFError(f"{self.path} is truncated: reading {what} at byte {self.pos} needs {n} bytes, "
                            f"the file has {len(self.buffer)}; download it again")
        chunk = self.buffer[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        raw = bytes(self.take(n, what))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{self.path}: {what} at byte {self.pos - n} is not valid UTF-8") from None

    def value(self, value_type: int, what: str) -> Any:
        if value_type == FLOAT32_TYPE:  # the shortest decimal that reads back to the same float32: 1e-05
            return float(str(np.float32(self.scalar("<f", what))))
        if value_type in SCALAR_TYPES:
            return self.scalar(SCALAR_TYPES[value_type], what)
        if value_type == STRING_TYPE:
            return self.string(what)
        if value_type == ARRAY_TYPE:
            item_type = self.scalar("<I", what)
            n = self.scalar("<Q", what)
            if item_type in SCALAR_TYPES:  # one numpy read for the whole array (token scores, types, ...)
                dtype = np.dtype(SCALAR_TYPES[item_type])
                return np.frombuffer(self.take(n * dtype.itemsize, what), dtype=dtype).tolist()
            return [self.value(item_type, f"{what}[{i}]") for i in range(n)]
        raise GGUFError(f"{self.path}: {what} has unknown metadata value type {value_type}")


class GGUFFile:
    """An open GGUF file: `version`, `metadata` (key -> value), `tensors` (name -> TensorInfo), `tensor(name)`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise GGUFError(f"GGUF file {self.path} does not exist")
        if self.path.stat().st_size < 4:
            raise GGUFError(f"{self.path} is not a GGUF file: it is only {self.path.stat().st_size} bytes long")
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        cursor = _Cursor(memoryview(self._data), self.path)
        magic = bytes(cursor.take(4, "the magic"))
        if magic != MAGIC:
            raise GGUFError(f"{self.path} is not a GGUF file: it starts with {magic!r}, not {MAGIC!r}")
        self.version = cursor.scalar("<I", "the version")
        if self.version not in (2, 3):
            raise GGUFError(f"{self.path} is GGUF version {self.version}; this reader handles versions 2 and 3")
        n_tensors = cursor.scalar("<Q", "the tensor count")
        n_metadata = cursor.scalar("<Q", "the metadata count")

        self.metadata: dict[str, Any] = {}
        for i in range(n_metadata):
            key = cursor.string(f"metadata key #{i}")
            self.metadata[key] = cursor.value(cursor.scalar("<I", f"the type of {key!r}"), f"metadata {key!r}")

        infos = []
        for i in range(n_tensors):
            name = cursor.string(f"tensor name #{i}")
            n_dims = cursor.scalar("<I", f"the rank of tensor {name!r}")
            dims = [cursor.scalar("<Q", f"the dims of tensor {name!r}") for _ in range(n_dims)]
            ggml_type = cursor.scalar("<I", f"the type of tensor {name!r}")
            offset = cursor.scalar("<Q", f"the offset of tensor {name!r}")
            infos.append((name, tuple(reversed(dims)), ggml_type, offset))

        self.alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        self.data_offset = -(-cursor.pos // self.alignment) * self.alignment  # round up to the alignment
        self.tensors = {name: TensorInfo(name, shape, t, self.data_offset + off) for name, shape, t, off in infos}
        for info in self.tensors.values():
            if info.ggml_type not in TENSOR_TYPES:
                continue  # listed, but only an error if someone asks for its values
            block = TENSOR_TYPES[info.ggml_type][1]
            if info.shape and info.shape[-1] % block:
                raise GGUFError(f"{self.path}: tensor {info.name!r} of shape {info.shape} has rows that are not "
                                f"a whole number of {info.type_name} blocks of {block}")
            if info.offset + info.n_bytes > len(self._data):
                raise GGUFError(f"{self.path} is truncated: tensor {info.name!r} ends at byte "
                                f"{info.offset + info.n_bytes}, the file has {len(self._data)}; download it again")

    def tensor(self, name: str) -> np.ndarray:
        """The tensor dequantised to float32, in torch (slowest-first) shape."""
        if name not in self.tensors:
            raise GGUFError(f"{self.path} has no tensor {name!r}")
        info = self.tensors[name]
        if info.ggml_type not in TENSOR_TYPES:
            known = ", ".join(type_name for type_name, _, _ in TENSOR_TYPES.values())
            raise GGUFError(f"{self.path}: tensor {name!r} has {info.type_name}; this reader dequantises {known}")
        raw = self._data[info.offset:info.offset + info.n_bytes]
        return dequantize(raw, info.ggml_type).reshape(info.shape)


def dequantize(raw: np.ndarray, ggml_type: int) -> np.ndarray:
    """Raw bytes (uint8) of one tensor -> flat float32 values. Block layouts are in TENSOR_TYPES."""
    if ggml_type == F32:
        return raw.view(np.float32).copy()
    if ggml_type == F16:
        return raw.view(np.float16).astype(np.float32)
    _, block, size = TENSOR_TYPES[ggml_type]
    blocks = np.asarray(raw).reshape(-1, size)  # (n_blocks, bytes per block)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # (n_blocks, 1)
    if ggml_type == Q8_0:
        return (d * blocks[:, 2:].view(np.int8).astype(np.float32)).reshape(-1)
    nibbles = blocks[:, -16:]  # (n_blocks, 16): byte j holds element j (low nibble) and j + 16 (high)
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.float32)  # (n_blocks, 32)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)  # Q4_1
    return (d * q + m).reshape(-1)


# ---------------------------------------------------------------- llama.cpp LLaMA -> Hugging Face LLaMA

def unpermute_rotary_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order (rotary pairs interleaved) to get Hugging Face's rotate-half order.

    llama.cpp's converter did `w.reshape(n_head, 2, head_dim // 2, dim).swapaxes(1, 2).reshape(out, dim)`:
    within each head, row 2i is HF row i and row 2i+1 is HF row i + head_dim/2. This applies the inverse.
    """
    out, dim = weight.shape
    return weight.reshape(n_head, out // n_head // 2, 2, dim).transpose(1, 2).reshape(out, dim)


def permute_rotary_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's permutation itself (the inverse of `unpermute_rotary_rows`)."""
    out, dim = weight.shape
    return weight.reshape(n_head, 2, out // n_head // 2, dim).transpose(1, 2).reshape(out, dim)


_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_llama_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`, `token_embd.weight` -> ..."""
    base, _, suffix = gguf_name.rpartition(".")
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    if len(parts) == 1 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{suffix}"
    raise GGUFError(f"GGUF tensor {gguf_name!r} has no Hugging Face LLaMA counterpart")


def llama_metadata(gguf: GGUFFile, key: str) -> Any:
    if gguf.metadata.get("general.architecture") != "llama":
        raise GGUFError(f"{gguf.path} holds a {gguf.metadata.get('general.architecture')!r} model, not 'llama'")
    if f"llama.{key}" not in gguf.metadata:
        raise GGUFError(f"{gguf.path} lacks metadata key 'llama.{key}'")
    return gguf.metadata[f"llama.{key}"]


def hf_llama_tensors(gguf: GGUFFile, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor of a llama.cpp LLaMA GGUF, dequantised, under Hugging Face names and in HF row order."""
    n_head = llama_metadata(gguf, "attention.head_count")
    n_kv_head = llama_metadata(gguf, "attention.head_count_kv")
    names = [hf_llama_name(name) for name in gguf.tensors]  # fails early on a tensor HF LLaMA has no place for
    tensors = {}
    for name, hf_name in zip(gguf.tensors, names):
        weight = torch.from_numpy(gguf.tensor(name))
        if name.endswith(".attn_q.weight"):
            weight = unpermute_rotary_rows(weight, n_head)
        elif name.endswith(".attn_k.weight"):
            weight = unpermute_rotary_rows(weight, n_kv_head)
        tensors[hf_name] = weight.to(dtype)
    return tensors


def hf_llama_config(gguf: GGUFFile) -> dict[str, Any]:
    """A Hugging Face LLaMA `config.json` dict from the GGUF's `llama.*` and `tokenizer.ggml.*` metadata."""
    meta = gguf.metadata
    n_head = llama_metadata(gguf, "attention.head_count")
    d_model = llama_metadata(gguf, "embedding_length")
    if meta.get("llama.rope.scaling.type", "none") != "none":
        raise GGUFError(f"{gguf.path} uses rotary scaling {meta['llama.rope.scaling.type']!r}, which is not converted")
    if "token_embd.weight" not in gguf.tensors:
        raise GGUFError(f"{gguf.path} has no tensor 'token_embd.weight' (the token embedding)")
    vocab_size = gguf.tensors["token_embd.weight"].shape[0]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": d_model,
        "intermediate_size": llama_metadata(gguf, "feed_forward_length"),
        "num_hidden_layers": llama_metadata(gguf, "block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": llama_metadata(gguf, "attention.head_count_kv"),
        "head_dim": meta.get("llama.rope.dimension_count", d_model // n_head),
        "hidden_act": "silu",
        "max_position_embeddings": llama_metadata(gguf, "context_length"),
        "rms_norm_eps": llama_metadata(gguf, "attention.layer_norm_rms_epsilon"),
        "rope_theta": meta.get("llama.rope.freq_base", 10000.0),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
        "attention_bias": False,
        "mlp_bias": False,
    }
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            config[f"{role}_token_id"] = meta[f"tokenizer.ggml.{key}"]
    return config
