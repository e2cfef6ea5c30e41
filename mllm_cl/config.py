"""One config system: dataclasses, named presets kept as data, JSON files and `key=value` overrides.

Model presets follow litgpt: one `LLMConfig` describes both GPT-NeoX (Pythia) and LLaMA (Vicuna,
SmolLM2) through a handful of flags; `VisionConfig` describes a CLIP ViT tower.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


# In `input_ids`, each position an image's projected patch features will fill holds this id (one per
# image token, expanded at collate time); in `labels`, this id marks a position left out of the loss.
IMAGE_PLACEHOLDER_ID = -200
IGNORE_INDEX = -100


class ConfigError(ValueError):
    """A config file or override that does not fit the dataclass it targets."""


@dataclass
class LLMConfig:
    """A decoder-only transformer. `arch` picks the Hugging Face layout it is read from and written to."""

    name: str = "tiny"
    arch: str = "gpt_neox"  # "gpt_neox" (Pythia) or "llama" (LLaMA, Vicuna, SmolLM2)
    vocab_size: int = 512
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4  # < n_head: grouped-query attention
    d_model: int = 128
    d_ff: int = 512
    rotary_pct: float = 1.0  # share of each head's dims that get rotary embeddings (Pythia: 0.25)
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    norm: str = "layernorm"  # "layernorm" or "rmsnorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # "gelu" (Linear-GELU-Linear) or "swiglu"
    bias: bool = True  # biases on every linear layer (GPT-NeoX) or none (LLaMA)
    parallel_residual: bool = True  # x + attn(ln1(x)) + mlp(ln2(x)) instead of two sequential residuals
    tie_embeddings: bool = False
    dropout: float = 0.0  # on attention output and MLP output (all real presets: 0)
    init_std: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | None = 0
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.arch not in ("gpt_neox", "llama"):
            raise ConfigError(f"LLMConfig.arch must be 'gpt_neox' or 'llama', got {self.arch!r}")
        if self.d_model % self.n_head:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.norm not in ("layernorm", "rmsnorm") or self.mlp not in ("gelu", "swiglu"):
            raise ConfigError(f"unknown norm {self.norm!r} or mlp {self.mlp!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_pct)


@dataclass
class VisionConfig:
    """A CLIP ViT vision tower and which of its features LLaVA takes."""

    name: str = "clip-tiny"
    image_size: int = 64
    patch_size: int = 8
    num_channels: int = 3
    d_model: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_ff: int = 512
    norm_eps: float = 1e-5
    projection_dim: int = 128  # CLIP's joint image/text embedding width (pretrain-vision only)
    select_layer: int = -2  # hidden states of this encoder layer (LLaVA: the second to last)
    select_feature: str = "patch"  # "patch" drops the class token, "cls_patch" keeps it

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.select_feature not in ("patch", "cls_patch"):
            raise ConfigError(f"select_feature must be 'patch' or 'cls_patch', got {self.select_feature!r}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_image_tokens(self) -> int:
        """How many positions one image takes in the LLM's sequence."""
        return self.num_patches + (1 if self.select_feature == "cls_patch" else 0)


def _pythia(name: str, d_model: int, n_layer: int, n_head: int) -> dict[str, Any]:
    return dict(name=name, arch="gpt_neox", vocab_size=50304, n_layer=n_layer, n_head=n_head, n_kv_head=n_head,
                d_model=d_model, d_ff=4 * d_model, rotary_pct=0.25, rope_theta=10000.0, max_seq_len=2048,
                norm="layernorm", norm_eps=1e-5, mlp="gelu", bias=True, parallel_residual=True,
                tie_embeddings=False, bos_token_id=0, eos_token_id=0)


def _llama(name: str, **kw: Any) -> dict[str, Any]:
    base = dict(name=name, arch="llama", norm="rmsnorm", mlp="swiglu", bias=False, parallel_residual=False,
                rotary_pct=1.0, bos_token_id=1, eos_token_id=2)
    return {**base, **kw}


