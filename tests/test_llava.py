"""LLaVA: the splice against a hand-built sequence and against transformers' LlavaForConditionalGeneration, mixed
batches, labels, frozen tower, generation, save/load."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_tokenizer import byte_tokenizer_folder

from mllm_cl.config import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID, LLMConfig, VisionConfig
from mllm_cl.conversation import render_conversation
from mllm_cl.data import collate
from mllm_cl.llava import LlavaModel, load_llava, save_llava
from mllm_cl.llm import LanguageModel
from mllm_cl.losses import causal_lm_loss
from mllm_cl.model_folder import ModelFolderError
from mllm_cl.projector import build_projector
from mllm_cl.tokenizer import load_tokenizer
from mllm_cl.vision import VisionTower
from mllm_cl.weights import CheckpointMismatchError, llm_config_to_hf, llm_state_dict_from_hf, vision_config_to_hf

P = 4  # image tokens: (16 / 8) ** 2 patches, class token dropped
IMG = IMAGE_PLACEHOLDER_ID


def tiny_llava() -> LlavaModel:
    vision = VisionTower(VisionConfig(image_size=16, patch_size=8, d_model=32, n_layer=2, n_head=4, d_ff=64))
    llm = LanguageModel(LLMConfig(vocab_size=272, n_layer=2, n_head=4, n_kv_head=4, d_model=48, d_ff=96,
                                  rotary_pct=0.5, max_seq_len=256))
    return LlavaModel(vision, build_projector("mlp2x_gelu", 32, 48), llm).eval()


def mixed_batch() -> dict[str, torch.Tensor]:
    """Row 0 text only; row 1 one image; row 2 two images; right-padded with 0."""
    rows = [[5, 6, 7, 8, 9, 10],
            [5] + [IMG] * P + [11, 12],
            [5, 6] + [IMG] * P + [13] + [IMG] * P + [14, 15]]
    T = max(map(len, rows))
    input_ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=torch.randn(3, 3, 16, 16))


def test_image_features_land_exactly_at_placeholders():
    model = tiny_llava()
    batch = mixed_batch()
    with torch.no_grad():
        features = model.projector(model.vision(batch["pixel_values"]))  # (3 images, P, D)
        table = model.llm.token_embedding.weight
        manual = torch.zeros(*batch["input_ids"].shape, 48)
        image, token = 0, 0  # walk the batch row by row, position by position
        for b, row in enumerate(batch["input_ids"].tolist()):
            for t, tok in enumerate(row):
                if tok == IMG:
                    manual[b, t] = features[image, token]
                    image, token = (image + 1, 0) if token == P - 1 else (image, token + 1)
                else:
                    manual[b, t] = table[tok]
        assert image == 3
        spliced = model.embed_inputs(batch["input_ids"], batch["pixel_values"])
        assert torch.equal(spliced, manual)
        out = model(**batch)
        ref = model.llm(inputs_embeds=manual, attention_mask=batch["attention_mask"])
    assert torch.equal(out.logits, ref.logits)


def test_logits_match_transformers_llava_with_the_same_weights():
    """The whole wrapper against `LlavaForConditionalGeneration`: tower features (second-to-last layer, class
    token dropped), mlp2x_gelu projector, splice into a padded batch with 0, 1 and 2 images per row, LLM."""
    transformers = pytest.importorskip("transformers")
    ours = tiny_llava()
    vision_config, llm_config = ours.vision.config, ours.llm.config
    image_id = llm_config.vocab_size - 1  # HF marks image positions with a real token id
    hf = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            **{k: v for k, v in vision_config_to_hf(vision_config).items() if k != "mllm_cl"}),
        text_config=transformers.GPTNeoXConfig(**llm_config_to_hf(llm_config)),
        image_token_index=image_id, image_seq_length=P, projector_hidden_act="gelu",
        vision_feature_layer=vision_config.select_layer, vision_feature_select_strategy="default")).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # random, non-trivial values everywhere, biases and norms included
        for p in hf.parameters():
            p.normal_(0.0, 0.2)
    ours.vision.load_state_dict({k.removeprefix("vision_model."): v
                                 for k, v in hf.model.vision_tower.state_dict().items()}, strict=True)
    hf_projector = hf.model.multi_modal_projector
    ours.projector.load_state_dict({"0.weight": hf_projector.linear_1.weight, "0.bias": hf_projector.linear_1.bias,
                                    "2.weight": hf_projector.linear_2.weight, "2.bias": hf_projector.linear_2.bias})
    hf_llm = {f"gpt_neox.{k}": v for k, v in hf.model.language_model.state_dict().items()}
    ours.llm.load_state_dict(llm_state_dict_from_hf(hf_llm | {"embed_out.weight": hf.lm_head.weight}, llm_config))
    batch = mixed_batch()
    with torch.no_grad():
        got = ours(**batch).logits
        want = hf(input_ids=batch["input_ids"].masked_fill(batch["input_ids"] == IMG, image_id),
                  attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]).logits
    real = batch["attention_mask"].bool()  # padding positions are not compared
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)


def test_samples_give_the_same_logits_alone_and_in_a_mixed_batch():
    model = tiny_llava()
    batch = mixed_batch()
    with torch.no_grad():
        together = model(**batch).logits
        text_alone = model(batch["input_ids"][:1, :6]).logits
        one_image_alone = model(batch["input_ids"][1:2, :7], pixel_values=batch["pixel_values"][:1]).logits
    assert (together[0, :6] - text_alone[0]).abs().max().item() <= 1e-5
    assert (together[1, :7] - one_image_alone[0]).abs().max().item() <= 1e-5


def test_collated_labels_ignore_image_and_padding_positions(tmp_path: Path):
    tokenizer = load_tokenizer(byte_tokenizer_folder(tmp_path))
    with_image = render_conversation(tokenizer, [("user", "<image>\nWhat?"), ("assistant", "A dog.")], "pythia", P)
    text_only = render_conversation(tokenizer, [("user", "Hi?"), ("assistant", "Hello.")], "pythia", P)
    samples = [dict(input_ids=torch.tensor(r.input_ids), labels=torch.tensor(r.labels),
                    pixel_values=image) for r, image in ((text_only, None), (with_image, torch.randn(3, 16, 16)))]
    batch = collate(samples, pad_id=tokenizer.pad_id)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert int((ids == IMG).sum()) == P
    assert bool((labels[ids == IMG] == IGNORE_INDEX).all())
    assert bool((labels[mask == 0] == IGNORE_INDEX).all()) and int((mask == 0).sum()) > 0
    supervised = labels != IGNORE_INDEX
    assert torch.equal(labels[supervised], ids[supervised])  # an answer token is supervised as itself
    model = tiny_llava().train()
    loss = causal_lm_loss(model(ids, mask, batch["pixel_values"]).logits, labels)
    loss.backward()
    assert torch.isfinite(loss) and model.projector[0].weight.grad.abs().sum() > 0


def test_vision_tower_is_frozen_and_stays_in_eval_mode():
    model = tiny_llava().train()
    assert not model.vision.training and model.projector.training and model.llm.training
    assert not any(p.requires_grad for p in model.vision.parameters())
    batch = mixed_batch()
    model(**batch).logits.sum().backward()
    assert all(p.grad is None for p in model.vision.parameters())
    assert model.projector[2].weight.grad is not None and model.llm.blocks[0].attn.qkv.weight.grad is not None


def test_placeholder_count_mismatch_is_a_clear_error():
    model = tiny_llava()
    batch = mixed_batch()
    with pytest.raises(ValueError, match=r"12 image positions .* but 2 image\(s\) x 4 tokens = 8"):
        model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"][:2])
    with pytest.raises(ValueError, match=r"12 image positions .* but 0 image\(s\)"):
        model(batch["input_ids"], batch["attention_mask"])
    with pytest.raises(ValueError, match="build_projector"):
        LlavaModel(model.vision, build_projector("linear", 32, 40), model.llm)


def greedy_without_cache(model: LlavaModel, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                         n: int) -> list[int]:
    """One unpadded prompt: re-run the whole sequence for every new token (no KV cache)."""
    embeds = model.embed_inputs(input_ids, pixel_values)
    out = []
    for _ in range(n):
        token = model.llm(inputs_embeds=embeds).logits[0, -1].argmax()
        out.append(int(token))
        embeds = torch.cat([embeds, model.llm.embed(token.view(1, 1))], dim=1)
    return out


def test_generate_equals_greedy_uncached_reference():
    model = tiny_llava()
    batch = mixed_batch()
    ids, mask, pixels = batch["input_ids"][:2], batch["attention_mask"][:2], batch["pixel_values"][:1]
    with torch.no_grad():
        out = model.generate(ids, mask, pixels, max_new_tokens=6)
        text_ref = greedy_without_cache(model, ids[:1, :6], None, 6)
        image_ref = greedy_without_cache(model, ids[1:2, :7], pixels, 6)
    assert out.tokens.tolist() == [text_ref, image_ref]


def test_save_and_load_round_trip(tmp_path: Path):
    model = tiny_llava()
    folder = save_llava(model, tmp_path / "llava", tokenizer_from=byte_tokenizer_folder(tmp_path / "tok"))
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "llm", "projector.safetensors", "vision"]
    assert (folder / "llm" / "tokenizer.json").is_file()
    loaded = load_llava(folder)
    assert loaded.projector.kind == "mlp2x_gelu"
    assert replace(loaded.vision.config, name="x") == replace(model.vision.config, name="x")
    assert model.state_dict().keys() == loaded.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    batch = mixed_batch()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    assert not loaded.vision.training and not any(p.requires_grad for p in loaded.vision.parameters())
    save_llava(model, folder)  # overwriting an existing folder swaps it whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llava", "tok"]


def test_load_errors_name_the_file(tmp_path: Path):
    model = tiny_llava()
    folder = save_llava(model, tmp_path / "llava")
    config = (folder / "config.json").read_text()
    (folder / "config.json").write_text(config.replace("mlp2x_gelu", "mlp3x_gelu"))
    with pytest.raises(CheckpointMismatchError, match="projector.safetensors does not hold the mlp3x_gelu"):
        load_llava(folder)
    (folder / "config.json").write_text(config.replace("mllm_cl_llava", "llama"))
    with pytest.raises(ModelFolderError, match="is not a LLaVA folder"):
        load_llava(folder)
    with pytest.raises(ModelFolderError, match="config.json not found"):
        load_llava(tmp_path / "nowhere")


def test_nan_or_integer_weights_are_refused_in_every_part(tmp_path: Path):
    from safetensors.torch import load_file, save_file

    folder = save_llava(tiny_llava(), tmp_path / "llava")
    files = {"projector": folder / "projector.safetensors", "llm": folder / "llm" / "model.safetensors",
             "vision": folder / "vision" / "model.safetensors"}
    originals = {part: path.read_bytes() for part, path in files.items()}
    for part, path in files.items():
        tensors = load_file(str(path))
        key = sorted(tensors)[0]
        for damage, message in ((lambda t: t.clone().fill_(float("nan")), f"tensor '{key}' holds NaN or inf values"),
                                (lambda t: t.round().to(torch.int32), f"weight '{key}' is torch.int32; model weights "
                                                                      "must be floating point")):
            save_file({**tensors, key: damage(tensors[key])}, str(path))
            with pytest.raises(ModelFolderError, match=message):
                load_llava(folder)
            path.write_bytes(originals[part])
    load_llava(folder)  # whole again
