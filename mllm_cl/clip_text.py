"""CLIP contrastive pre-training (Radford et al., 2021) for a small vision tower trained from scratch.

A causal text transformer pooled at its first EOS token, two bias-free projections into a joint space,
and the symmetric InfoNCE loss  L = (CE(s * I T^T, diag) + CE(s * T I^T, diag)) / 2  over unit-norm
image and text embeddings I, T with learnable temperature s = exp(logit_scale). Parameter names are
those of Hugging Face's `CLIPModel`, so a saved folder loads there and in `weights.load_vision_tower`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from mllm_cl.model_folder import write_model_folder
from mllm_cl.vision import Encoder, VisionTower, init_weights


@dataclass
class TextTowerConfig:
    """The text side of CLIP; only used to pre-train a vision tower (LLaVA never runs it)."""

    vocab_size: int = 1024
    max_seq_len: int = 64
    d_model: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_ff: int = 512
    norm_eps: float = 1e-5
    eos_token_id: int = 0  # the text embedding is the final hidden state at the first EOS of each caption
    pad_token_id: int = 0


class TextEmbeddings(nn.Module):
    def __init__(self, config: TextTowerConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.max_seq_len, config.d_model)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:T]  # (B, T, D)


class TextTower(nn.Module):
    """Causal pre-LN transformer over token ids; `tower(ids)` is the final-normed state at the first EOS."""

    def __init__(self, config: TextTowerConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(config)
        self.encoder = Encoder(config.n_layer, config.d_model, config.n_head, config.d_ff, config.norm_eps)
        self.final_layer_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        init_weights(self)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) right-padded ids, each row with an EOS -> (B, D). Causal attention means the EOS position
        never sees the padding after it, so no attention mask is needed."""
        B, T = input_ids.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"captions of {T} tokens are longer than the text tower's max_seq_len="
                             f"{self.config.max_seq_len}: truncate them (keeping the EOS) or raise max_seq_len")
        is_eos = input_ids == self.config.eos_token_id
        if not bool(is_eos.any(dim=1).all()):
            rows = (~is_eos.any(dim=1)).nonzero().flatten().tolist()
            raise ValueError(f"caption row(s) {rows} hold no EOS token (id {self.config.eos_token_id}): "
                             f"append the tokenizer's EOS to every caption")
        x = self.embeddings(input_ids)
        for layer in self.encoder.layers:
            x = layer(x, causal=True)
        x = self.final_layer_norm(x)  # (B, T, D)
        first_eos = is_eos.int().argmax(dim=1)  # (B,)
        return x[torch.arange(B, device=x.device), first_eos]


def contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy over the (N, N) cosine-similarity matrix; pair i is the i-th image and caption."""
    image_embeds = F.normalize(image_embeds, dim=-1)
    text_embeds = F.normalize(text_embeds, dim=-1)
    logits = logit_scale.exp().clamp(max=100.0) * image_embeds @ text_embeds.T  # (N images, N captions)
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class CLIPContrastive(nn.Module):
    """Vision tower + text tower + projections + temperature; `model(pixels, ids)` is the contrastive loss."""

    def __init__(self, vision: VisionTower, text_config: TextTowerConfig) -> None:
        super().__init__()
        projection_dim = vision.config.projection_dim
        self.text_model = TextTower(text_config)
        self.vision_model = vision
        self.visual_projection = nn.Linear(vision.config.d_model, projection_dim, bias=False)
        self.text_projection = nn.Linear(text_config.d_model, projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature 0.07
        init_weights(self.visual_projection)
        init_weights(self.text_projection)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        image_embeds = self.visual_projection(self.vision_model.pooled(pixel_values))  # (N, P)
        text_embeds = self.text_projection(self.text_model(input_ids))  # (N, P)
        return contrastive_loss(image_embeds, text_embeds, self.logit_scale)


def clip_state_dict_hf(model: CLIPContrastive) -> dict[str, torch.Tensor]:
    """`vision_model.*`, `text_model.*`, `visual_projection.weight`, `text_projection.weight`, `logit_scale`."""
    return {k: v.detach() for k, v in model.state_dict().items()}


def clip_config_hf(model: CLIPContrastive) -> dict[str, Any]:
    """A Hugging Face `CLIPConfig` dict describing `model`."""
    vision, text = model.vision_model.config, model.text_model.config
    if text.eos_token_id == 2:
        raise ValueError("transformers reads eos_token_id == 2 in a CLIP text config as its legacy rule 'pool at "
                         "the highest token id', so a saved model would pool differently there: use a tokenizer "
                         "whose EOS id is not 2")
    common = dict(hidden_act="quick_gelu", attention_dropout=0.0, projection_dim=vision.projection_dim)
    vision_config = dict(common, model_type="clip_vision_model", hidden_size=vision.d_model,
                         intermediate_size=vision.d_ff, num_hidden_layers=vision.n_layer,
                         num_attention_heads=vision.n_head, num_channels=vision.num_channels,
                         image_size=vision.image_size, patch_size=vision.patch_size, layer_norm_eps=vision.norm_eps)
    text_config = dict(common, model_type="clip_text_model", vocab_size=text.vocab_size, hidden_size=text.d_model,
                       intermediate_size=text.d_ff, num_hidden_layers=text.n_layer, num_attention_heads=text.n_head,
                       max_position_embeddings=text.max_seq_len, layer_norm_eps=text.norm_eps,
                       bos_token_id=text.eos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id)
    return dict(architectures=["CLIPModel"], model_type="clip", projection_dim=vision.projection_dim,
                logit_scale_init_value=math.log(1 / 0.07), vision_config=vision_config, text_config=text_config)


def save_clip(model: CLIPContrastive, folder: str | Path) -> Path:
    """Write `model` as a Hugging Face CLIPModel folder (config.json + model.safetensors), atomically."""
    return write_model_folder(folder, clip_state_dict_hf(model), clip_config_hf(model))
