"""The decoder LLM: GPT-NeoX (Pythia) and LLaMA (Vicuna, SmolLM2) as one config-driven transformer.

Mirrors Hugging Face `GPTNeoXForCausalLM` and `LlamaForCausalLM` exactly (litgpt-style: one class,
a handful of `LLMConfig` flags). Rotary embeddings: Su et al. 2021, "rotate-half" layout.

    block, parallel residual (Pythia):           out = x + attn(norm_1(x)) + mlp(norm_2(x))
    block, sequential residual (LLaMA, some NeoX): h = x + attn(norm_1(x));  out = h + mlp(norm_2(h))
    model: embed -> blocks -> norm -> lm_head (tied to the embedding or not)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mllm_cl.config import LLMConfig


class LMOutput(NamedTuple):
    logits: torch.Tensor | None  # (B, T, vocab_size); None when the head was skipped (compute_logits=False)
    hidden: torch.Tensor | None  # (B, T, d_model), final normed hidden state, when asked for
    kv_cache: KVCache | None


class RMSNorm(nn.Module):
    """LLaMA's RMSNorm: normalised in float32, cast back to the input dtype, then scaled."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def build_norm(config: LLMConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps)


def rope_tables(config: LLMConfig, length: int,
                device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's rotary angles, (length, rotary_dim), float32."""
    dim = config.rotary_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)  # (length, dim/2)
    angles = torch.cat((angles, angles), dim=-1)  # (length, dim): rotate-half pairs dim i with dim i + dim/2
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `rotary_dim` dims of each head of x (B, nh, T, hs); cos/sin broadcast to (., ., T, rd)."""
    rd = cos.size(-1)
    rot = x[..., :rd]
    half = rd // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = (rot * cos + rotated * sin).to(x.dtype)  # computed in the tables' dtype, like Hugging Face
    if rd == x.size(-1):
        return out
    return torch.cat((out, x[..., rd:]), dim=-1)


class KVCache:
    """Keys and values of every layer, preallocated to (B, n_kv_head, max_len, head_dim) and written in place.

    `key_mask` (B, max_len) is True where a real (not padding) token is cached. `length` counts the
    filled positions; the model advances it after each forward. After `make_static()` the write position
    is the tensor `slot` instead and attention always spans all max_len positions (masked), so one
    decoding step has fixed shapes and can be captured as a CUDA graph.
    """

    def __init__(self, n_layer: int, batch_size: int, max_len: int, device: torch.device | str | None = None) -> None:
        self.batch_size, self.max_len, self.length = batch_size, max_len, 0
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.has_padding = False
        self.slot: torch.Tensor | None = None

    def make_static(self) -> None:
        """From now on: one position per forward, written at `slot`, which advances on the device."""
        self.slot = torch.tensor([self.length], device=self.key_mask.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's k, v (B, n_kv, T, hs) after the cached ones; return all so far (B, n_kv, S, hs)."""
        if self.keys[layer] is None:  # allocated once, at the first write, in the dtype attention runs in
            shape = (self.batch_size, k.size(1), self.max_len, k.size(3))
            self.keys[layer] = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.values[layer] = torch.zeros(shape, dtype=v.dtype, device=v.device)
        keys, values = self.keys[layer], self.values[layer]
        if self.slot is not None:
            keys.index_copy_(2, self.slot, k)
            values.index_copy_(2, self.slot, v)
            return keys, values  # S = max_len; key_mask hides the positions not written yet
        end = self.length + k.size(2)
        keys[:, :, self.length:end] = k
        values[:, :, self.length:end] = v
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, n: int) -> None:
        if self.slot is not None:
            self.slot += n
        else:
            self.length += n


