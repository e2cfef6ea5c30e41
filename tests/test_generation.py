"""generate(): KV-cache decoding == full re-forward, padding-independent batches, sampling, stop ids."""

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from mllm_cl.generation import generate, sample_next
from mllm_cl.weights import load_llm

VOCAB = 101


@pytest.fixture(scope="module", params=["neox", "llama"])
def models(request, tmp_path_factory):
    torch.manual_seed(0)
    if request.param == "neox":
        reference = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=96, rotary_pct=0.25,
                                                     initializer_range=0.3, attn_implementation="eager"))
    else:
        reference = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                                 initializer_range=0.3, attn_implementation="eager"))
    folder = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(folder)
    return reference.eval(), load_llm(folder).eval()


def greedy_by_full_forward(reference, prompt, n):
    """Independent reference: transformers' model, whole sequence re-run every step, no cache."""
    ids = prompt[None]
    with torch.no_grad():
        for _ in range(n):
            next_id = reference(ids, use_cache=False).logits[:, -1].argmax(-1)
            ids = torch.cat([ids, next_id[:, None]], dim=1)
    return ids[0, len(prompt):]


def test_cached_greedy_equals_full_reforward(models):
    reference, model = models
    prompt = torch.randint(0, VOCAB, (7,))
    out = generate(model, prompt[None], max_new_tokens=12)
    assert out.tokens.shape == (1, 12) and out.lengths.tolist() == [12]
    assert out.tokens[0].tolist() == greedy_by_full_forward(reference, prompt, 12).tolist()
    assert len(set(out.tokens[0].tolist())) > 2  # a model that says one thing proves nothing


def _batch(prompts, left):
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), 5, dtype=torch.long)  # pad with a real id: the mask must do the work
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        sl = slice(T - len(p), T) if left else slice(0, len(p))
        ids[i, sl], mask[i, sl] = p, 1
    return ids, mask


@pytest.mark.parametrize("left", [True, False], ids=["left-padded", "right-padded"])
def test_padded_batch_equals_each_sample_alone(models, left):
    _, model = models
    prompts = [torch.randint(0, VOCAB, (n,)) for n in (3, 8, 5)]
    ids, mask = _batch(prompts, left)
    batched = generate(model, ids, mask, max_new_tokens=10)
    for i, p in enumerate(prompts):
        alone = generate(model, p[None], max_new_tokens=10)
        assert batched.tokens[i].tolist() == alone.tokens[0].tolist()


def test_inputs_embeds_prefill_equals_input_ids(models):
    _, model = models
    ids, mask = _batch([torch.randint(0, VOCAB, (n,)) for n in (4, 6)], left=False)
    from_ids = generate(model, ids, mask, max_new_tokens=6)
    with torch.no_grad():
        embeds = model.embed(ids)
    from_embeds = generate(model, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(from_ids.tokens, from_embeds.tokens)


def test_stop_ids_end_rows_and_pad_the_rest(models):
    _, model = models
    prompts = [torch.randint(0, VOCAB, (n,)) for n in (4, 6)]
    ids, mask = _batch(prompts, left=True)
    free = generate(model, ids, mask, max_new_tokens=10)
    stop = int(free.tokens[0, 2])  # row 0 stops at its third token at the latest
    out = generate(model, ids, mask, max_new_tokens=10, stop_ids=[stop], pad_id=-1)
    for row, free_row in zip(range(2), free.tokens.tolist()):
        n = free_row.index(stop) + 1 if stop in free_row else 10
        assert out.lengths[row] == n
        assert out.tokens[row, :n].tolist() == free_row[:n]
        assert (out.tokens[row, n:] == -1).all()


def test_sampling_is_seeded_and_respects_top_p(models):
    _, model = models
    ids = torch.randint(0, VOCAB, (2, 5))

    def run(seed, **kw):
        return generate(model, ids, max_new_tokens=8, temperature=1.0,
                        generator=torch.Generator().manual_seed(seed), **kw).tokens

    assert torch.equal(run(3, top_p=0.9), run(3, top_p=0.9))
    assert not torch.equal(run(3), run(4))
    # a tiny nucleus keeps only the most likely token: sampling becomes greedy
    assert torch.equal(run(5, top_p=1e-6), generate(model, ids, max_new_tokens=8).tokens)


def test_top_p_keeps_the_smallest_sufficient_prefix():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(sample_next(logits, 1.0, 0.75, torch.Generator().manual_seed(s))) for s in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3
    draws = {int(sample_next(logits, 1.0, 0.85, torch.Generator().manual_seed(s))) for s in range(200)}
    assert draws == {0, 1, 2}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_decoding_equals_eager_decoding(models, monkeypatch):
    import copy

    import mllm_cl.generation as generation

    model = copy.deepcopy(models[1]).cuda()
    ids, mask = _batch([torch.randint(0, VOCAB, (n,)) for n in (4, 9, 6)], left=False)
    ids, mask = ids.cuda(), mask.cuda()
    graphed = generate(model, ids, mask, max_new_tokens=16, stop_ids=[7])
    monkeypatch.setattr(generation, "_can_graph", lambda device, n: False)
    eager = generate(model, ids, mask, max_new_tokens=16, stop_ids=[7])
    assert torch.equal(graphed.tokens, eager.tokens) and torch.equal(graphed.lengths, eager.lengths)


def test_bad_arguments_are_clear_errors(models):
    _, model = models
    with pytest.raises(ValueError, match="exactly one"):
        generate(model, max_new_tokens=3)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, torch.zeros(1, 2, dtype=torch.long), max_new_tokens=3, top_p=0.0)
