"""Learning to Prompt (L2P, Wang et al. 2022, "Learning to Prompt for Continual Learning") adapted to LLaVA,
one of paper 2's comparison methods.

Only a pool of M prompts is learned (L_p vectors of the LLM's width each, with a key of the vision tower's
width); the LLM, the projector and the tower stay frozen. An image sample's query q is the tower's mean image
feature; the N keys of highest cosine with q select the prompts, which go in front of its input embeddings
(`llava.PromptPool`). Selection reads the image only, never a task id, in training and at test time alike; a
text-only sample has no query and gets no prompt, so a text-only task (continual pretraining's language part)
leaves the model as it was. L2P's surrogate loss pulls the selected keys towards the query:

    L = CE - key_weight * mean_{image samples} mean_{N selected keys k} cos(q, k)

Saving: the pool is a part of the model (`LlavaModel.prompt_pool`) that `save_llava` writes and `load_llava`
reads, so each task's saved model evaluates with its prompts and a resumed run goes on with the trained pool.
"""

from __future__ import annotations

from typing import Any

import torch

from mllm_cl.llava import PromptPool
from mllm_cl.methods.base import Method, TaskContext


class L2P(Method):
    name = "l2p"

    def __init__(self, pool_size: int = 20, prompt_length: int = 5, top_n: int = 5, key_weight: float = 0.1) -> None:
        if not (pool_size >= 1 and prompt_length >= 1 and 1 <= top_n <= pool_size):
            raise ValueError(f"l2p needs pool_size >= 1, prompt_length >= 1 and 1 <= top_n <= pool_size; got "
                             f"{pool_size}, {prompt_length} and {top_n}")
        if key_weight < 0:
            raise ValueError(f"l2p.key_weight must be >= 0, got {key_weight}")
        self.pool_size, self.prompt_length, self.top_n, self.key_weight = pool_size, prompt_length, top_n, key_weight

    def before_task(self, ctx: TaskContext) -> None:
        model = ctx.model
        model.requires_grad_(False)
        if model.prompt_pool is None:  # the first task; later ones (and a saved model resumed from) keep their pool
            model.prompt_pool = self.new_pool(model.vision.config.d_model, model.llm.token_embedding.weight)
        pool = model.prompt_pool
        if tuple(pool.prompts.shape[:2]) != (self.pool_size, self.prompt_length) or pool.top_n != self.top_n:
            raise ValueError(f"the model's prompt pool has {pool.prompts.shape[0]} prompts of {pool.prompts.shape[1]} "
                             f"vectors, top {pool.top_n}, but l2p is set to {self.pool_size}, {self.prompt_length}, "
                             f"top {self.top_n}: set l2p's options to the pool's")
        pool.requires_grad_(True)
        ctx.log["l2p_trained_parameters"] = sum(p.numel() for p in pool.parameters())

    def new_pool(self, d_key: int, token_embedding: torch.Tensor) -> PromptPool:
        """Keys uniform in [-1, 1] as in L2P's code; prompts normal with the spread of the LLM's token
        embeddings, so they start on the scale the LLM reads."""
        pool = PromptPool(self.pool_size, self.prompt_length, self.top_n, d_key, token_embedding.shape[1])
        with torch.no_grad():
            pool.keys.uniform_(-1.0, 1.0)
            pool.prompts.normal_(0.0, float(token_embedding.float().std()))
        return pool.to(device=token_embedding.device, dtype=token_embedding.dtype)

    def loss(self, ctx: TaskContext, batch: dict, output: Any, loss: torch.Tensor) -> torch.Tensor:
        pixel_values = batch.get("pixel_values")
        pool = ctx.model.prompt_pool
        if pixel_values is None:  # no image sample, no query, no prompt: nothing to learn (a zero gradient)
            return loss + 0.0 * pool.prompts.sum()
        with torch.no_grad():
            features = ctx.model.vision(pixel_values)  # (N, P, d_vision)
        queries, has_image = pool.queries(batch["input_ids"], features)
        matched = pool.similarity(queries[has_image]).topk(pool.top_n, dim=1).values.mean()
        ctx.log["l2p_key_match_last"] = float(matched.detach())
        return loss - self.key_weight * matched
