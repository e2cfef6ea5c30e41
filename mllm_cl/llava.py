"""LLaVA (Liu et al., 2023): a frozen CLIP vision tower, a projector, and a decoder LLM reading both.

    pixels (N,3,H,W) -> vision tower (frozen) -> (N,P,d_vision) -> projector -> (N,P,d_llm) --+
    input_ids (B,T), IMAGE_PLACEHOLDER_ID at the N*P image positions -> LLM embed -> (B,T,d_llm) --splice--> LLM

The splice writes the projected patch features, flattened in order, into the placeholder positions
(one masked_scatter for the whole batch), so text-only and image samples mix freely in one batch.

An optional `PromptPool` (L2P, `mllm_cl.methods.l2p`) puts learned prompt vectors in front of each image sample's
input embeddings; it is saved with the model (prompt_pool.safetensors), so evaluation and resumed runs see it.
So are MoELoRA's experts (`MoELoRALinear`, `mllm_cl.methods.moelora`), beside the plain LLM (moelora.safetensors).
Both are defined here, where the methods and the loader can import them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mllm_cl.config import IMAGE_PLACEHOLDER_ID
from mllm_cl.generation import GenerationOutput, generate
from mllm_cl.llava_layouts import (is_hf_llava, is_original_llava, load_projector, read_hf_llava,
                                   read_original_llava, write_hf_llava)
from mllm_cl.llm import LanguageModel, LMOutput
from mllm_cl.model_folder import (CONFIG_FILE, ModelFolderError, atomic_save_tensors, check_float_weights,
                                  read_config, read_safetensors, staged_folder)
from mllm_cl.projector import Projector
from mllm_cl.vision import VisionTower
from mllm_cl.weights import load_llm, load_vision_tower, save_llm, save_vision_tower

MODEL_TYPE = "mllm_cl_llava"
PROJECTOR_FILE = "projector.safetensors"
PROMPT_POOL_FILE = "prompt_pool.safetensors"
MOELORA_FILE = "moelora.safetensors"
EXPERT_PARTS = ("lora_a", "lora_b", "gate")  # a MoELoRA layer's tensors in MOELORA_FILE
# The chat template of a model whose folder records none (one aligned here, or saved by older code): what
# training (continual.load_init), eval.py and export.py all assume. LLaVA-1.5's own folders say vicuna_v1.
UNRECORDED_TEMPLATE = "pythia"


class PromptPool(nn.Module):
    """L2P's prompt pool (Wang et al. 2022): `size` prompts of `length` LLM input vectors, each with a key in the
    vision tower's feature space. A sample's query is the mean of its images' tower features (B, d_key); the
    `top_n` keys of highest cosine with it pick its prompts, put in front of its input embeddings in that order."""

    def __init__(self, size: int, length: int, top_n: int, d_key: int, d_model: int) -> None:
        super().__init__()
        if not (size >= 0 and length >= 1 and 0 <= top_n <= size):
            raise ValueError(f"a prompt pool needs size >= 0, length >= 1 and 0 <= top_n <= size; got size={size}, "
                             f"length={length}, top_n={top_n}")
        self.top_n = top_n
        self.keys = nn.Parameter(torch.zeros(size, d_key))
        self.prompts = nn.Parameter(torch.zeros(size, length, d_model))

    def queries(self, input_ids: torch.Tensor, vision_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's mean image feature (B, d_key), fp32, and whether the row has an image (B,); vision_features
        (N, P, d_key) are the batch's images in row order, P placeholders each."""
        images_per_row = (input_ids == IMAGE_PLACEHOLDER_ID).sum(dim=1) // vision_features.shape[1]  # (B,)
        row_of_image = torch.repeat_interleave(torch.arange(len(input_ids), device=input_ids.device), images_per_row)
        sums = torch.zeros(len(input_ids), vision_features.shape[-1], device=vision_features.device)
        sums.index_add_(0, row_of_image, vision_features.float().mean(dim=1))
        return sums / images_per_row.clamp(min=1)[:, None], images_per_row > 0

    def similarity(self, queries: torch.Tensor) -> torch.Tensor:
        """Cosine of every query with every key: (B, d_key) -> (B, size)."""
        return F.cosine_similarity(queries[:, None, :], self.keys.float()[None], dim=-1)

    def forward(self, input_ids: torch.Tensor, vision_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The selected prompts (B, top_n * length, d_model) and their attention mask (B, top_n * length): 0 for
        rows without an image, which so get no prompt."""
        queries, has_image = self.queries(input_ids, vision_features)
        chosen = self.similarity(queries).topk(self.top_n, dim=1).indices  # (B, top_n), most similar first
        prompts = self.prompts[chosen].flatten(1, 2)
        return prompts, has_image[:, None].expand(-1, prompts.shape[1]).long()


class MoELoRALinear(nn.Module):
    """MoELoRA's layer (`mllm_cl.methods.moelora`): a frozen `nn.Linear` plus E gated LoRA experts (A, B stacked
    along the rank) and their gate."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, experts: int, dropout: float = 0.0) -> None:
        super().__init__()
        if not (rank >= 1 and experts >= 1) or rank % experts:
            raise ValueError(f"MoELoRA needs rank >= 1 and a number of experts >= 1 that divides it, got {rank} and "
                             f"{experts}")
        self.base = base
        self.base.requires_grad_(False)
        self.rank, self.alpha, self.experts, self.scale = rank, alpha, experts, alpha / rank
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, **factory).normal_(0.0, 0.01))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        self.gate = nn.Parameter(torch.empty(experts, base.in_features, **factory))
        nn.init.kaiming_uniform_(self.gate, a=math.sqrt(5))  # nn.Linear's default, as CoIN's router
        self.dropout = nn.Dropout(dropout)
        self.train(base.training)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """g(x) = softmax(W_g x) per token: (..., E), summing to 1."""
        return torch.softmax(x @ self.gate.t(), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.dropout(x) @ self.lora_a.t()  # (..., r): every expert's A_e x, side by side
        low = low * self.gates(x).repeat_interleave(self.rank // self.experts, dim=-1)
        return self.base(x) + self.scale * (low @ self.lora_b.t())


def moelora_layers(module: nn.Module) -> list[MoELoRALinear]:
    """The MoELoRA layers below `module`, in module order."""
    return [m for m in module.modules() if isinstance(m, MoELoRALinear)]


def moelora_settings(llm: nn.Module) -> dict[str, float] | None:
    """{"rank", "alpha", "experts"} of `llm`'s MoELoRA layers (all alike: the method made them), as a saved folder's
    config.json records them; None when it has none."""
    layers = moelora_layers(llm)
    return dict(rank=layers[0].rank, alpha=layers[0].alpha, experts=layers[0].experts) if layers else None


def expert_parameters(llm: nn.Module) -> dict[str, nn.Parameter]:
    """Every MoELoRA layer's lora_a, lora_b and gate, keyed by the layer's path in `llm` ("blocks.0.attn.qkv.gate")."""
    return {f"{name}.{part}": getattr(layer, part) for name, layer in llm.named_modules()
            if isinstance(layer, MoELoRALinear) for part in EXPERT_PARTS}


def plain_llm(llm: LanguageModel) -> LanguageModel:
    """`llm` without its experts, for saving: a `LanguageModel` sharing its tensors, each MoELoRA layer's base weights
    under the layer's own names (blocks.0.attn.qkv.weight, not ...qkv.base.weight). `llm` itself is left as it is;
    without MoELoRA layers it is returned."""
    wrapped = [name for name, module in llm.named_modules() if isinstance(module, MoELoRALinear)]
    if not wrapped:
        return llm
    state = llm.state_dict()
    for name in wrapped:
        for part in EXPERT_PARTS:
            del state[f"{name}.{part}"]
        base = f"{name}.base."
        for key in [k for k in state if k.startswith(base)]:
            state[f"{name}.{key.removeprefix(base)}"] = state.pop(key)
    with torch.device("meta"):
        plain = LanguageModel(llm.config)
    plain.load_state_dict(state, strict=True, assign=True)
    return plain


class LlavaModel(nn.Module):
    """Frozen vision tower -> projector -> LLM. `template`: the chat template it was trained with, if known."""

    def __init__(self, vision: VisionTower, projector: Projector, llm: LanguageModel,
                 template: str | None = None) -> None:
        super().__init__()
        d_in, d_out = projector[0].in_features, projector[-1].out_features
        if (d_in, d_out) != (vision.config.d_model, llm.config.d_model):
            raise ValueError(f"the projector maps {d_in} -> {d_out}, but the vision tower gives "
                             f"{vision.config.d_model} features and the LLM takes {llm.config.d_model}: build it with "
                             f"build_projector(kind, {vision.config.d_model}, {llm.config.d_model})")
        self.vision = vision.requires_grad_(False).eval()
        self.projector = projector
        self.llm = llm
        self.template = template
        self.prompt_pool: PromptPool | None = None  # set by L2P

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_image_tokens

    def train(self, mode: bool = True) -> LlavaModel:
        """Like nn.Module.train, but the frozen vision tower always stays in eval mode."""
        super().train(mode)
        self.vision.eval()
        return self

    def encode_images(self, pixel_values: torch.Tensor | None = None,
                      vision_features: torch.Tensor | None = None) -> torch.Tensor:
        """(N, 3, H, W) pixels, or the tower's (N, P, d_vision) output for them when the caller already has it
        -> (N, num_image_tokens, d_llm); gradients reach the projector only."""
        if vision_features is None:
            with torch.no_grad():
                vision_features = self.vision(pixel_values)  # (N, P, d_vision)
        return self.projector(vision_features.to(self.projector[0].weight.dtype))

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                     vision_features: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids with IMAGE_PLACEHOLDER_ID at image positions -> (B, T, d_llm) LLM input embeddings. The
        images come as pixels or as the frozen tower's features of them (see `encode_images`)."""
        is_image = input_ids == IMAGE_PLACEHOLDER_ID  # (B, T)
        embeds = self.llm.embed(input_ids.masked_fill(is_image, 0))  # (B, T, D); image rows overwritten below
        images = pixel_values if vision_features is None else vision_features
        num_images = 0 if images is None else images.shape[0]
        positions, expected = int(is_image.sum()), num_images * self.num_image_tokens
        if positions != expected:
            raise ValueError(f"the batch has {positions} image positions (IMAGE_PLACEHOLDER_ID) but {num_images} "
                             f"image(s) x {self.num_image_tokens} tokens = {expected}: every <image> must expand to "
                             f"exactly num_image_tokens placeholders, with one pixel_values row per image")
        if expected == 0:
            return embeds
        features = self.encode_images(pixel_values, vision_features).to(embeds.dtype)  # (N, P, D)
        return embeds.masked_scatter(is_image.unsqueeze(-1), features)  # row-major: image n fills the n-th block

    def prompted_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        pixel_values: torch.Tensor | None = None, vision_features: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """`embed_inputs` with the prompt pool's n vectors in front: embeddings (B, n + T, D), attention mask and
        positions (B, n + T), and n. A row's positions count its real tokens only, so a row without prompts (no
        image) sees exactly what it would see without the pool."""
        if vision_features is None:
            with torch.no_grad():
                vision_features = self.vision(pixel_values)  # (N, P, d_vision), shared by the splice and the query
        embeds = self.embed_inputs(input_ids, vision_features=vision_features)
        prompts, prompt_mask = self.prompt_pool(input_ids, vision_features)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        mask = torch.cat([prompt_mask.to(mask.dtype), mask], dim=1)
        positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        return torch.cat([prompts.to(embeds.dtype), embeds], dim=1), mask, positions, prompts.shape[1]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, return_hidden: bool = False,
                compute_logits: bool = True) -> LMOutput:
        if self.prompt_pool is None or pixel_values is None:
            return self.llm(inputs_embeds=self.embed_inputs(input_ids, pixel_values), attention_mask=attention_mask,
                            return_hidden=return_hidden, compute_logits=compute_logits)
        embeds, mask, positions, n = self.prompted_inputs(input_ids, attention_mask, pixel_values)
        hidden = self.llm.hidden_states(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)[:, n:]
        logits = self.llm.lm_head(hidden) if compute_logits else None  # (B, T, V): the prompts' positions dropped
        return LMOutput(logits, hidden if return_hidden or not compute_logits else None, None)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, vision_features: torch.Tensor | None = None,
                 **gen_kwargs: Any) -> GenerationOutput:
        """Continue each (left- or right-padded) prompt; `gen_kwargs` go to `mllm_cl.generation.generate`."""
        if self.prompt_pool is not None and (pixel_values is not None or vision_features is not None):
            embeds, mask, _, _ = self.prompted_inputs(input_ids, attention_mask, pixel_values, vision_features)
            return generate(self.llm, inputs_embeds=embeds, attention_mask=mask, **gen_kwargs)
        return generate(self.llm, inputs_embeds=self.embed_inputs(input_ids, pixel_values, vision_features),
                        attention_mask=attention_mask, **gen_kwargs)


