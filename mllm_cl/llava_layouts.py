"""LLaVA checkpoints in the two layouts other tools use, read into our parts and written from them.

    transformers  `LlavaForConditionalGeneration` (config.json "model_type": "llava"): `text_config` and
                  `vision_config` inside the config, where a key left out has its transformers default
                  (llava-hf's LLaVA-1.5 config.json is sparse: see `LLAVA_DEFAULTS`); weights `language_model.*`
                  (the text model's own keys), `vision_tower.[vision_model.]*`, `multi_modal_projector.linear_{1,2}.*`;
                  transformers 5's in-memory names (`model.language_model.*`, `model.vision_tower.*`, `lm_head.*`)
                  are read too. `vision_feature_layer` is our select_layer; `vision_feature_select_strategy`
                  "default" drops the class token ("patch"), "full" keeps it ("cls_patch"). The projector is
                  mlp2x_gelu.
    original      the LLaVA repository's: a LLaMA folder ("model_type" "llava" in LLaVA-1.5's releases,
                  "llava_llama" from the current code) whose config carries `mm_projector_type`,
                  `mm_vision_tower`, `mm_vision_select_layer`, `mm_vision_select_feature`, `mm_hidden_size`, and
                  whose weights hold `model.mm_projector.*`; the CLIP tower named by `mm_vision_tower` is a
                  separate folder. Its weights come as pytorch_model*.bin: convert.py turns them into safetensors.

The two are told apart by their keys (`text_config` against the mm_* keys), since both may say "llava".

Our own layout (llm/, vision/, projector.safetensors) stays in `mllm_cl.llava`, which dispatches here.
Anything these layouts say that we cannot honour is a CheckpointMismatchError naming the field.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer as BackendTokenizer

from mllm_cl.config import ConfigError, LLMConfig, VisionConfig
from mllm_cl.conversation import get_template
from mllm_cl.data import CLIP_MEAN, CLIP_STD
from mllm_cl.llm import LanguageModel
from mllm_cl.model_folder import (CONFIG_FILE, SINGLE_FILE, atomic_save_tensors, check_float_weights,
                                  copy_tokenizer_files, read_config, read_tensors, staged_folder)
from mllm_cl.projector import Projector, build_projector
from mllm_cl.vision import VisionTower
from mllm_cl.weights import (CheckpointMismatchError, config_errors, hf_state_dict_from_llm, llm_config_from_hf,
                             llm_config_to_hf, llm_from_hf_tensors, load_vision_tower, vision_config_from_hf,
                             vision_config_to_hf, vision_from_hf_tensors, with_class_defaults)

HF_MODEL_TYPE = "llava"
ORIGINAL_KEYS = ("mm_projector_type", "mm_hidden_size", "mm_vision_tower")  # the LLaVA repository's config
ORIGINAL_LLAMA_TYPES = ("llava", "llava_llama")  # its LlavaLlamaForCausalLM's model_type: LLaVA-1.5's, current
# transformers 5.23's LlavaConfig (models/llava/configuration_llava.py): the values of the top-level keys we read,
# the model_type of a sub-config that names none, and the CLIP ViT-L/14-336 tower of a config without
# vision_config (a missing text_config is LlamaConfig's defaults). Not image_seq_length: it only sizes the
# processor's prompts, and configs older than it (transformers 4.36's) would get 576 whatever their tower gives.
LLAVA_DEFAULTS: dict[str, Any] = dict(vision_feature_layer=-2, vision_feature_select_strategy="default",
                                      projector_hidden_act="gelu", multimodal_projector_bias=True)
LLAVA_SUB_CONFIG_TYPES = {"text_config": "llama", "vision_config": "clip_vision_model"}
LLAVA_VISION_DEFAULTS: dict[str, Any] = dict(intermediate_size=4096, hidden_size=1024, patch_size=14, image_size=336,
                                             num_hidden_layers=24, num_attention_heads=16, projection_dim=768)
STRATEGIES = {"default": "patch", "full": "cls_patch"}  # transformers' name -> our select_feature
IMAGE_TOKEN = "<image>"
TEMPLATE_KEY = "mllm_cl_template"  # the chat template a model was trained with, kept in config.json
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")  # where a processor finds its chat template
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


@dataclass
class LlavaParts:
    llm: LanguageModel
    vision: VisionTower
    projector: Projector
    template: str  # the chat template the checkpoint was trained with


def is_original_llava(config: dict[str, Any]) -> bool:
    """The LLaVA repository's layout: a config with its mm_* keys (and no transformers `text_config`)."""
    return "text_config" not in config and any(key in config for key in ORIGINAL_KEYS)