LLM_PRESETS: dict[str, dict[str, Any]] = {
    "pythia-14m": _pythia("pythia-14m", 128, 6, 4),
    "pythia-70m": _pythia("pythia-70m", 512, 6, 8),
    "pythia-160m": _pythia("pythia-160m", 768, 12, 12),
    "pythia-410m": _pythia("pythia-410m", 1024, 24, 16),
    "pythia-1b": _pythia("pythia-1b", 2048, 16, 8),
    "pythia-1.4b": _pythia("pythia-1.4b", 2048, 24, 16),
    "pythia-2.8b": _pythia("pythia-2.8b", 2560, 32, 32),
    "vicuna-7b": _llama("vicuna-7b", vocab_size=32000, n_layer=32, n_head=32, n_kv_head=32, d_model=4096,
                        d_ff=11008, max_seq_len=4096, norm_eps=1e-5, tie_embeddings=False, pad_token_id=0),
    "llama-2-7b": _llama("llama-2-7b", vocab_size=32000, n_layer=32, n_head=32, n_kv_head=32, d_model=4096,
                         d_ff=11008, max_seq_len=4096, norm_eps=1e-5, tie_embeddings=False),
    "smollm2-135m": _llama("smollm2-135m", vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, d_model=576,
                           d_ff=1536, max_seq_len=8192, rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True,
                           pad_token_id=2),
    # The CPU demo's language model: Pythia's architecture at a size two cores train in minutes.
    "tiny": dict(_pythia("tiny", 128, 4, 4), vocab_size=1024, d_ff=512, max_seq_len=512),
}

VISION_PRESETS: dict[str, dict[str, Any]] = {
    "clip-vit-l-14-336": dict(name="clip-vit-l-14-336", image_size=336, patch_size=14, d_model=1024, n_layer=24,
                              n_head=16, d_ff=4096, projection_dim=768),
    "clip-vit-b-16": dict(name="clip-vit-b-16", image_size=224, patch_size=16, d_model=768, n_layer=12, n_head=12,
                          d_ff=3072, projection_dim=512),
    "clip-tiny": dict(name="clip-tiny", image_size=64, patch_size=8, d_model=128, n_layer=4, n_head=4, d_ff=512,
                      projection_dim=128),
}


def llm_preset(name: str, **overrides: Any) -> LLMConfig:
    if name not in LLM_PRESETS:
        raise ConfigError(f"unknown LLM preset {name!r}; known: {', '.join(sorted(LLM_PRESETS))}")
    return LLMConfig(**{**LLM_PRESETS[name], **overrides})


def vision_preset(name: str, **overrides: Any) -> VisionConfig:
    if name not in VISION_PRESETS:
        raise ConfigError(f"unknown vision preset {name!r}; known: {', '.join(sorted(VISION_PRESETS))}")
    return VisionConfig(**{**VISION_PRESETS[name], **overrides})


# ---------------------------------------------------------------- dataclass <-> dict, JSON and overrides

def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from a plain dict, recursing into nested dataclasses; unknown keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}")
    return cls(**kwargs)


_SCALARS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """`value` checked against the field's type hint (ints become floats where a float is wanted); a value of
    the wrong type is a ConfigError naming the key, instead of a TypeError deep inside the run."""
    if hint is Any or isinstance(hint, TypeVar):
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object of {hint.__name__} settings, got {value!r}")
        return from_dict(hint, value, where)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _coerce(arm, value, where)
            except ConfigError as e:
                errors.append(str(e).removeprefix(f"{where}: "))
        raise ConfigError(f"{where}: {' or '.join(errors)}{' or null' if type(None) in args else ''}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected a list of {len(args)} items, got {value!r}")
            items = list(args)
        else:
            items = [args[0] if args else Any] * len(value)
        return type(value)(_coerce(h, v, f"{where}[{i}]") for i, (h, v) in enumerate(zip(items, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {value!r}")
        value_hint = args[1] if args else Any
        return {k: _coerce(value_hint, v, f"{where}.{k}") for k, v in value.items()}
    if hint is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: expected a path (a string), got {value!r}")
        return Path(value)
    if hint in _SCALARS:
        is_int = isinstance(value, int) and not isinstance(value, bool)  # in Python, True is an int too
        if hint is float and is_int:
            return float(value)
        if not (is_int if hint is int else isinstance(value, hint)):
            raise ConfigError(f"{where}: expected {_SCALARS[hint]}, got {value!r}")
    return value


def load_json(cls: type[T], path: str | Path) -> T:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    return from_dict(cls, data, str(path))


def parse_value(text: str) -> Any:
    """`1e-3` -> float, `true` -> True, `[a,b]` -> ["a", "b"], JSON where it parses, else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [parse_value(part.strip()) for part in inner.split(",")] if inner else []
    return text


def apply_overrides(config: T, overrides: list[str]) -> T:
    """Return a copy of `config` with `a.b.c=value` overrides applied; a wrong key names the known ones."""
    data = to_dict(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                known = sorted(node) if isinstance(node, dict) else []
                raise ConfigError(f"override {item!r}: no key {'.'.join(parts[:depth + 1])!r}; known: {known}")
            if depth == len(parts) - 1:
                node[part] = parse_value(text)
            else:
                node = node[part]
    return from_dict(type(config), data)

