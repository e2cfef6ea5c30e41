"""The CLIP ViT vision tower (Radford et al., 2021), laid out exactly like Hugging Face's `CLIPVisionModel`.

LLaVA takes the hidden states of one encoder layer (the second to last) as the image's tokens, class
token dropped. The encoder layer here is shared with the small CLIP text tower in `clip_text.py`.

    pixels -> patch conv + class token + positions -> pre_layrnorm -> [layer_norm1 -> attn -> +,
              layer_norm2 -> fc1 -> quick_gelu -> fc2 -> +] x n_layer -> post_layernorm(class token)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mllm_cl.config import VisionConfig


def init_weights(module: nn.Module) -> None:
    """From-scratch init (loaded checkpoints overwrite it): Linear ~ N(0, 1/fan_in) with zero bias, patch and
    embedding tables ~ N(0, 0.02^2). Smaller Linear weights leave a tiny CLIP stuck at chance for many steps."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=m.in_features ** -0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections, all with biases."""

    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}")
        self.n_head = n_head
        self.k_proj = nn.Linear(d_model, d_model)  # Hugging Face's order, so state_dict() lists keys as it does
        self.v_proj = nn.Linear(d_model, d_model)
        self.q_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = (proj(x).view(B, T, self.n_head, D // self.n_head).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, nh, T, hs)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class EncoderLayer(nn.Module):
    """A pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, d_model: int, n_head: int, d_ff: int, norm_eps: float) -> None:
        super().__init__()
        self.self_attn = Attention(d_model, n_head)
        self.layer_norm1 = nn.LayerNorm(d_model, eps=norm_eps)
        self.mlp = MLP(d_model, d_ff)
        self.layer_norm2 = nn.LayerNorm(d_model, eps=norm_eps)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    """Only a holder for `layers`, so parameter names read `encoder.layers.{i}...` as in Hugging Face."""

    def __init__(self, n_layer: int, d_model: int, n_head: int, d_ff: int, norm_eps: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(d_model, n_head, d_ff, norm_eps) for _ in range(n_layer))


class VisionEmbeddings(nn.Module):
    """Non-overlapping patches through a bias-free conv, a learned class token, learned positions."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.image_size = config.image_size
        self.class_embedding = nn.Parameter(torch.randn(config.d_model) * config.d_model ** -0.5)
        self.patch_embedding = nn.Conv2d(config.num_channels, config.d_model, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(config.num_patches + 1, config.d_model)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        N, _, H, W = pixel_values.shape
        if H != self.image_size or W != self.image_size:
            raise ValueError(f"the vision tower takes {self.image_size}x{self.image_size} images, got {H}x{W}: "
                             f"resize images to the tower's image_size when preprocessing")
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (N, D, h, w)
        patches = patches.flatten(2).transpose(1, 2)  # (N, h*w, D)
        cls = self.class_embedding.to(patches.dtype).expand(N, 1, -1)  # (N, 1, D)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight  # (N, 1+h*w, D)


class VisionTower(nn.Module):
    """CLIP ViT. `tower(pixels)` gives LLaVA's image tokens; `tower.pooled(pixels)` CLIP's image embedding."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        n = config.n_layer
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.d_model, eps=config.norm_eps)  # (sic) Hugging Face's spelling
        self.encoder = Encoder(n, config.d_model, config.n_head, config.d_ff, config.norm_eps)
        self.post_layernorm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        # hidden state i is the output of layer i (0: the embeddings), so layer `select_layer` needs that many
        self.layers_needed = config.select_layer % (n + 1)
        init_weights(self)

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    def hidden_state(self, pixel_values: torch.Tensor, num_layers: int) -> torch.Tensor:
        """The hidden state after the first `num_layers` encoder layers: (N, 1 + num_patches, D)."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.encoder.layers[:num_layers]:
            x = layer(x)
        return x

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, num_image_tokens, D): the selected layer's hidden states, as LLaVA takes them."""
        x = self.hidden_state(pixel_values, self.layers_needed)
        return x[:, 1:] if self.config.select_feature == "patch" else x

    def pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, D): post_layernorm of the last layer's class token (CLIP's pooled output)."""
        return self.post_layernorm(self.hidden_state(pixel_values, self.config.n_layer)[:, 0])
