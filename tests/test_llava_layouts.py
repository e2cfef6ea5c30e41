"""LLaVA checkpoints in transformers' layout and the original LLaVA repository's: read (logits equal to
`LlavaForConditionalGeneration`'s, also from the sparse config.json transformers 4.x wrote), written (transformers
loads ours: logits and greedy tokens equal), the original layout (whatever its model_type) equal to its
transformers twin, and bad folders named."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_llava import IMG, P, mixed_batch
from test_tokenizer import byte_tokenizer_folder, special_id

from mllm_cl.config import IMAGE_PLACEHOLDER_ID, LLMConfig, VisionConfig
from mllm_cl.conversation import render_prompt
from mllm_cl.llava import LlavaModel, is_llava_folder, llava_layout, load_llava, save_llava, tokenizer_folder
from mllm_cl.llava_layouts import (LLAVA_DEFAULTS, LLAVA_SUB_CONFIG_TYPES, LLAVA_VISION_DEFAULTS, chat_template_jinja,
                                   hf_llava_configs)
from mllm_cl.llm import LanguageModel
from mllm_cl.projector import build_projector
from mllm_cl.tokenizer import load_tokenizer
from mllm_cl.vision import VisionTower
from mllm_cl.weights import CheckpointMismatchError, llm_config_to_hf, save_llm, save_vision_tower, vision_config_to_hf

transformers = pytest.importorskip("transformers")
VOCAB = 272


def text_config(arch: str) -> LLMConfig:
    if arch == "llama":
        return LLMConfig(arch="llama", vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, d_model=48, d_ff=96,
                         norm="rmsnorm", mlp="swiglu", bias=False, parallel_residual=False, max_seq_len=256,
                         bos_token_id=1, eos_token_id=2)
    return LLMConfig(vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=4, d_model=48, d_ff=96, rotary_pct=0.5,
                     max_seq_len=256)


def hf_llava(arch: str, strategy: str, image_id: int = VOCAB - 1):
    vision = VisionConfig(image_size=16, patch_size=8, d_model=32, n_layer=2, n_head=4, d_ff=64)
    hf_text = llm_config_to_hf(text_config(arch))
    text_cls = transformers.LlamaConfig if arch == "llama" else transformers.GPTNeoXConfig
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**{k: v for k, v in vision_config_to_hf(vision).items()
                                                       if k != "mllm_cl"}),
        text_config=text_cls(**hf_text), image_token_index=image_id,
        image_seq_length=P + (strategy == "full"), vision_feature_layer=-2, vision_feature_select_strategy=strategy)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # random, non-trivial values everywhere
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def batch_for(tokens: int) -> dict:
    """mixed_batch() with `tokens` image positions per image (P, or P + 1 with the class token)."""
    batch = mixed_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if tokens == P:
        return batch
    out = []
    for row, m in zip(ids.tolist(), mask.tolist()):
        real = row[:sum(m)]
        widened, i = [], 0
        while i < len(real):
            if real[i] == IMG:
                widened += [IMG] * tokens
                i += P
            else:
                widened.append(real[i])
                i += 1
        out.append(widened)
    width = max(map(len, out))
    return dict(input_ids=torch.tensor([r + [0] * (width - len(r)) for r in out]),
                attention_mask=torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in out]),
                pixel_values=batch["pixel_values"])


def hf_logits(model, batch: dict, image_id: int = VOCAB - 1) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"].masked_fill(batch["input_ids"] == IMG, image_id),
                     attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]).logits


def assert_same_logits(ours: LlavaModel, hf, batch: dict) -> float:
    """Logits equal on the real (unpadded) positions; returns the largest difference."""
    with torch.no_grad():
        got = ours(**batch).logits
    real = batch["attention_mask"].bool()
    expected = hf_logits(hf, batch)[real]
    torch.testing.assert_close(got[real], expected, atol=1e-4, rtol=1e-4)
    return float((got[real] - expected).abs().max())


@pytest.mark.parametrize("strategy", ["default", "full"])
@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_a_transformers_llava_folder_loads_with_equal_logits(tmp_path: Path, arch: str, strategy: str) -> None:
    hf = hf_llava(arch, strategy)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")  # shards and their index, as 7B downloads come
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ours = load_llava(tmp_path / "hf")
    assert ours.vision.config.select_feature == ("patch" if strategy == "default" else "cls_patch")
    assert ours.template == "vicuna_v1"  # LLaVA-1.5's, unless the folder says otherwise
    assert_same_logits(ours, hf, batch_for(ours.num_image_tokens))


def tiny_ours(arch: str = "llama") -> LlavaModel:
    torch.manual_seed(1)
    vision = VisionTower(VisionConfig(image_size=16, patch_size=8, d_model=32, n_layer=2, n_head=4, d_ff=64))
    llm = LanguageModel(text_config(arch))
    with torch.no_grad():
        for p in [*llm.parameters(), *vision.parameters()]:
            p.normal_(0.0, 0.2)
    return LlavaModel(vision, build_projector("mlp2x_gelu", 32, 48), llm).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_ours_exported_loads_in_transformers_with_equal_logits_and_tokens(tmp_path: Path, arch: str) -> None:
    ours = tiny_ours(arch)
    tokenizer = byte_tokenizer_folder(tmp_path / "tok", tokenizer_config={"bos_token": "<s>", "eos_token": "</s>"})
    folder = save_llava(ours, tmp_path / "export", tokenizer_from=tokenizer, layout="hf", template="vicuna_v1")
    config = json.loads((folder / "config.json").read_text())
    image_id = config["image_token_index"]
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(folder).eval()
    batch = mixed_batch()
    with torch.no_grad():
        got = ours(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], hf_logits(hf, batch, image_id)[real], atol=1e-4, rtol=1e-4)
    ids, pixels = batch["input_ids"][1:2, :7], batch["pixel_values"][:1]  # one prompt with one image
    with torch.no_grad():
        mine = ours.generate(ids, pixel_values=pixels, max_new_tokens=5).tokens[0].tolist()
        theirs = hf.generate(input_ids=ids.masked_fill(ids == IMG, image_id), pixel_values=pixels, max_new_tokens=5,
                             do_sample=False, min_new_tokens=5)[0, 7:].tolist()
    assert mine == theirs
    processor_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert processor_tokenizer.convert_tokens_to_ids("<image>") == image_id
    assert load_llava(folder).template == "vicuna_v1"


def test_exported_chat_template_renders_our_prompt(tmp_path: Path) -> None:
    folder = byte_tokenizer_folder(tmp_path / "tok", tokenizer_config={"bos_token": "<s>", "eos_token": "</s>"})
    ours = load_tokenizer(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    messages = [("user", "What colour?"), ("assistant", "Red."), ("user", "And now?")]
    for name in ("vicuna_v1", "chatml", "pythia"):
        theirs.chat_template = chat_template_jinja(name)
        text = theirs.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False,
                                          add_generation_prompt=True)
        assert theirs(text, add_special_tokens=False).input_ids == render_prompt(ours, messages, name, 0), name


def original_layout(tmp_path: Path, hf, model_type: str = "llama") -> tuple[Path, Path]:
    """The transformers twin rewritten as the LLaVA repository stores it: a LLaMA folder + mm_* keys and
    model.mm_projector.*, and the CLIP tower in a folder of its own. `model_type`: "llava" (LLaVA-1.5's releases),
    "llava_llama" (the repository's current code)."""
    twin = load_llava(tmp_path / "hf")
    llm_folder = save_llm(twin.llm, tmp_path / "original")
    clip = save_vision_tower(twin.vision, tmp_path / "clip")
    config = json.loads((llm_folder / "config.json").read_text())
    config |= {"mm_projector_type": "mlp2x_gelu", "mm_vision_tower": "openai/clip-vit-large-patch14-336",
               "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_hidden_size": 32,
               "model_type": model_type, "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
               "image_aspect_ratio": "pad", "use_mm_proj": True}
    if model_type != "llama":
        config["architectures"] = ["LlavaLlamaForCausalLM"]
    (llm_folder / "config.json").write_text(json.dumps(config))
    weights = load_file(str(llm_folder / "model.safetensors"))
    weights |= {f"model.mm_projector.{k}": v.contiguous() for k, v in twin.projector.state_dict().items()}
    save_file(weights, str(llm_folder / "model.safetensors"))
    return llm_folder, clip


@pytest.mark.parametrize("model_type", ["llama", "llava", "llava_llama"])
def test_the_original_layout_equals_its_transformers_twin(tmp_path: Path, model_type: str) -> None:
    import consolidate

    hf = hf_llava("llama", "default")
    hf.save_pretrained(tmp_path / "hf")
    folder, clip = original_layout(tmp_path, hf, model_type)
    config = json.loads((folder / "config.json").read_text())
    assert llava_layout(config) == "original" and is_llava_folder(folder) and not consolidate.is_ours(folder)
    assert tokenizer_folder(folder) == folder  # every entry point agrees: the original layout, read by its keys
    print(f"largest logit difference, original layout ({model_type}):",
          assert_same_logits(load_llava(folder, vision=clip), hf, mixed_batch()))
    with pytest.raises(CheckpointMismatchError, match="mm_vision_tower='openai/clip-vit-large-patch14-336' is not a "
                                                      "local folder"):
        load_llava(folder)


# As transformers 4.36.2's save_pretrained wrote these configs (run once, pasted here; transformers 5 writes nested
# configs in full): a nested config holds only what differs from its class's defaults, so LlamaConfig's
# num_hidden_layers (32), num_attention_heads (32), bos/eos, rms_norm_eps... and CLIPVisionConfig's hidden_act,
# layer_norm_eps, num_channels are left out, and there is no image_seq_length or multimodal_projector_bias yet.
# LlavaConfig(text_config=LlamaConfig(vocab_size=272, hidden_size=64, intermediate_size=128),
#             vision_config=CLIPVisionConfig(hidden_size=48, intermediate_size=64, image_size=16, patch_size=8),
#             image_token_index=271, vocab_size=272):
SPARSE_TINY = {
    "ignore_index": -100, "image_token_index": 271, "model_type": "llava", "projector_hidden_act": "gelu",
    "text_config": {"hidden_size": 64, "intermediate_size": 128, "model_type": "llama", "vocab_size": 272},
    "transformers_version": "4.36.2",
    "vision_config": {"hidden_size": 48, "image_size": 16, "intermediate_size": 64, "model_type": "clip_vision_model",
                      "num_attention_heads": 12, "num_hidden_layers": 12, "patch_size": 8, "projection_dim": 512},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 272}
# llava-hf/llava-1.5-7b-hf's config.json, as 4.36.2 writes it for LlavaConfig(text_config=LlamaConfig(
# max_position_embeddings=4096, rms_norm_eps=1e-5, vocab_size=32064, pad_token_id=0, torch_dtype="float16"),
# vision_config=CLIPVisionConfig(<CLIP ViT-L/14-336>), pad_token_id=32001, vocab_size=32064, ...):
SPARSE_7B = {
    "ignore_index": -100, "image_token_index": 32000, "model_type": "llava", "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "text_config": {"max_position_embeddings": 4096, "model_type": "llama", "pad_token_id": 0, "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 32064},
    "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.2",
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064}


@pytest.mark.parametrize("text_model_type", [True, False], ids=["text-model-type", "no-text-model-type"])
def test_a_sparse_transformers_config_loads_with_equal_logits(tmp_path: Path, text_model_type: bool) -> None:
    config = json.loads(json.dumps(SPARSE_TINY))
    if not text_model_type:
        del config["text_config"]["model_type"]
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig.from_pretrained(folder)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    model.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config))  # the sparse config.json, as it was published
    theirs = transformers.LlavaForConditionalGeneration.from_pretrained(folder).eval()  # transformers fills it in
    assert theirs.config.text_config.num_hidden_layers == 32 and theirs.config.vision_config.num_channels == 3
    ours = load_llava(folder)
    assert (ours.llm.config.n_layer, ours.llm.config.n_head, ours.llm.config.bos_token_id) == (32, 32, 1)
    assert (ours.vision.config.n_layer, ours.vision.config.n_head) == (12, 12)
    batch = mixed_batch()
    print("largest logit difference, sparse config:", assert_same_logits(ours, theirs, batch),
          "(against the model it was saved from:", assert_same_logits(ours, model, batch), ")")


