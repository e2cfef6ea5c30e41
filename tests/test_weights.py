"""HF folder <-> our modules: round trips through transformers, strictness, sharded folders, config checks."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from mllm_cl.config import LLMConfig
from mllm_cl.llm import LanguageModel
from mllm_cl.weights import CheckpointMismatchError, load_llm, save_llm

VOCAB = 89


def neox_folder(path, **kw):
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, rotary_pct=0.25, **kw)
    GPTNeoXForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("config", [
    LLMConfig(vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=4, d_model=32, d_ff=64, rotary_pct=0.25,
              parallel_residual=False),
    LLMConfig(arch="llama", vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=48, norm="rmsnorm",
              mlp="swiglu", bias=False, parallel_residual=False, tie_embeddings=True, rope_theta=1000.0),
    LLMConfig(arch="llama", vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=1, d_model=32, d_ff=48, norm="rmsnorm",
              mlp="swiglu", bias=False, parallel_residual=False, tie_embeddings=False),
], ids=["neox-sequential", "llama-tied", "llama-untied-mqa"])
def test_save_llm_loads_in_transformers_with_same_logits(config, tmp_path):
    model = LanguageModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    save_llm(model, tmp_path / "out")
    keys = load_file(str(tmp_path / "out" / "model.safetensors")).keys()
    head = "embed_out.weight" if config.arch == "gpt_neox" else "lm_head.weight"
    assert (head in keys) == (not config.tie_embeddings)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        assert (reference(ids).logits - model(ids).logits).abs().max() <= 1e-4
    again = load_llm(tmp_path / "out")
    assert again.config == LLMConfig(**{**vars(config), "name": "out"})
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_load_llm_dtype_and_neox_deinterleave(tmp_path):
    folder = neox_folder(tmp_path / "m")
    hf = load_file(str(folder / "model.safetensors"))
    model = load_llm(folder, dtype=torch.float64)
    assert model.token_embedding.weight.dtype == torch.float64 and model.rope_cos.dtype == torch.float64
    fused = hf["gpt_neox.layers.1.attention.query_key_value.weight"]  # rows [q_h0, k_h0, v_h0, q_h1, ...]
    ours = model.blocks[1].attn.qkv.weight
    hs = 8
    for head in range(4):
        for part in range(3):  # ours: rows [q heads | k heads | v heads]
            hf_rows = fused[(3 * head + part) * hs:(3 * head + part + 1) * hs].double()
            assert torch.equal(ours[part * 32 + head * hs: part * 32 + (head + 1) * hs], hf_rows)


def _rewrite(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_key_is_named(tmp_path):
    folder = neox_folder(tmp_path / "m")
    _rewrite(folder, lambda t: t.pop("gpt_neox.layers.1.mlp.dense_4h_to_h.bias"))
    with pytest.raises(CheckpointMismatchError, match=r"missing key\(s\): gpt_neox.layers.1.mlp.dense_4h_to_h.bias"):
        load_llm(folder)


def test_unexpected_key_is_named_with_its_file(tmp_path):
    folder = neox_folder(tmp_path / "m")
    _rewrite(folder, lambda t: t.update({"gpt_neox.layers.2.extra.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointMismatchError, match=r"unexpected key\(s\): gpt_neox.layers.2.extra.weight \(in .*"
                                                      r"model.safetensors\)"):
        load_llm(folder)


def test_wrong_shape_is_named(tmp_path):
    folder = neox_folder(tmp_path / "m")
    _rewrite(folder, lambda t: t.update({"embed_out.weight": torch.zeros(VOCAB + 1, 32)}))
    with pytest.raises(CheckpointMismatchError, match=r"embed_out.weight is \(90, 32\), expected \(89, 32\)"):
        load_llm(folder)


def test_many_missing_keys_are_summarised(tmp_path):
    folder = neox_folder(tmp_path / "m")
    _rewrite(folder, lambda t: [t.pop(k) for k in list(t) if ".layers.1." in k])
    with pytest.raises(CheckpointMismatchError, match=r"and \d+ more \(\d+ in all\)"):
        load_llm(folder)


def test_sharded_folder_loads(tmp_path):
    folder = neox_folder(tmp_path / "m")
    whole = load_llm(folder)
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(folder / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    sharded = load_llm(folder)
    for (k, a), b in zip(whole.state_dict().items(), sharded.state_dict().values()):
        assert torch.equal(a, b), k


def test_llama_legacy_config_keys_and_tied_head_written_out(tmp_path):
    """4.x-style keys (rope_theta at top level) and a tied head that an exporter wrote anyway."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, tie_word_embeddings=True, rope_theta=2000.0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data.pop("rope_parameters")
    data["rope_theta"] = 2000.0
    (tmp_path / "config.json").write_text(json.dumps(data))
    _rewrite(tmp_path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    model = load_llm(tmp_path)
    assert model.config.rope_theta == 2000.0 and model.config.n_kv_head == 2
    assert model.lm_head.weight is model.token_embedding.weight
    _rewrite(tmp_path, lambda t: t["lm_head.weight"].add_(1.0))
    with pytest.raises(CheckpointMismatchError, match="unexpected key.*lm_head.weight"):
        load_llm(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"hidden_act": "relu"}, "hidden_act 'relu'"),
    ({"model_type": "gpt2"}, "model_type 'gpt2'"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope_type 'linear'"),
])
def test_unsupported_config_is_a_clear_error(tmp_path, change, message):
    folder = neox_folder(tmp_path / "m")
    data = json.loads((folder / "config.json").read_text())
    data.update(change)
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointMismatchError, match=message):
        load_llm(folder)