LAYOUTS = ("ours", "hf")


def save_llava(model: LlavaModel, folder: str | Path, tokenizer_from: str | Path | None = None,
               layout: str = "ours", template: str | None = None, keep_from: str | Path | None = None) -> Path:
    """Write the model in one of LAYOUTS, swapped in whole (a crash never leaves a mix of old and new parts).

    "ours": `config.json`, `projector.safetensors`, `llm/` (HF LLM, with the tokenizer) and `vision/` (HF CLIP).
    "hf": transformers' `LlavaForConditionalGeneration` layout with tokenizer, chat template and image processor
    settings (see `mllm_cl.llava_layouts`); it needs `tokenizer_from`. `template`: the chat template the model
    was trained with (default: the one it was loaded with), recorded in the folder. `keep_from` ("hf" only): the
    transformers-layout folder the model came from, whose chat template and processor settings are kept.

    MoELoRA layers in the LLM ("ours" only): `llm/` holds the plain LLM (each layer's base weights under its own
    names, so other tools read it as the base model), `moelora.safetensors` each layer's lora_a, lora_b and gate
    keyed by its path in the LLM, and config.json {"moelora": {"rank", "alpha", "experts"}}. The model in memory
    is left as it is.
    """
    template = template or model.template
    moelora = moelora_settings(model.llm)
    if layout == "hf":
        if model.prompt_pool is not None:
            raise ModelFolderError("a model with an L2P prompt pool saves only in our layout (layout='ours')")
        if moelora is not None:
            raise ModelFolderError("a model with MoELoRA experts saves only in our layout (layout='ours'): "
                                   "transformers' LLaVA has no place for them")
        if tokenizer_from is None:
            raise ModelFolderError("the transformers layout needs the tokenizer (tokenizer_from)")
        return write_hf_llava(model.llm, model.vision, model.projector, folder, tokenizer_from,
                              template or UNRECORDED_TEMPLATE, keep_from)
    if layout != "ours":
        raise ModelFolderError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    with staged_folder(folder) as staging:
        save_llm(plain_llm(model.llm), staging / "llm", tokenizer_from=tokenizer_from)
        save_vision_tower(model.vision, staging / "vision")
        atomic_save_tensors(staging / PROJECTOR_FILE, model.projector.state_dict(), metadata={"format": "pt"})
        config = dict(model_type=MODEL_TYPE, projector=model.projector.kind, d_vision=model.vision.config.d_model,
                      d_llm=model.llm.config.d_model, num_image_tokens=model.num_image_tokens)
        if model.prompt_pool is not None:
            atomic_save_tensors(staging / PROMPT_POOL_FILE, model.prompt_pool.state_dict(), metadata={"format": "pt"})
            config["prompt_pool_top_n"] = model.prompt_pool.top_n
        if moelora is not None:
            atomic_save_tensors(staging / MOELORA_FILE, expert_parameters(model.llm), metadata={"format": "pt"})
            config["moelora"] = moelora
        if template:
            config["template"] = template
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(folder)