def test_the_published_llava_1_5_config_reads_as_transformers_reads_it() -> None:
    """Today's llava-1.5-7b-hf config.json lacks hidden_size, num_hidden_layers, num_attention_heads, ..."""
    llm, vision = hf_llava_configs(SPARSE_7B, "llava-1.5-7b-hf", Path("config.json"))
    theirs = transformers.LlavaConfig(**json.loads(json.dumps(SPARSE_7B)))
    text, tower = theirs.text_config, theirs.vision_config
    assert (llm.arch, llm.vocab_size, llm.d_model, llm.n_layer, llm.n_head, llm.n_kv_head, llm.d_ff, llm.max_seq_len,
            llm.norm_eps, llm.rope_theta, llm.tie_embeddings, llm.bos_token_id, llm.eos_token_id, llm.pad_token_id) \
        == (text.model_type, text.vocab_size, text.hidden_size, text.num_hidden_layers, text.num_attention_heads,
            text.num_key_value_heads, text.intermediate_size, text.max_position_embeddings, text.rms_norm_eps,
            text.rope_parameters["rope_theta"], text.tie_word_embeddings, text.bos_token_id, text.eos_token_id,
            text.pad_token_id)
    assert (vision.d_model, vision.n_layer, vision.n_head, vision.d_ff, vision.image_size, vision.patch_size,
            vision.norm_eps, vision.num_channels, vision.projection_dim, vision.select_layer) \
        == (tower.hidden_size, tower.num_hidden_layers, tower.num_attention_heads, tower.intermediate_size,
            tower.image_size, tower.patch_size, tower.layer_norm_eps, tower.num_channels, tower.projection_dim,
            theirs.vision_feature_layer)
    assert (llm.d_model, llm.n_layer, vision.num_image_tokens) == (4096, 32, theirs.image_seq_length)


