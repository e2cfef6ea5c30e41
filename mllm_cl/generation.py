"""Text generation with a static KV cache: one prefill, then one token per step; greedy or nucleus sampling.

Nucleus (top-p) sampling: Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration".
Padded prompts are moved to left padding, so every row's new tokens follow its own last real token and
every row sees the same positions it would see alone. On CUDA the decoding step is replayed as a CUDA graph.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch

from mllm_cl.errors import UserError
from mllm_cl.llm import KVCache, LanguageModel

STOP_CHECK_EVERY = 8  # decode steps between checks that every row has stopped (each check syncs with the GPU)


class GenerationOutput(NamedTuple):
    tokens: torch.Tensor  # (B, max_new_tokens) long; after a row's stop token: pad_id
    lengths: torch.Tensor  # (B,) long: tokens generated per row, the stop token included


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row from logits (B, V): argmax when temperature is 0, else nucleus sampling."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
    sorted_probs.masked_fill_(sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)  # (B, 1), index into the sorted order
    return order.gather(-1, choice).squeeze(-1)


def _to_left_padding(mask: torch.Tensor, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Reorder each row so its padding comes first and its real tokens keep their order at the end."""
    order = torch.argsort(mask.long(), dim=1, stable=True)  # (B, T): pad positions, then real ones
    moved = []
    for t in tensors:
        if t is None:
            moved.append(None)
        else:
            index = order if t.dim() == 2 else order[..., None].expand(-1, -1, t.size(-1))
            moved.append(t.gather(1, index))
    return (mask.gather(1, order), *moved)


class GenerationLengthError(UserError, ValueError):
    """Prompt plus answer would not fit the model's context."""


@torch.no_grad()
def generate(model: LanguageModel, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
             *, inputs_embeds: torch.Tensor | None = None, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, stop_ids: Sequence[int] = (), pad_id: int = 0,
             generator: torch.Generator | None = None) -> GenerationOutput:
    """Continue each prompt by up to `max_new_tokens` tokens.

    Prompts come as `input_ids` (B, T) or `inputs_embeds` (B, T, D) (LLaVA prefills with image features
    spliced in), left- or right-padded as `attention_mask` (B, T) says. A row stops after any of
    `stop_ids`. For reproducible sampling pass a `generator` on the model's device.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    if max_new_tokens < 1 or temperature < 0.0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need max_new_tokens >= 1, temperature >= 0 and 0 < top_p <= 1; got {max_new_tokens}, "
                         f"{temperature}, {top_p}")
    prompt = input_ids if input_ids is not None else inputs_embeds
    B, T = prompt.shape[:2]
    if T + max_new_tokens > model.config.max_seq_len:
        raise GenerationLengthError(f"a prompt of {T} tokens plus max_new_tokens={max_new_tokens} is longer than the "
                                    f"model's max_seq_len={model.config.max_seq_len}: shorten the prompts or "
                                    "lower max_new_tokens")
    device = prompt.device
    if attention_mask is not None and tuple(attention_mask.shape) != (B, T):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, T)}")

    padded = attention_mask is not None and not bool(attention_mask.bool().all())
    prefill_mask = position_ids = None
    next_position = torch.full((B, 1), T, dtype=torch.long, device=device)  # (B, 1): where each row goes on
    if padded:
        prefill_mask, input_ids, inputs_embeds = _to_left_padding(attention_mask.bool(), input_ids, inputs_embeds)
        position_ids = (prefill_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T): 0 at each first real token
        next_position = prefill_mask.long().sum(dim=1, keepdim=True)

    was_training = model.training
    model.eval()
    try:
        cache = model.new_kv_cache(B, T + max_new_tokens)
        hidden = model.hidden_states(input_ids, prefill_mask, inputs_embeds=inputs_embeds,
                                     position_ids=position_ids, kv_cache=cache)
        logits = model.lm_head(hidden[:, -1])  # (B, V): only the last position is needed
        decode = _decoder(model, cache, B, next_position, graphed=_can_graph(device, max_new_tokens))

        tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
        lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
        stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device) if stop_ids else None
        if stops is not None:
            lengths.zero_()
            finished = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            token = sample_next(logits, temperature, top_p, generator)  # (B,), fed back even for stopped rows
            if stops is not None:
                tokens[:, step] = token.masked_fill(finished, pad_id)
                lengths += ~finished
                finished |= torch.isin(token, stops)
            else:
                tokens[:, step] = token
            if step == max_new_tokens - 1:
                break
            if stops is not None and step % STOP_CHECK_EVERY == STOP_CHECK_EVERY - 1 and bool(finished.all()):
                break
            logits = decode(token)
    finally:
        model.train(was_training)
    return GenerationOutput(tokens, lengths)


def _can_graph(device: torch.device, max_new_tokens: int) -> bool:
    # CUDA graphs pay off from a few steps on; under autocast, cast weights would be cached across replays.
    return device.type == "cuda" and max_new_tokens > 2 and not torch.is_autocast_enabled("cuda")


def _decoder(model: LanguageModel, cache: KVCache, batch_size: int, position: torch.Tensor,
             graphed: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function token (B,) -> next logits (B, V) that runs one decoding step and moves `position` on.

    On CUDA the step is captured once as a CUDA graph over the static cache and then replayed: decoding a
    small batch is bound by Python and kernel launches, which a replay skips.
    """
    def step(token: torch.Tensor) -> torch.Tensor:
        hidden = model.hidden_states(token[:, None], position_ids=position, kv_cache=cache)
        position.add_(1)
        return model.lm_head(hidden[:, -1])

    if not graphed:
        return step
    cache.make_static()
    token_in = torch.zeros(batch_size, dtype=torch.long, device=position.device)
    graph, captured = torch.cuda.CUDAGraph(), None

    def replay(token: torch.Tensor) -> torch.Tensor:
        nonlocal captured
        token_in.copy_(token)
        if captured is None:  # the first step runs eagerly on a side stream (the warm-up capture needs),
            side = torch.cuda.Stream()  # then the next one is recorded (recording runs nothing)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                logits = step(token_in)
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph):
                captured = step(token_in)
            return logits
        graph.replay()
        return captured

    return replay
