"""Hugging Face model folders <-> our modules: GPT-NeoX / LLaMA LLMs and CLIP vision towers.

Strict, like nanoGPT's `from_pretrained`: every expected key must be there with the expected shape and no
other key may be, or `CheckpointMismatchError` names the keys and the file. Safetensors only.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mllm_cl.config import ConfigError, LLMConfig, VisionConfig
from mllm_cl.errors import UserError
from mllm_cl.llm import LanguageModel
from mllm_cl.model_folder import (INDEX_FILE, SINGLE_FILE, check_float_weights, read_config, read_tensors,
                                  write_model_folder)
from mllm_cl.vision import VisionTower

# Buffers that Hugging Face checkpoints may carry and that we recompute instead.
IGNORED_SUFFIXES = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq", "embeddings.position_ids")


class CheckpointMismatchError(UserError, RuntimeError):
    """A checkpoint whose keys or shapes do not match the model its config describes."""


# ---------------------------------------------------------------- HF config <-> LLMConfig

# The values transformers gives a key that a nested config (a llava config.json's text_config / vision_config, a
# CLIP config.json's vision_config) leaves out: transformers 4.x's save_pretrained wrote a nested config as its
# difference from the sub-config class's defaults (llava-hf's LLaVA-1.5 folders were written so), while keys at
# the top level of a config.json are always written. Copied from transformers 5.23's LlamaConfig
# (models/llama/configuration_llama.py) and CLIPVisionConfig (models/clip/configuration_clip.py), the same in 4.36
# (which had no mlp_bias); only the keys our translation reads whose default is not None. tests/test_weights.py
# checks them against transformers.
LLAMA_DEFAULTS: dict[str, Any] = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    hidden_act="silu", max_position_embeddings=2048, initializer_range=0.02, rms_norm_eps=1e-6, bos_token_id=1,
    eos_token_id=2, tie_word_embeddings=False, rope_theta=10000.0, attention_bias=False, mlp_bias=False)
CLIP_VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, projection_dim=512, num_hidden_layers=12, num_attention_heads=12,
    num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
CLASS_DEFAULTS = {"llama": LLAMA_DEFAULTS, "clip_vision_model": CLIP_VISION_DEFAULTS}  # by model_type


def with_class_defaults(nested: dict[str, Any]) -> dict[str, Any]:
    """A nested config with the values transformers fills in for the keys it leaves out (see LLAMA_DEFAULTS);
    one of a model_type without a table here is returned as it is."""
    return {**CLASS_DEFAULTS.get(nested.get("model_type"), {}), **nested}


def _require(config: dict[str, Any], key: str, where: Path) -> Any:
    if config.get(key) is None:
        raise CheckpointMismatchError(f"{where}: config.json lacks {key!r}, which a {config.get('model_type')} "
                                      f"model needs")
    return config[key]


@contextlib.contextmanager
def config_errors(where: Path) -> Iterator[None]:
    """A config.json whose fields have the wrong type or value is a CheckpointMismatchError naming the file."""
    try:
        yield
    except ConfigError as e:
        raise CheckpointMismatchError(f"{where}: {e}") from None
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as e:
        raise CheckpointMismatchError(f"{where}: a field has the wrong type or value "
                                      f"({type(e).__name__}: {e})") from None


def _first_id(value: Any) -> int | None:
    return value[0] if isinstance(value, list) and value else value


def llm_config_from_hf(config: dict[str, Any], name: str = "hf", where: Path = Path("config.json")) -> LLMConfig:
    """Translate a Hugging Face `config.json` (model_type gpt_neox or llama) into an `LLMConfig`."""
    arch = config.get("model_type")
    if arch not in ("gpt_neox", "llama"):
        raise CheckpointMismatchError(f"{where}: model_type {arch!r} is not supported; expected 'gpt_neox' "
                                      f"(Pythia) or 'llama' (LLaMA, Vicuna, SmolLM2)")
    expected_act = "gelu" if arch == "gpt_neox" else "silu"
    if config.get("hidden_act", expected_act) != expected_act:
        raise CheckpointMismatchError(f"{where}: hidden_act {config['hidden_act']!r} is not supported for {arch}; "
                                      f"only {expected_act!r}")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise CheckpointMismatchError(f"{where}: rope_type {rope_type!r} is not supported; only plain rotary "
                                      f"('default') is implemented")
    theta = rope.get("rope_theta", config.get("rope_theta", config.get("rotary_emb_base", 10000.0)))
    default_pct = 0.25 if arch == "gpt_neox" else 1.0
    rotary_pct = rope.get("partial_rotary_factor",
                          config.get("partial_rotary_factor", config.get("rotary_pct", default_pct)))
    d_model, n_head = _require(config, "hidden_size", where), _require(config, "num_attention_heads", where)
    common = dict(name=name, arch=arch, vocab_size=_require(config, "vocab_size", where),
                  n_layer=_require(config, "num_hidden_layers", where), n_head=n_head, d_model=d_model,
                  d_ff=_require(config, "intermediate_size", where), rope_theta=float(theta),
                  max_seq_len=config.get("max_position_embeddings", 2048),
                  tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                  init_std=config.get("initializer_range", 0.02),
                  bos_token_id=_first_id(config.get("bos_token_id")),
                  eos_token_id=_first_id(config.get("eos_token_id")),
                  pad_token_id=_first_id(config.get("pad_token_id")))
    if arch == "gpt_neox":
        if not config.get("attention_bias", True):
            raise CheckpointMismatchError(f"{where}: GPT-NeoX without attention biases is not supported")
        return LLMConfig(**common, n_kv_head=n_head, rotary_pct=float(rotary_pct), norm="layernorm",
                         norm_eps=config.get("layer_norm_eps", 1e-5), mlp="gelu", bias=True,
                         parallel_residual=bool(config.get("use_parallel_residual", True)))
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise CheckpointMismatchError(f"{where}: LLaMA with attention_bias/mlp_bias is not supported")
    if config.get("head_dim") not in (None, d_model // n_head):
        raise CheckpointMismatchError(f"{where}: head_dim {config['head_dim']} != hidden_size/num_attention_heads "
                                      f"= {d_model // n_head} is not supported")
    if rotary_pct != 1.0:
        raise CheckpointMismatchError(f"{where}: LLaMA with partial rotary ({rotary_pct}) is not supported")
    return LLMConfig(**common, n_kv_head=config.get("num_key_value_heads") or n_head, rotary_pct=1.0,
                     norm="rmsnorm", norm_eps=config.get("rms_norm_eps", 1e-6), mlp="swiglu", bias=False,
                     parallel_residual=False)


def llm_config_to_hf(config: LLMConfig) -> dict[str, Any]:
    """The `config.json` transformers reads (both its 4.x keys and the 5.x `rope_parameters`)."""
    problems = []
    if config.arch == "gpt_neox":
        wanted = dict(norm="layernorm", mlp="gelu", bias=True, n_kv_head=config.n_head)
    else:
        wanted = dict(norm="rmsnorm", mlp="swiglu", bias=False, parallel_residual=False, rotary_pct=1.0)
    for key, value in wanted.items():
        if getattr(config, key) != value:
            problems.append(f"{key}={getattr(config, key)!r} (needs {value!r})")
    if problems:
        raise ValueError(f"LLM config {config.name!r} cannot be written as a Hugging Face {config.arch} model: "
                         f"{', '.join(problems)}")
    hf = dict(vocab_size=config.vocab_size, hidden_size=config.d_model, num_hidden_layers=config.n_layer,
              num_attention_heads=config.n_head, intermediate_size=config.d_ff,
              max_position_embeddings=config.max_seq_len,
              tie_word_embeddings=config.tie_embeddings, initializer_range=config.init_std,
              bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    if config.arch == "gpt_neox":
        return dict(hf, architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox", hidden_act="gelu",
                    rotary_pct=config.rotary_pct, rotary_emb_base=config.rope_theta, layer_norm_eps=config.norm_eps,
                    use_parallel_residual=config.parallel_residual, attention_bias=True,
                    rope_parameters=dict(rope_type="default", rope_theta=config.rope_theta,
                                         partial_rotary_factor=config.rotary_pct))
    return dict(hf, architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                num_key_value_heads=config.n_kv_head, head_dim=config.head_dim, rms_norm_eps=config.norm_eps,
                rope_theta=config.rope_theta, attention_bias=False, mlp_bias=False,
                rope_parameters=dict(rope_type="default", rope_theta=config.rope_theta))


# ---------------------------------------------------------------- HF state dict <-> ours
# Each of our tensors comes from one or more HF tensors: copied, concatenated along rows
# (LLaMA's q/k/v and gate/up), or de-interleaved (NeoX's fused query_key_value, rows [q0,k0,v0,q1,...]).

Rule = tuple[str, list[str], str]  # (our key, HF keys, "copy" | "concat" | "neox_qkv")


def _llm_rules(config: LLMConfig) -> list[Rule]:
    neox = config.arch == "gpt_neox"
    base, layer = ("gpt_neox.", "gpt_neox.layers.") if neox else ("model.", "model.layers.")
    norm_params = ("weight", "bias") if config.norm == "layernorm" else ("weight",)
    params = ("weight", "bias") if config.bias else ("weight",)
    rules: list[Rule] = [("token_embedding.weight", [base + ("embed_in.weight" if neox else "embed_tokens.weight")],
                          "copy")]
    for i in range(config.n_layer):
        ours, hf = f"blocks.{i}.", f"{layer}{i}."
        for p in norm_params:
            rules += [(f"{ours}norm_1.{p}", [f"{hf}input_layernorm.{p}"], "copy"),
                      (f"{ours}norm_2.{p}", [f"{hf}post_attention_layernorm.{p}"], "copy")]
        for p in params:
            if neox:
                rules += [(f"{ours}attn.qkv.{p}", [f"{hf}attention.query_key_value.{p}"], "neox_qkv"),
                          (f"{ours}attn.proj.{p}", [f"{hf}attention.dense.{p}"], "copy"),
                          (f"{ours}mlp.fc.{p}", [f"{hf}mlp.dense_h_to_4h.{p}"], "copy"),
                          (f"{ours}mlp.proj.{p}", [f"{hf}mlp.dense_4h_to_h.{p}"], "copy")]
            else:
                rules += [(f"{ours}attn.qkv.{p}", [f"{hf}self_attn.{n}_proj.{p}" for n in "qkv"], "concat"),
                          (f"{ours}attn.proj.{p}", [f"{hf}self_attn.o_proj.{p}"], "copy"),
                          (f"{ours}mlp.gate_up.{p}", [f"{hf}mlp.gate_proj.{p}", f"{hf}mlp.up_proj.{p}"], "concat"),
                          (f"{ours}mlp.proj.{p}", [f"{hf}mlp.down_proj.{p}"], "copy")]
    rules += [(f"norm.{p}", [base + ("final_layer_norm." if neox else "norm.") + p], "copy") for p in norm_params]
    if not config.tie_embeddings:
        rules.append(("lm_head.weight", ["embed_out.weight" if neox else "lm_head.weight"], "copy"))
    return rules


def _split_sizes(our_key: str, config: LLMConfig) -> list[int]:
    if ".attn.qkv." in our_key:
        kv = config.n_kv_head * config.head_dim
        return [config.n_head * config.head_dim, kv, kv]
    return [config.d_ff, config.d_ff]  # mlp.gate_up


def _neox_qkv(tensor: torch.Tensor, n_head: int, to_ours: bool) -> torch.Tensor:
    """Rows (n_head, 3, hs) interleaved per head <-> (3, n_head, hs) grouped by q/k/v; trailing dims kept."""
    rest = tensor.shape[1:]
    shape = (n_head, 3, -1, *rest) if to_ours else (3, n_head, -1, *rest)
    return tensor.reshape(shape).transpose(0, 1).reshape(tensor.shape)


def _expected_hf_shapes(config: LLMConfig, shapes: dict[str, torch.Size]) -> dict[str, tuple[int, ...]]:
    expected = {}
    for ours, hf_keys, kind in _llm_rules(config):
        if kind == "concat":
            for key, rows in zip(hf_keys, _split_sizes(ours, config)):
                expected[key] = (rows, *shapes[ours][1:])
        else:
            expected[hf_keys[0]] = tuple(shapes[ours])
    return expected


def llm_state_dict_from_hf(tensors: dict[str, torch.Tensor], config: LLMConfig) -> dict[str, torch.Tensor]:
    """Our `LanguageModel` state dict from HF tensors whose keys and shapes have been checked."""
    state = {}
    for ours, hf_keys, kind in _llm_rules(config):
        if kind == "copy":
            state[ours] = tensors[hf_keys[0]]
        elif kind == "concat":
            state[ours] = torch.cat([tensors[k] for k in hf_keys], dim=0)
        else:
            state[ours] = _neox_qkv(tensors[hf_keys[0]], config.n_head, to_ours=True)
    return state


def hf_state_dict_from_llm(model: LanguageModel) -> dict[str, torch.Tensor]:
    """HF tensors (fresh storage, never views of the parameters) for a `LanguageModel`."""
    config, state = model.config, model.state_dict()
    tensors = {}
    for ours, hf_keys, kind in _llm_rules(config):
        tensor = state[ours].detach()
        if kind == "copy":
            tensors[hf_keys[0]] = tensor.clone()
        elif kind == "concat":
            for key, part in zip(hf_keys, tensor.split(_split_sizes(ours, config), dim=0)):
                tensors[key] = part.clone()
        else:
            tensors[hf_keys[0]] = _neox_qkv(tensor, config.n_head, to_ours=False).clone()
    return tensors


# ---------------------------------------------------------------- strict checking

def _file_of(folder: Path, key: str) -> str:
    index = folder / INDEX_FILE
    if index.is_file():
        return str(folder / json.loads(index.read_text())["weight_map"].get(key, INDEX_FILE))
    return str(folder / SINGLE_FILE)


def _few(keys: list[str], describe: Callable[[str], str] = str) -> str:
    shown = ", ".join(describe(k) for k in keys[:5])
    return shown + (f" ... and {len(keys) - 5} more ({len(keys)} in all)" if len(keys) > 5 else "")


def check_tensors(folder: Path, tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                  what: str) -> None:
    """Raise CheckpointMismatchError on any missing key, unexpected key or wrong shape."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tuple(tensors[k].shape) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append(f"missing key(s): {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected key(s): {_few(unexpected, lambda k: f'{k} (in {_file_of(folder, k)})')}")
    if wrong:
        problems.append("wrong shape(s): " + _few(wrong, lambda k: f"{k} is {tuple(tensors[k].shape)}, expected "
                                                                   f"{tuple(expected[k])} (in {_file_of(folder, k)})"))
    if problems:
        raise CheckpointMismatchError(f"{folder} does not match the {what} its config.json describes; "
                                      + "; ".join(problems)
                                      + ". Check that config.json belongs to these weights.")
    check_float_weights(tensors, folder, expected)


def _drop_ignored(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if not k.endswith(IGNORED_SUFFIXES)}


# ---------------------------------------------------------------- LLM

def load_llm(folder: str | Path, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None) -> LanguageModel:
    """A `LanguageModel` from a Hugging Face GPT-NeoX or LLaMA folder (config.json + safetensors)."""
    folder = Path(folder)
    with config_errors(folder / "config.json"):
        config = llm_config_from_hf(read_config(folder), name=folder.name, where=folder / "config.json")
    return llm_from_hf_tensors(config, read_tensors(folder, device or "cpu"), folder, dtype)


def llm_from_hf_tensors(config: LLMConfig, tensors: dict[str, torch.Tensor], where: Path,
                        dtype: torch.dtype | None = None) -> LanguageModel:
    """A `LanguageModel` from Hugging Face-named tensors (`gpt_neox.*`/`embed_out.*` or `model.*`/`lm_head.*`),
    checked strictly; `where` names the folder in errors."""
    tensors = _drop_ignored(tensors)
    head_key = "embed_out.weight" if config.arch == "gpt_neox" else "lm_head.weight"
    if config.tie_embeddings and head_key in tensors:
        # Some exporters write the tied head out anyway; accept it only if it really is the embedding.
        embed_key = "gpt_neox.embed_in.weight" if config.arch == "gpt_neox" else "model.embed_tokens.weight"
        if embed_key in tensors and torch.equal(tensors[head_key], tensors[embed_key]):
            del tensors[head_key]
    with torch.device("meta"):
        model = LanguageModel(config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    check_tensors(where, tensors, _expected_hf_shapes(config, shapes), f"{config.arch} model")
    state = llm_state_dict_from_hf(tensors, config)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    if config.tie_embeddings:
        state["lm_head.weight"] = state["token_embedding.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.token_embedding.weight
    model.build_rope_tables()
    return model


def save_llm(model: LanguageModel, folder: str | Path, tokenizer_from: str | Path | None = None) -> Path:
    """Write `model` as a Hugging Face folder that `AutoModelForCausalLM.from_pretrained` loads."""
    config = llm_config_to_hf(model.config)  # first: it says why a config has no Hugging Face form
    return write_model_folder(folder, hf_state_dict_from_llm(model), config, copy_from=tokenizer_from)


# ---------------------------------------------------------------- CLIP vision tower

VISION_PREFIX = "vision_model."
CLIP_OTHER_PREFIXES = ("text_model.", "visual_projection.", "text_projection.", "logit_scale")


def vision_config_from_hf(config: dict[str, Any], name: str = "clip",
                          where: Path = Path("config.json")) -> VisionConfig:
    """A `VisionConfig` from a CLIPConfig (`vision_config` inside) or CLIPVisionConfig `config.json`."""
    model_type = config.get("model_type")
    if model_type == "clip":
        vision = config.get("vision_config")
        if not isinstance(vision, dict):
            raise CheckpointMismatchError(f"{where}: a CLIP config.json needs a 'vision_config' object")
        vision = with_class_defaults({"model_type": "clip_vision_model", **vision})
    elif model_type == "clip_vision_model":
        vision = config
    else:
        raise CheckpointMismatchError(f"{where}: model_type {model_type!r} is not a CLIP vision tower; expected "
                                      f"'clip' or 'clip_vision_model'")
    if vision.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise CheckpointMismatchError(f"{where}: vision hidden_act {vision['hidden_act']!r} is not supported; "
                                      f"only 'quick_gelu'")
    ours = config.get("mllm_cl", {})
    return VisionConfig(name=name, image_size=_require(vision, "image_size", where),
                        patch_size=_require(vision, "patch_size", where), num_channels=vision.get("num_channels", 3),
                        d_model=_require(vision, "hidden_size", where),
                        n_layer=_require(vision, "num_hidden_layers", where),
                        n_head=_require(vision, "num_attention_heads", where),
                        d_ff=_require(vision, "intermediate_size", where), norm_eps=vision.get("layer_norm_eps", 1e-5),
                        projection_dim=vision.get("projection_dim", config.get("projection_dim", 512)),
                        select_layer=ours.get("select_layer", VisionConfig.select_layer),
                        select_feature=ours.get("select_feature", VisionConfig.select_feature))


def vision_config_to_hf(config: VisionConfig) -> dict[str, Any]:
    return dict(architectures=["CLIPVisionModel"], model_type="clip_vision_model", hidden_act="quick_gelu",
                hidden_size=config.d_model, intermediate_size=config.d_ff, num_hidden_layers=config.n_layer,
                num_attention_heads=config.n_head, num_channels=config.num_channels, image_size=config.image_size,
                patch_size=config.patch_size, layer_norm_eps=config.norm_eps, projection_dim=config.projection_dim,
                mllm_cl=dict(select_layer=config.select_layer, select_feature=config.select_feature))


def load_vision_tower(folder: str | Path, device: torch.device | str | None = None,
                      dtype: torch.dtype | None = None) -> nn.Module:
    """A `mllm_cl.vision.VisionTower` from a CLIPModel or CLIPVisionModel folder (its vision part).

    Keys are `vision_model.*` (CLIPModel; CLIPVisionModel as transformers 4 and the Hub store it) or, as
    transformers 5 saves a CLIPVisionModel, the same keys without that prefix.
    """
    folder = Path(folder)
    with config_errors(folder / "config.json"):
        config = vision_config_from_hf(read_config(folder), name=folder.name, where=folder / "config.json")
    return vision_from_hf_tensors(config, read_tensors(folder, device or "cpu"), folder, device, dtype)


def vision_from_hf_tensors(config: VisionConfig, tensors: dict[str, torch.Tensor], where: Path,
                           device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> VisionTower:
    """A `VisionTower` from CLIP vision tensors, with or without the `vision_model.` prefix, checked strictly."""
    tensors = _drop_ignored(tensors)
    if any(k.startswith(CLIP_OTHER_PREFIXES) for k in tensors):  # a full CLIPModel: keep its vision part
        tensors = {k: v for k, v in tensors.items() if not k.startswith(CLIP_OTHER_PREFIXES)}
    if not any(k.startswith(VISION_PREFIX) for k in tensors):  # transformers 5 saves CLIPVisionModel unprefixed
        tensors = {VISION_PREFIX + k: v for k, v in tensors.items()}
    with torch.device(device or "cpu"):
        tower = VisionTower(config)
    expected = {VISION_PREFIX + k: tuple(v.shape) for k, v in tower.state_dict().items()}
    check_tensors(where, tensors, expected, "CLIP vision tower")
    tower.load_state_dict({k[len(VISION_PREFIX):]: v for k, v in tensors.items()}, strict=True)
    return tower if dtype is None else tower.to(dtype)


def save_vision_tower(tower: nn.Module, folder: str | Path) -> Path:
    """Write a CLIPVisionModel-layout folder (`vision_model.*` keys, the Hub's layout) that transformers loads."""
    tensors = {VISION_PREFIX + k: v.detach().clone() for k, v in tower.state_dict().items()}
    return write_model_folder(folder, tensors, vision_config_to_hf(tower.config))