def test_the_llava_default_tables_are_transformers_own() -> None:
    """LLAVA_DEFAULTS and friends against transformers' LlavaConfig, and complete: a llava config.json holding only
    its model_type reads as transformers' default LlavaConfig."""
    default = transformers.LlavaConfig()
    assert LLAVA_DEFAULTS == {k: getattr(default, k) for k in LLAVA_DEFAULTS}
    assert LLAVA_SUB_CONFIG_TYPES == {k: getattr(default, k).model_type for k in LLAVA_SUB_CONFIG_TYPES}
    assert LLAVA_VISION_DEFAULTS == {k: getattr(default.vision_config, k) for k in LLAVA_VISION_DEFAULTS}
    where = Path("config.json")
    assert hf_llava_configs({"model_type": "llava"}, "m", where) == hf_llava_configs(default.to_dict(), "m", where)


def test_bad_folders_are_named(tmp_path: Path) -> None:
    hf = hf_llava("llama", "default")
    hf.save_pretrained(tmp_path / "hf")
    folder, clip = original_layout(tmp_path, hf)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "mm_projector_type": "qformer"}))
    with pytest.raises(CheckpointMismatchError, match="mm_projector_type='qformer' is not a projector we have"):
        load_llava(folder, vision=clip)
    (folder / "config.json").write_text(json.dumps({**config, "mm_hidden_size": 1024}))
    with pytest.raises(CheckpointMismatchError, match="mm_hidden_size=1024, but the vision tower"):
        load_llava(folder, vision=clip)
    (folder / "config.json").write_text(json.dumps(config))
    weights = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if k != "model.mm_projector.2.bias"},
              str(folder / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="does not hold the mlp2x_gelu projector 32 -> 48"):
        load_llava(folder, vision=clip)
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**hf_config, "vision_feature_select_strategy": "x"}))
    with pytest.raises(CheckpointMismatchError, match="vision_feature_select_strategy='x' is not supported"):
        load_llava(tmp_path / "hf")