def llava_layout(config: dict[str, Any]) -> str | None:
    """The layout of the LLaVA folder whose config.json holds `config`: "ours", "hf" (transformers'), "original"
    (the LLaVA repository's), or None when it is not a LLaVA folder. Every question about a folder's layout asks
    this (the original's config may say "llava" like transformers', so its keys decide)."""
    if config.get("model_type") == MODEL_TYPE:
        return "ours"
    if is_hf_llava(config):
        return "hf"
    return "original" if is_original_llava(config) else None


def tokenizer_folder(folder: str | Path) -> Path:
    """Where a LLaVA folder keeps its tokenizer: `llm/` in our layout, the folder itself in the others."""
    folder = Path(folder)
    return folder / "llm" if llava_layout(read_config(folder)) == "ours" else folder


def is_llava_folder(folder: str | Path) -> bool:
    """Whether `folder` holds a LLaVA model in any layout `load_llava` reads."""
    return llava_layout(read_config(folder)) is not None


def load_llava(folder: str | Path, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None, vision: str | Path | None = None) -> LlavaModel:
    """A `LlavaModel` from a folder in our layout, transformers' or the original LLaVA repository's (whose
    separate CLIP folder is `vision`); every part is loaded strictly. `.template` is the chat template the
    checkpoint was trained with, when the folder says so (LLaVA-1.5: vicuna_v1). MoELoRA experts (see `save_llava`)
    come back on the layers they were saved on, with dropout 0: the method sets its own when training goes on."""
    folder = Path(folder)
    config = read_config(folder)
    layout = llava_layout(config)
    if layout in ("hf", "original"):
        parts = (read_hf_llava(folder, device, dtype) if layout == "hf"
                 else read_original_llava(folder, vision, device, dtype))
        return LlavaModel(parts.vision, parts.projector, parts.llm, parts.template)
    if layout != "ours" or "projector" not in config:
        raise ModelFolderError(f"{folder / CONFIG_FILE} is not a LLaVA folder (needs model_type {MODEL_TYPE!r} with "
                               "'projector', 'llava' (transformers) or the mm_* keys of the original LLaVA); an LLM "
                               "or CLIP folder loads with load_llm or load_vision_tower")
    llm = load_llm(folder / "llm", device, dtype)
    vision = load_vision_tower(folder / "vision", device, dtype)
    path = folder / PROJECTOR_FILE
    tensors = read_safetensors(path, device or "cpu")
    projector = load_projector(config["projector"], vision, llm, tensors, path, f"{folder / CONFIG_FILE}: projector")
    model = LlavaModel(vision, projector.to(device=device, dtype=dtype), llm, config.get("template"))
    if "prompt_pool_top_n" in config:
        path = folder / PROMPT_POOL_FILE
        tensors = read_safetensors(path, device or "cpu")
        if set(tensors) != {"keys", "prompts"} or tensors["prompts"].dim() != 3:
            raise ModelFolderError(f"{path} must hold exactly 'keys' (size, d_vision) and 'prompts' "
                                   f"(size, length, d_llm); it holds {sorted(tensors)}: save the model again")
        (size, length, d_model), d_key = tensors["prompts"].shape, tensors["keys"].shape[-1]
        model.prompt_pool = PromptPool(size, length, config["prompt_pool_top_n"], d_key, d_model)
        model.prompt_pool.load_state_dict(tensors)  # strict: every shape must match the pool just built
        model.prompt_pool.to(device=device, dtype=dtype)
    if "moelora" in config:
        _load_experts(llm, config["moelora"], folder, device)
    return model