def is_hf_llava(config: dict[str, Any]) -> bool:
    """transformers' layout: a config that says "llava" and is not the original's (whose may say so too)."""
    return config.get("model_type") == HF_MODEL_TYPE and not is_original_llava(config)


# ---------------------------------------------------------------- reading

def load_projector(kind: str, vision: VisionTower, llm: LanguageModel, tensors: dict[str, torch.Tensor],
                   where: Path, field: str) -> Projector:
    """The `kind` projector between `vision` and `llm` from its tensors (ours: 0.*, 2.*), checked strictly;
    `where` is the file holding them, `field` the setting that named the kind."""
    try:
        projector = build_projector(kind, vision.config.d_model, llm.config.d_model)
    except ValueError as e:
        raise CheckpointMismatchError(f"{field}={kind!r} is not a projector we have ({e})") from None
    expected = {k: tuple(v.shape) for k, v in projector.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if found != expected:
        raise CheckpointMismatchError(f"{where} does not hold the {kind} projector {vision.config.d_model} -> "
                                      f"{llm.config.d_model} that {field} describes: expected {expected}, "
                                      f"found {found}")
    check_float_weights(tensors, where)
    projector.load_state_dict(tensors, strict=True)
    return projector


def _split_hf_keys(tensors: dict[str, torch.Tensor], arch: str, where: Path) -> tuple[dict, dict, dict]:
    """(text model tensors under their CausalLM names, vision tensors, projector tensors as ours: 0.*, 2.*)."""
    base, head = ("gpt_neox.", "embed_out.weight") if arch == "gpt_neox" else ("model.", "lm_head.weight")
    text, vision, projector, unknown = {}, {}, {}, []
    linear = {"linear_1.": "0.", "linear_2.": "2."}
    for key, value in tensors.items():
        if key.startswith("language_model."):  # transformers 5 writes model.* / lm_head.* whatever the arch
            name = key.removeprefix("language_model.")
            name = head if name == "lm_head.weight" else base + name[len("model."):] if name.startswith(
                "model.") else name
            text[name] = value
        elif key.startswith("model.language_model."):
            text[base + key.removeprefix("model.language_model.")] = value
        elif key == "lm_head.weight":
            text[head] = value
        elif key.startswith(("vision_tower.", "model.vision_tower.")):
            vision[key.removeprefix("model.").removeprefix("vision_tower.")] = value
        elif key.startswith(("multi_modal_projector.", "model.multi_modal_projector.")):
            name = key.removeprefix("model.").removeprefix("multi_modal_projector.")
            layer = next((ours for theirs, ours in linear.items() if name.startswith(theirs)), None)
            if layer is None:
                unknown.append(key)
            else:
                projector[layer + name.split(".", 1)[1]] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointMismatchError(f"{where}: keys that belong to no part of a LLaVA model: {sorted(unknown)[:5]}")
    return text, vision, projector


def _sub_config(config: dict[str, Any], key: str, where: Path) -> dict[str, Any]:
    """config[key] with what transformers fills in: its model_type, the class defaults of the keys it leaves out."""
    nested = config.get(key)
    if nested is None:
        nested = dict(LLAVA_VISION_DEFAULTS) if key == "vision_config" else {}
    if not isinstance(nested, dict):
        raise CheckpointMismatchError(f"{where}: {key} must be an object of settings, got {type(nested).__name__}")
    return with_class_defaults({"model_type": LLAVA_SUB_CONFIG_TYPES[key], **nested})


def hf_llava_configs(config: dict[str, Any], name: str, where: Path) -> tuple[LLMConfig, VisionConfig]:
    """Our LLM and vision tower configs from a transformers llava `config.json` (as sparse as transformers 4.x
    wrote it: what it leaves out is read as transformers reads it); `where` names the file in errors."""
    config = LLAVA_DEFAULTS | config
    text_config, vision_config = _sub_config(config, "text_config", where), _sub_config(config, "vision_config", where)
    layer = config["vision_feature_layer"]
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise CheckpointMismatchError(f"{where}: vision_feature_layer={layer!r}: only one layer (an integer) is "
                                      "supported")
    strategy = config["vision_feature_select_strategy"]
    if strategy not in STRATEGIES:
        raise CheckpointMismatchError(f"{where}: vision_feature_select_strategy={strategy!r} is not supported; "
                                      f"use one of {sorted(STRATEGIES)}")
    if config["projector_hidden_act"] != "gelu" or not config["multimodal_projector_bias"]:
        raise CheckpointMismatchError(f"{where}: only the mlp2x_gelu projector with biases is supported "
                                      f"(projector_hidden_act={config['projector_hidden_act']!r})")
    with config_errors(where):
        llm_config = llm_config_from_hf(text_config, name=name, where=where)
        vision = replace(vision_config_from_hf(vision_config, name=name, where=where), select_layer=layer,
                         select_feature=STRATEGIES[strategy])
    seq = config.get("image_seq_length")
    if seq is not None and seq != vision.num_image_tokens:
        raise CheckpointMismatchError(f"{where}: image_seq_length={seq}, but the tower gives "
                                      f"{vision.num_image_tokens} tokens per image")
    return llm_config, vision


def read_hf_llava(folder: Path, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> LlavaParts:
    """The parts of a transformers `LlavaForConditionalGeneration` folder."""
    config, where = read_config(folder), folder / CONFIG_FILE
    llm_config, vision_config = hf_llava_configs(config, folder.name, where)
    text, vision_tensors, projector_tensors = _split_hf_keys(read_tensors(folder, device or "cpu"),
                                                             llm_config.arch, where)
    llm = llm_from_hf_tensors(llm_config, text, folder, dtype)
    vision = vision_from_hf_tensors(vision_config, vision_tensors, folder, device, dtype)
    projector = load_projector("mlp2x_gelu", vision, llm, projector_tensors, folder, f"{where}: projector")
    return LlavaParts(llm, vision, projector.to(device=device, dtype=dtype),
                      config.get(TEMPLATE_KEY, "vicuna_v1"))


def read_original_llava(folder: Path, vision_folder: str | Path | None = None,
                        device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LlavaParts:
    """The parts of an original-LLaVA folder; the tower comes from `vision_folder` (or `mm_vision_tower` when
    that names a local folder)."""
    config, where = read_config(folder), folder / CONFIG_FILE
    named = config.get("mm_vision_tower", "")
    source = Path(vision_folder) if vision_folder else Path(named) if named and Path(named).is_dir() else None
    if source is None:
        raise CheckpointMismatchError(f"{where}: mm_vision_tower={named!r} is not a local folder; download that "
                                      "CLIP model and pass its folder as the vision tower (vision=...)")
    feature = {"patch": "patch", "cls_patch": "cls_patch"}.get(config.get("mm_vision_select_feature", "patch"))
    if feature is None:
        raise CheckpointMismatchError(f"{where}: mm_vision_select_feature="
                                      f"{config['mm_vision_select_feature']!r} is not supported; use patch or "
                                      "cls_patch")
    tower = load_vision_tower(source, device, dtype)
    try:
        tower.config = replace(tower.config, select_layer=config.get("mm_vision_select_layer", -2),
                               select_feature=feature)
    except ConfigError as e:
        raise CheckpointMismatchError(f"{where}: {e}") from None
    hidden = config.get("mm_hidden_size", tower.config.d_model)
    if hidden != tower.config.d_model:
        raise CheckpointMismatchError(f"{where}: mm_hidden_size={hidden}, but the vision tower in {source} has "
                                      f"width {tower.config.d_model}: it is not the tower this model was trained with")
    tensors = read_tensors(folder, device or "cpu")
    prefix = "model.mm_projector."
    projector_tensors = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    kind = config.get("mm_projector_type", "linear")
    if kind == "linear":  # a plain nn.Linear there, the first layer of our nn.Sequential here
        projector_tensors = {f"0.{k}": v for k, v in projector_tensors.items()}
    if any(k.startswith("model.vision_tower.") for k in tensors):
        raise CheckpointMismatchError(f"{where}: the folder holds vision tower weights (model.vision_tower.*); only "
                                      "a frozen tower from its own folder is supported")
    if config.get("model_type") in ORIGINAL_LLAMA_TYPES:  # a LlavaConfig(LlamaConfig): its LLaMA part reads as one
        config = config | {"model_type": "llama"}
    with config_errors(where):
        llm_config = llm_config_from_hf(config, name=folder.name, where=where)
    llm = llm_from_hf_tensors(llm_config, {k: v for k, v in tensors.items() if not k.startswith(prefix)}, folder,
                              dtype)
    projector = load_projector(kind, tower, llm, projector_tensors, folder, f"{where}: mm_projector_type")
    return LlavaParts(llm, tower, projector.to(device=device, dtype=dtype), "vicuna_v1")


# ---------------------------------------------------------------- writing the transformers layout

def chat_template_jinja(name: str, leading_token: str | None = None) -> str:
    """Our chat template `name` as the Jinja string transformers' `apply_chat_template` renders. A message's
    content is a string or, as llava-hf's model card writes it, a list of {"type": "image"} (rendered "<image>\n")
    and {"type": "text", "text": ...} parts. `leading_token`: the special token the exported tokenizer puts before
    every text it encodes with its special tokens (LLaMA's <s>); a template that begins with it leaves it out, so
    that rendering to text and then calling the processor gives it once, not twice."""
    template = get_template(name)

    def literal(text: str) -> str:
        return "{{ " + json.dumps(text) + " }}" if text else ""

    def with_content(part: str) -> str:
        before, _, after = part.partition("{text}")
        return literal(before) + "{{ content(message['content']) }}" + literal(after)

    content = ("{% macro content(value) %}{% if value is string %}{{ value }}{% else %}{% for part in value %}"
               "{% if part['type'] == 'image' %}" + literal(IMAGE_TOKEN + "\n") + "{% elif part['type'] == 'text' %}"
               "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{% endmacro %}")
    begin = template.begin.replace("{system}", template.system)
    if leading_token and begin.startswith(leading_token):
        begin = begin[len(leading_token):]
    answer = with_content(template.answer) + literal(template.answer_end + template.after_answer)
    return (content + literal(begin) + "{% for message in messages %}{% if message['role'] == 'user' %}"
            + with_content(template.user if template.user_text else "")
            + "{% elif message['role'] == 'assistant' %}" + literal(template.assistant) + answer
            + "{% else %}{{ raise_exception('the " + name + " chat template has a fixed system prompt and only user "
            "and assistant turns, not ' + message['role']) }}{% endif %}{% endfor %}"
            + "{% if add_generation_prompt %}" + literal(template.assistant) + "{% endif %}")


def leading_special_token(tokenizer_file: Path) -> str | None:
    """The token a tokenizer.json's post-processor puts before every text encoded with special tokens, if any."""
    backend = BackendTokenizer.from_file(str(tokenizer_file))
    added, plain = backend.encode("a").ids, backend.encode("a", add_special_tokens=False).ids
    return backend.id_to_token(added[0]) if added[:len(plain)] != plain else None


def _tokenizer_with_image_token(source: Path, staging: Path, vocab_size: int) -> int:
    """Copy the tokenizer files, adding IMAGE_TOKEN (on a spare embedding row) if it has none; return its id."""
    copy_tokenizer_files(source, staging)
    spec = json.loads((staging / "tokenizer.json").read_text())
    added = spec.setdefault("added_tokens", [])
    existing = [t["id"] for t in added if t.get("content") == IMAGE_TOKEN]
    if existing:
        return existing[0]
    ids = [t["id"] for t in added] + list(spec.get("model", {}).get("vocab", {}).values())
    image_id = max(ids) + 1
    if image_id >= vocab_size:
        raise CheckpointMismatchError(f"the tokenizer in {source} uses every one of the LLM's {vocab_size} embedding "
                                      f"rows: there is none left for {IMAGE_TOKEN}")
    added.append({"id": image_id, "content": IMAGE_TOKEN, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True})
    (staging / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    return image_id


def write_hf_llava(llm: LanguageModel, vision: VisionTower, projector: Projector, folder: str | Path,
                   tokenizer_from: str | Path, template: str, keep_from: str | Path | None = None) -> Path:
    """A folder `LlavaForConditionalGeneration.from_pretrained` and `AutoProcessor` load: weights, config, the
    tokenizer with `<image>`, the chat template `template`, and the image processor's settings. `keep_from`: a
    transformers-layout folder the model came from, whose chat template and processor settings are kept as they
    are (its tokenizer files are `tokenizer_from`'s)."""
    if projector.kind != "mlp2x_gelu":
        raise CheckpointMismatchError(f"the transformers LLaVA layout has only the mlp2x_gelu projector; this "
                                      f"model's is {projector.kind}")
    get_template(template)
    vision_config: VisionConfig = vision.config
    # the names transformers itself writes: the text model's base under `model.`, its head as `lm_head`
    base = "gpt_neox." if llm.config.arch == "gpt_neox" else "model."
    head = "embed_out.weight" if llm.config.arch == "gpt_neox" else "lm_head.weight"
    tensors = {"language_model." + ("lm_head.weight" if k == head else "model." + k.removeprefix(base)): v
               for k, v in hf_state_dict_from_llm(llm).items()}
    tensors |= {f"vision_tower.vision_model.{k}": v for k, v in vision.state_dict().items()}
    tensors |= {f"multi_modal_projector.linear_{1 if k.startswith('0.') else 2}.{k.split('.', 1)[1]}": v
                for k, v in projector.state_dict().items()}
    strategy = next(name for name, ours in STRATEGIES.items() if ours == vision_config.select_feature)
    with staged_folder(folder) as staging:
        image_id = _tokenizer_with_image_token(Path(tokenizer_from), staging, llm.config.vocab_size)
        text_config = llm_config_to_hf(llm.config)
        config = {"architectures": ["LlavaForConditionalGeneration"], "model_type": HF_MODEL_TYPE,
                  "text_config": text_config,
                  "vision_config": {k: v for k, v in vision_config_to_hf(vision_config).items() if k != "mllm_cl"},
                  "image_token_index": image_id, "image_seq_length": vision_config.num_image_tokens,
                  "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
                  "vision_feature_layer": vision_config.select_layer, "vision_feature_select_strategy": strategy,
                  "tie_word_embeddings": text_config.get("tie_word_embeddings", False), TEMPLATE_KEY: template}
        atomic_save_tensors(staging / SINGLE_FILE, {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                            metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if keep_from is None:
            _write_chat_template(staging, template)
            _write_processor_settings(staging, vision_config, strategy)
        else:
            for name in (*CHAT_TEMPLATE_FILES, *PROCESSOR_FILES):
                if (Path(keep_from) / name).is_file():
                    shutil.copyfile(Path(keep_from) / name, staging / name)
    return Path(folder)


def _write_chat_template(staging: Path, template: str) -> None:
    """The chat template where transformers' tokenizer (tokenizer_config.json) and processor (chat_template.jinja)
    find it, without the leading token the tokenizer adds itself."""
    jinja = chat_template_jinja(template, leading_special_token(staging / "tokenizer.json"))
    config_file = staging / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    tokenizer_config |= {"chat_template": jinja, "image_token": IMAGE_TOKEN}
    config_file.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
    (staging / CHAT_TEMPLATE_FILES[0]).write_text(jinja)


def _write_processor_settings(staging: Path, vision_config: VisionConfig, strategy: str) -> None:
    """CLIP's image processor settings for the tower's size, and LlavaProcessor's."""
    size = vision_config.image_size
    (staging / PROCESSOR_FILES[0]).write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD), "do_convert_rgb": True}, indent=2))
    (staging / PROCESSOR_FILES[1]).write_text(json.dumps({
        "processor_class": "LlavaProcessor", "image_token": IMAGE_TOKEN, "patch_size": vision_config.patch_size,
        "vision_feature_select_strategy": strategy, "num_additional_image_tokens": 1}, indent=2))