def test_consolidate_reads_and_writes_the_transformers_layout(tmp_path: Path) -> None:
    import consolidate
    from mllm_cl.consolidation import modelmix

    tokenizer = byte_tokenizer_folder(tmp_path / "tok", tokenizer_config={"bos_token": "<s>", "eos_token": "</s>"})
    old = tiny_ours()
    new = tiny_ours()
    with torch.no_grad():
        for p in new.parameters():
            if p.requires_grad:
                p.add_(0.01)
    save_llava(old, tmp_path / "old", tokenizer_from=tokenizer, layout="hf", template="vicuna_v1")
    save_llava(new, tmp_path / "new", tokenizer_from=tokenizer)  # the other layout: they mix
    consolidate.main([str(tmp_path / "old"), str(tmp_path / "new"), "--method", "modelmix", "--alpha", "0.25",
                      "--out", str(tmp_path / "out")])
    merged = load_llava(tmp_path / "out")
    expected = modelmix({k: v for k, v in old.state_dict().items()}, new.state_dict(), 0.25)
    for key, value in merged.state_dict().items():
        if not key.startswith("vision."):
            torch.testing.assert_close(value, expected[key], atol=1e-6, rtol=1e-6, msg=key)
    consolidate.main([str(tmp_path / "new"), str(tmp_path / "old"), "--method", "modelmix", "--alpha", "1",
                      "--out", str(tmp_path / "out_hf")])
    assert json.loads((tmp_path / "out_hf" / "config.json").read_text())["model_type"] == "llava"  # NEW's layout


