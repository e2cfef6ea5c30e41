"""LanguageModel == Hugging Face GPTNeoXForCausalLM / LlamaForCausalLM on the same tiny random weights."""

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from mllm_cl.config import LLMConfig
from mllm_cl.llm import LanguageModel, count_parameters
from mllm_cl.weights import load_llm

VOCAB = 97


def hf_model(kind: str) -> torch.nn.Module:
    if kind.startswith("neox"):
        config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=128, rotary_pct=0.25, use_parallel_residual=kind == "neox-parallel",
                               attn_implementation="eager")
        model = GPTNeoXForCausalLM(config)
    else:
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=96, rope_theta=500.0, rms_norm_eps=1e-5,
                             tie_word_embeddings=kind == "llama-tied", attn_implementation="eager")
        model = LlamaForCausalLM(config)
    with torch.no_grad():  # non-trivial norms and biases, so a mix-up of any of them shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


KINDS = ["neox-parallel", "neox-sequential", "llama-gqa", "llama-tied"]


def reference_and_ours(kind: str, folder) -> tuple[torch.nn.Module, LanguageModel]:
    """A random Hugging Face model of `kind`, and ours loaded from the folder it saved itself into."""
    reference = hf_model(kind)
    reference.save_pretrained(folder)
    return reference, load_llm(folder).eval()


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(kind, tmp_path):
    reference, model = reference_and_ours(kind, tmp_path)
    ids = torch.randint(0, VOCAB, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    mask[2, 5:] = 0
    with torch.no_grad():
        expected = reference(ids).logits
        out = model(ids, return_hidden=True)
        assert (out.logits - expected).abs().max() <= 1e-4
        assert out.hidden.shape == (3, 11, 64)
        expected_padded = reference(ids, attention_mask=mask).logits
        padded = model(ids, mask).logits
    real = mask.bool()
    assert (padded[real] - expected_padded[real]).abs().max() <= 1e-4


@pytest.mark.parametrize("kind", ["neox-parallel", "llama-gqa"])
def test_left_padding_explicit_mask_matches_transformers(kind, tmp_path):
    """Left padding takes the explicit-mask path; positions given as HF would get them."""
    reference, model = reference_and_ours(kind, tmp_path)
    ids = torch.randint(0, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask, position_ids=positions).logits
        got = model(ids, mask, position_ids=positions).logits
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max() <= 1e-4
    assert torch.isfinite(got).all()  # padding queries never see an empty row


@pytest.mark.parametrize("kind", ["neox-parallel", "llama-gqa"])
def test_kv_cache_forward_equals_full_forward(kind, tmp_path):
    hf_model(kind).save_pretrained(tmp_path)
    model = load_llm(tmp_path).eval()
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_kv_cache(2, 16)
        chunks = [model(ids[:, :5], kv_cache=cache).logits, model(ids[:, 5:9], kv_cache=cache).logits]
        chunks += [model(ids[:, t:t + 1], kv_cache=cache).logits for t in range(9, 12)]
    assert cache.length == 12
    assert (torch.cat(chunks, dim=1) - full).abs().max() <= 1e-4


@pytest.mark.parametrize("kind", ["neox-parallel", "llama-gqa"])
def test_static_kv_cache_equals_full_forward(kind, tmp_path):
    """The fixed-shape decoding step (CUDA-graph mode): write at a tensor slot, attend over all max_len keys."""
    hf_model(kind).save_pretrained(tmp_path)
    model = load_llm(tmp_path).eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding in the prefill must stay hidden from the later steps
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(ids, mask, position_ids=positions).logits
        cache = model.new_kv_cache(2, 16)
        steps = [model(ids[:, :6], mask[:, :6], position_ids=positions[:, :6], kv_cache=cache).logits]
        cache.make_static()
        steps += [model(ids[:, t:t + 1], position_ids=positions[:, t:t + 1], kv_cache=cache).logits
                  for t in range(6, 9)]
    assert int(cache.slot) == 9 and cache.key_mask[:, 9:].sum() == 0
    real = mask.bool()
    assert (torch.cat(steps, dim=1)[real] - full[real]).abs().max() <= 1e-4


def test_inputs_embeds_and_embed():
    model = LanguageModel(LLMConfig()).eval()
    ids = torch.randint(0, 512, (2, 6))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(inputs_embeds=model.embed(ids)).logits)
    with pytest.raises(ValueError, match="exactly one"):
        model()


def test_block_is_callable_with_positional_tensors_and_trains():
    """The contract an activation-checkpointing wrapper relies on: block(x, cos, sin, attn_bias)."""
    model = LanguageModel(LLMConfig(n_layer=2, dropout=0.1))
    x = torch.randn(2, 5, 128, requires_grad=True)
    cos, sin = model.rope_cos[:5].unsqueeze(0), model.rope_sin[:5].unsqueeze(0)
    y = model.blocks[0](x, cos, sin, None)
    y.sum().backward()
    assert y.shape == x.shape and x.grad is not None
    ids = torch.randint(0, 512, (2, 8))
    torch.manual_seed(1)
    a = model(ids).logits
    torch.manual_seed(2)
    b = model(ids).logits
    assert not torch.equal(a, b)  # dropout is active in training
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)


def test_init_and_parameter_count():
    config = LLMConfig(tie_embeddings=False)
    model = LanguageModel(config)
    assert abs(model.blocks[0].mlp.fc.weight.std().item() - config.init_std) < 0.002
    assert torch.count_nonzero(model.blocks[0].attn.qkv.bias) == 0
    d, f, v, L = config.d_model, config.d_ff, config.vocab_size, config.n_layer
    per_block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
    total = v * d + L * per_block + 2 * d + v * d
    assert count_parameters(model) == total
    assert count_parameters(model, exclude_embeddings=True) == total - v * d
    tied = LanguageModel(LLMConfig(tie_embeddings=True))
    assert count_parameters(tied) == total - v * d
    assert count_parameters(tied, exclude_embeddings=True) == total - v * d


def test_too_long_input_is_a_clear_error():
    model = LanguageModel(LLMConfig(max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))