def test_save_rejects_a_config_hf_cannot_express(tmp_path):
    model = LanguageModel(LLMConfig(vocab_size=VOCAB, d_model=32, n_layer=1, mlp="swiglu"))
    with pytest.raises(ValueError, match="mlp='swiglu'"):
        save_llm(model, tmp_path / "x")


# ---------------------------------------------------------------- CLIP vision tower

def clip_vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=16, patch_size=4, projection_dim=24, attn_implementation="eager")


@pytest.mark.parametrize("full_clip", [False, True], ids=["CLIPVisionModel", "CLIPModel"])
def test_vision_tower_round_trip_matches_transformers(full_clip, tmp_path):
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionModel

    from mllm_cl.weights import load_vision_tower, save_vision_tower

    if full_clip:  # keys vision_model.*, text_model.*, visual_projection, ...
        text = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                              vocab_size=50, max_position_embeddings=8, projection_dim=24, bos_token_id=0,
                              eos_token_id=1)
        clip = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=clip_vision_config().to_dict(),
                                    projection_dim=24))
        clip.save_pretrained(tmp_path / "hf")
        reference = clip.vision_model
    else:  # transformers 5 writes these keys without the vision_model. prefix
        reference = CLIPVisionModel(clip_vision_config())
        reference.save_pretrained(tmp_path / "hf")
    reference.eval()
    tower = load_vision_tower(tmp_path / "hf").eval()
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]  # LLaVA's
        assert (tower(pixels) - expected).abs().max() <= 1e-4
    keys = load_file(str(tmp_path / "hf" / "model.safetensors")).keys()
    assert any(k.startswith("vision_model.") for k in keys) == full_clip
    save_vision_tower(tower, tmp_path / "ours")
    assert all(k.startswith("vision_model.") for k in load_file(str(tmp_path / "ours" / "model.safetensors")))
    again = CLIPVisionModel.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    with torch.no_grad():
        got = again(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert (got - expected).abs().max() <= 1e-4
    assert load_vision_tower(tmp_path / "ours").config == tower.config.__class__(**{**vars(tower.config),
                                                                                   "name": "ours"})


def test_vision_tower_strictness_and_activation(tmp_path):
    from transformers import CLIPVisionModel

    from mllm_cl.weights import load_vision_tower

    CLIPVisionModel(clip_vision_config()).save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("encoder.layers.2.mlp.fc1.bias"))
    with pytest.raises(CheckpointMismatchError, match="missing.*vision_model.encoder.layers.2.mlp.fc1.bias"):
        load_vision_tower(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["hidden_act"] = "gelu"
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointMismatchError, match="quick_gelu"):
        load_vision_tower(tmp_path)