def test_export_command(tmp_path: Path, capsys) -> None:
    import export

    tokenizer = byte_tokenizer_folder(tmp_path / "tok", tokenizer_config={"bos_token": "<s>", "eos_token": "</s>"})
    save_llava(tiny_ours(), tmp_path / "ours", tokenizer_from=tokenizer, template="chatml")
    assert export.main([str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tokenizer.chat_template == chat_template_jinja("chatml")  # the template it was trained with
    assert transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf") is not None
    assert export.main([str(tmp_path / "ours"), str(tmp_path / "hf")]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err


def test_a_model_that_records_no_template_exports_the_one_training_assumed(tmp_path: Path) -> None:
    import export

    from mllm_cl.config import StageConfig
    from mllm_cl.continual import load_init

    save_llava(tiny_ours("gpt_neox"), tmp_path / "aligned", tokenizer_from=byte_tokenizer_folder(tmp_path / "tok"))
    trained_with = load_init(StageConfig(init=str(tmp_path / "aligned"), max_len=128))[2].template
    assert trained_with == "pythia"  # what a stage fine-tuning it renders with
    assert export.main([str(tmp_path / "aligned"), str(tmp_path / "hf")]) == 0
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tokenizer.chat_template == chat_template_jinja(trained_with)  # was vicuna_v1's, with its literal <s>
    assert load_llava(tmp_path / "hf").template == trained_with


def test_a_llava_checkpoint_as_init_selects_vicuna_unless_told(tmp_path: Path) -> None:
    from mllm_cl.config import StageConfig
    from mllm_cl.continual import load_init

    hf = hf_llava("llama", "default")
    hf.save_pretrained(tmp_path / "hf")
    byte_tokenizer_folder(tmp_path / "hf")  # a LLaVA-1.5 download carries its tokenizer beside the weights
    model, _, cfg = load_init(StageConfig(init=str(tmp_path / "hf"), max_len=128))
    assert cfg.template == "vicuna_v1" and isinstance(model, LlavaModel)
    assert load_init(StageConfig(init=str(tmp_path / "hf"), max_len=128, template="pythia"))[2].template == "pythia"


def test_eval_reads_a_transformers_llava_folder(tmp_path: Path, capsys) -> None:
    import eval as eval_cli

    hf = hf_llava("llama", "default")
    hf.save_pretrained(tmp_path / "hf")
    byte_tokenizer_folder(tmp_path / "hf")
    task = tmp_path / "nl" / "tiny.jsonl"
    task.parent.mkdir()
    task.write_text(json.dumps({"id": "a", "kind": "multiple_choice", "requests": [["Sky:", " blue"], ["Sky:", " red"]],
                                "gold": 0}) + "\n")
    assert eval_cli.main([str(tmp_path / "hf"), "--suite", "nl", "--nl-dir", str(task.parent)]) == 0
    assert "tiny" in capsys.readouterr().out


def bos_adding(folder: Path) -> Path:
    """The byte tokenizer made to put <s> before every text it encodes with special tokens, as LLaMA's does."""
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import processors

    backend = BackendTokenizer.from_file(str(folder / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", special_id("<s>"))])
    backend.save(str(folder / "tokenizer.json"))
    return folder


@pytest.mark.parametrize("template,adds_bos", [("vicuna_v1", True), ("vicuna_v1", False), ("chatml", False),
                                               ("pythia", False)])
def test_every_chat_template_flow_gives_our_prompt_ids(tmp_path: Path, template: str, adds_bos: bool) -> None:
    """README's flow (render to text, then the processor), llava-hf's model card's (the processor's own
    apply_chat_template, then the processor; or tokenize=True) and structured content all give render_prompt's
    ids, the image's tokens included, and the tokenizer's BOS exactly once."""
    from PIL import Image

    tokenizer = byte_tokenizer_folder(tmp_path / "tok", tokenizer_config={"bos_token": "<s>", "eos_token": "</s>"})
    if adds_bos:
        bos_adding(tokenizer)
    model = tiny_ours()
    folder = save_llava(model, tmp_path / "hf", tokenizer_from=tokenizer, layout="hf", template=template)
    image_id = json.loads((folder / "config.json").read_text())["image_token_index"]
    processor = transformers.AutoProcessor.from_pretrained(folder)
    image = Image.new("RGB", (16, 16), (200, 30, 30))
    expected = [image_id if i == IMAGE_PLACEHOLDER_ID else i for i in render_prompt(
        load_tokenizer(tokenizer), [("user", "<image>\nWhat colour?"), ("assistant", "Red."), ("user", "And now?")],
        template, model.num_image_tokens)]
    plain = [{"role": "user", "content": "<image>\nWhat colour?"}, {"role": "assistant", "content": "Red."},
             {"role": "user", "content": "And now?"}]
    structured = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
                  {"role": "user", "content": [{"type": "text", "text": "And now?"}]}]
    readme = processor.tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    card = processor.apply_chat_template(structured, add_generation_prompt=True)
    assert card == processor.apply_chat_template(plain, add_generation_prompt=True) == readme
    for text in (readme, card):
        assert processor(text=text, images=image).input_ids[0] == expected
    with_image = [{**structured[0], "content": [{"type": "image", "image": image}, structured[0]["content"][1]]},
                  *structured[1:]]
    tokenized = processor.apply_chat_template(with_image, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert list(tokenized["input_ids"][0]) == expected
    assert expected.count(special_id("<s>")) == (template == "vicuna_v1")  # BOS once, where the template has it
    with pytest.raises(Exception, match="fixed system prompt"):
        processor.apply_chat_template([{"role": "system", "content": "Be brief."}, *plain])


def test_an_export_of_a_transformers_folder_keeps_its_chat_template_and_processor(tmp_path: Path) -> None:
    import export

    tokenizer = byte_tokenizer_folder(tmp_path / "tok", tokenizer_config={"bos_token": "<s>", "eos_token": "</s>"})
    source = save_llava(tiny_ours(), tmp_path / "hf", tokenizer_from=tokenizer, layout="hf", template="chatml")
    theirs = "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    (source / "chat_template.jinja").write_text(theirs)  # as a published folder might have its own
    tokenizer_config = json.loads((source / "tokenizer_config.json").read_text()) | {"chat_template": theirs}
    (source / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    settings = json.loads((source / "preprocessor_config.json").read_text()) | {"resample": 2}
    (source / "preprocessor_config.json").write_text(json.dumps(settings))

    assert export.main([str(source), str(tmp_path / "kept")]) == 0
    for name in ("chat_template.jinja", "preprocessor_config.json", "processor_config.json"):
        assert (tmp_path / "kept" / name).read_text() == (source / name).read_text(), name
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "kept")
    assert processor.chat_template == theirs and processor.tokenizer.chat_template == theirs
    assert processor.image_processor.resample == 2

    assert export.main([str(source), str(tmp_path / "told"), "--template", "vicuna_v1"]) == 0  # told: ours
    assert (tmp_path / "told" / "chat_template.jinja").read_text() == chat_template_jinja("vicuna_v1")
    assert json.loads((tmp_path / "told" / "preprocessor_config.json").read_text())["resample"] == 3