def _load_experts(llm: LanguageModel, settings: Any, folder: Path, device: torch.device | str | None) -> None:
    """Put MoELoRA layers with config.json's `settings` on the layers the folder's MOELORA_FILE names and load their
    experts, strictly: each layer's lora_a, lora_b and gate, every shape as `settings` make it."""
    path = folder / MOELORA_FILE
    tensors = read_safetensors(path, device or "cpu")
    modules = dict(llm.named_modules())
    names = sorted({key.rpartition(".")[0] for key in tensors})
    not_linear = [name for name in names if not isinstance(modules.get(name), nn.Linear)]
    if not names or not_linear:
        problem = f"{not_linear[:3]} are not linear layers of the LLM" if names else "it holds no tensor"
        raise ModelFolderError(f"{path} must hold lora_a, lora_b and gate of linear layers of the LLM, keyed by their "
                               f"paths (blocks.0.attn.qkv.gate); {problem}: save the model again")
    try:
        for name in names:
            layer = MoELoRALinear(modules[name], settings["rank"], settings["alpha"], settings["experts"])
            llm.set_submodule(name, layer)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFolderError(f"{folder / CONFIG_FILE}: \"moelora\" must be {{\"rank\": r, \"alpha\": a, "
                               f"\"experts\": E}} with E dividing r, got {settings!r} ({e!r}): save the model again"
                               ) from None
    parameters = expert_parameters(llm)
    expected = {k: tuple(p.shape) for k, p in parameters.items()}
    found = {k: tuple(t.shape) for k, t in tensors.items()}
    wrong = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
    if wrong:
        shown = "; ".join(f"{k} is {found.get(k, 'missing')}, expected {expected.get(k, 'no such key')}"
                          for k in wrong[:3])
        more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        raise ModelFolderError(f"{path} does not hold the experts that {folder / CONFIG_FILE} describes (moelora "
                               f"{settings}): {shown}{more}; save the model again")
    check_float_weights(tensors, path)
    with torch.no_grad():
        for key, parameter in parameters.items():
            parameter.copy_(tensors[key])