class CausalSelfAttention(nn.Module):
    """Multi-head attention with rotary positions; grouped-query when n_kv_head < n_head.

    Grouped-query: query heads  q0 q1 | q2 q3     each group of n_head/n_kv_head query heads
                   share k/v    k0    | k1        reads one key/value head.
    q, k and v come from one fused Linear: rows [all q heads | all k heads | all v heads].
    """

    def __init__(self, config: LLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.layer_idx = layer_idx
        self.qkv = nn.Linear(config.d_model, (config.n_head + 2 * config.n_kv_head) * config.head_dim, bias=config.bias)
        self.proj = nn.Linear(config.n_head * config.head_dim, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_bias: torch.Tensor | None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.qkv(x).split((q_size, kv_size, kv_size), dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, n_kv, S, hs), S = cached + T
        if self.n_kv_head != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # (B, nh, S, hs)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        # attn_bias None means plain causal (S == T) or a single query that sees every cached key.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, is_causal=attn_bias is None and T > 1)
        y = y.transpose(1, 2).reshape(B, T, q_size)  # (B, T, nh * hs)
        return self.proj(y)


class MLP(nn.Module):
    """GPT-NeoX: Linear, exact GELU, Linear. LLaMA (SwiGLU): down(silu(gate(x)) * up(x)), gate/up fused."""

    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        if self.swiglu:
            self.gate_up = nn.Linear(config.d_model, 2 * config.d_ff, bias=config.bias)  # rows [gate | up]
        else:
            self.fc = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return self.proj(F.silu(gate) * up)
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, config: LLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.norm_1 = build_norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.norm_2 = build_norm(config)
        self.mlp = MLP(config)
        self.parallel_residual = config.parallel_residual
        self.dropout = config.dropout
        self.compiled: Callable | None = None  # set by compile_blocks: a torch.compile'd `Block.layer`

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_bias: torch.Tensor | None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        if self.compiled is not None and kv_cache is None:
            return self.compiled(self, x, cos, sin, attn_bias)
        return self.layer(x, cos, sin, attn_bias, kv_cache)

    def layer(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_bias: torch.Tensor | None,
              kv_cache: KVCache | None = None) -> torch.Tensor:
        a = F.dropout(self.attn(self.norm_1(x), cos, sin, attn_bias, kv_cache), self.dropout, self.training)
        if self.parallel_residual:
            m = F.dropout(self.mlp(self.norm_2(x)), self.dropout, self.training)
            return m + a + x  # Hugging Face's order: it rounds the same way under autocast
        x = x + a
        return x + F.dropout(self.mlp(self.norm_2(x)), self.dropout, self.training)


class LanguageModel(nn.Module):
    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = build_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight
        self.compile_backend = ""  # set by compile_blocks; the training loss then compiles its head too
        self.apply(self._init_weights)
        self.build_rope_tables()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def build_rope_tables(self) -> None:
        """(Re)compute the rotary cos/sin buffers on the weights' device and in their dtype.

        Called by the constructor, and again after building the model on the meta device and loading weights.
        """
        weight = self.token_embedding.weight
        cos, sin = rope_tables(self.config, self.config.max_seq_len, weight.device)
        self.register_buffer("rope_cos", cos.to(weight.dtype), persistent=False)  # (max_seq_len, rotary_dim)
        self.register_buffer("rope_sin", sin.to(weight.dtype), persistent=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(input_ids)  # (B, T, D)

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        if max_len > self.config.max_seq_len:
            raise ValueError(f"a KV cache of {max_len} positions exceeds max_seq_len={self.config.max_seq_len}")
        return KVCache(self.config.n_layer, batch_size, max_len, self.token_embedding.weight.device)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                inputs_embeds: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, return_hidden: bool = False,
                compute_logits: bool = True) -> LMOutput:
        """`compute_logits=False` skips the head (for `losses.head_cross_entropy`) and returns the hidden state."""
        hidden = self.hidden_states(input_ids, attention_mask, inputs_embeds=inputs_embeds,
                                    position_ids=position_ids, kv_cache=kv_cache)
        logits = self.lm_head(hidden) if compute_logits else None
        return LMOutput(logits, hidden if return_hidden or not compute_logits else None, kv_cache)

    def hidden_states(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                      inputs_embeds: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                      kv_cache: KVCache | None = None) -> torch.Tensor:
        """The final normed hidden state (B, T, D); `forward` without the output head.

        With a `kv_cache`, `attention_mask` and `position_ids` cover the new positions only; positions
        default to continuing after the cached ones.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        if kv_cache is not None and kv_cache.slot is not None and (T != 1 or position_ids is None):
            raise ValueError("a static KV cache takes one position per forward, with explicit position_ids")
        offset = 0 if kv_cache is None else kv_cache.length
        if offset + T > self.rope_cos.size(0):
            raise ValueError(f"sequence of {offset + T} positions exceeds max_seq_len={self.config.max_seq_len}; "
                             f"shorten the input or raise max_seq_len in the LLM config")
        if kv_cache is not None and offset + T > kv_cache.max_len:
            raise ValueError(f"KV cache holds {kv_cache.max_len} positions; {offset} cached + {T} new do not fit")
        if attention_mask is not None and tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected (B, T) = {(B, T)}")
        if position_ids is None:
            cos, sin = self.rope_cos[offset:offset + T], self.rope_sin[offset:offset + T]  # (T, rd)
        else:
            cos, sin = self.rope_cos[position_ids], self.rope_sin[position_ids]  # (B, T, rd)
        cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)  # broadcast over heads
        attn_bias = self._attention_bias(attention_mask, kv_cache, T, x.device)
        for block in self.blocks:
            x = block(x, cos, sin, attn_bias) if kv_cache is None else block(x, cos, sin, attn_bias, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.norm(x)

    @staticmethod
    def _attention_bias(attention_mask: torch.Tensor | None, kv_cache: KVCache | None, T: int,
                        device: torch.device) -> torch.Tensor | None:
        """Boolean mask (B or 1, 1, T, S), True = may attend; None when SDPA's own causal path is exact."""
        if kv_cache is not None and kv_cache.slot is not None:
            kv_cache.key_mask.index_fill_(1, kv_cache.slot, True)
            return kv_cache.key_mask[:, None, None, :]  # (B, 1, 1, max_len)
        offset = 0 if kv_cache is None else kv_cache.length
        S = offset + T
        if kv_cache is not None:
            kv_cache.key_mask[:, offset:S] = True if attention_mask is None else attention_mask.bool()
            kv_cache.has_padding |= attention_mask is not None
            key_mask = kv_cache.key_mask[:, :S] if kv_cache.has_padding else None
        elif attention_mask is None or bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
            # No padding, or right padding only: under a causal mask no real query can see a pad key,
            # so the fast causal path is exact on every real position.
            return None
        else:
            key_mask = attention_mask.bool()
        if key_mask is None and (T == 1 or offset == 0):
            return None
        if T == 1:
            return key_mask[:, None, None, :]  # (B, 1, 1, S)
        q_pos = torch.arange(offset, S, device=device)[:, None]  # (T, 1)
        k_pos = torch.arange(S, device=device)  # (S,)
        allowed = k_pos <= q_pos  # (T, S), causal with the cache's offset
        if key_mask is None:
            return allowed
        # A query always sees itself, so a padding query never has an empty (NaN) softmax row.
        return (allowed & key_mask[:, None, None, :]) | (k_pos == q_pos)  # (B, 1, T, S)


def compile_blocks(model: LanguageModel, backend: str = "inductor") -> None:
    """Run the blocks through one `torch.compile`d `Block.layer` (fused norms, rotary, GELU and residuals).

    torch >= 2.5 treats a module's parameters as inputs of the compiled graph, so the one function serves
    every block of the model and compiles once per input shape (and grad mode), not once per block. Calls
    with a KV cache (generation) stay eager. With dropout, inductor is told to draw random numbers the way
    eager PyTorch does, so a checkpointed block's re-run draws the same masks as its first run. The
    model's `compile_backend` tells `losses.forward_loss` to compile the chunked head loss as well.
    """
    if model.config.dropout > 0 and backend == "inductor":
        from torch._inductor import config as inductor_config

        inductor_config.fallback_random = True
    compiled = torch.compile(Block.layer, backend=backend)
    for block in model.blocks:
        block.compiled = compiled
    model.compile_backend = backend


def uncompile_blocks(model: LanguageModel) -> None:
    for block in model.blocks:
        block.compiled = None
    model.compile_backend = ""


def count_parameters(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Distinct parameters (a tied embedding counts once). `exclude_embeddings` leaves out the token
    embedding table unless it is tied to the output head (a lookup does no FLOPs; the head's matmul does)."""
    params = {id(p): p for p in model.parameters()}
    if exclude_embeddings and isinstance(model, LanguageModel) and not model.config.tie_embeddings:
        params.pop(id(model.token_embedding.weight))
    return sum(p.numel() for p in params.values())