@pytest.mark.parametrize("field, value, ours, bound", [("num_hidden_layers", 100_000_000, "n_layer",
                                                        r"1,024 \(layers\)"),
                                                       ("max_position_embeddings", 2 ** 30, "max_seq_len",
                                                        r"1,048,576 \(positions\)"),
                                                       ("intermediate_size", 2 ** 20, "d_ff", r"65,536 \(width\)")])
def test_a_config_asking_for_a_huge_model_is_refused_before_allocating(tmp_path, field, value, ours, bound):
    import time

    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1).to_dict()
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**config, field: value}))
    start = time.perf_counter()
    with pytest.raises(CheckpointMismatchError, match=rf"config.json: LLMConfig.{ours}={value} is over {bound}"):
        load_llm(folder)
    assert time.perf_counter() - start < 5  # refused from the file, not after trying to build it (it hung)


def test_the_default_tables_are_transformers_own():
    """LLAMA_DEFAULTS / CLIP_VISION_DEFAULTS against transformers' classes, and complete: a nested config that
    leaves out every key translates as transformers' full default config does."""
    from transformers import CLIPVisionConfig

    from mllm_cl.weights import (CLIP_VISION_DEFAULTS, LLAMA_DEFAULTS, llm_config_from_hf, vision_config_from_hf,
                                 with_class_defaults)

    llama, clip = LlamaConfig(), CLIPVisionConfig()
    assert LLAMA_DEFAULTS == {k: llama.rope_parameters["rope_theta"] if k == "rope_theta" else getattr(llama, k)
                              for k in LLAMA_DEFAULTS}
    assert CLIP_VISION_DEFAULTS == {k: getattr(clip, k) for k in CLIP_VISION_DEFAULTS}
    assert llm_config_from_hf(with_class_defaults({"model_type": "llama"})) == llm_config_from_hf(llama.to_dict())
    assert (vision_config_from_hf(with_class_defaults({"model_type": "clip_vision_model"}))
            == vision_config_from_hf(clip.to_dict()))


def test_a_clip_config_with_a_sparse_vision_config_reads_as_transformers_reads_it():
    """transformers 4.x wrote a CLIPConfig's vision_config as its difference from CLIPVisionConfig's defaults."""
    from transformers import CLIPConfig, CLIPVisionConfig

    from mllm_cl.weights import vision_config_from_hf

    defaults = CLIPVisionConfig().to_dict()
    full = clip_vision_config().to_dict()
    sparse = {k: v for k, v in full.items() if k == "model_type" or v != defaults.get(k)}
    assert "hidden_act" not in sparse and "layer_norm_eps" not in sparse and "hidden_size" in sparse
    theirs = CLIPConfig(vision_config=sparse).vision_config
    ours = vision_config_from_hf({"model_type": "clip", "vision_config": sparse})
    assert (ours.d_model, ours.n_layer, ours.n_head, ours.d_ff, ours.image_size, ours.patch_size, ours.norm_eps,
            ours.num_channels, ours.projection_dim) == (
        theirs.hidden_size, theirs.num_hidden_layers, theirs.num_attention_heads, theirs.intermediate_size,
        theirs.image_size, theirs.patch_size, theirs.layer_norm_eps, theirs.num_channels, theirs.projection_dim)
    assert ours == vision_config_from_hf({"model_type": "clip", "vision_config": full})
