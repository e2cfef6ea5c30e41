"""CLIP contrastive pre-training: the loss by hand, it learns, and the saved model is a Hugging Face CLIPModel."""

import json

import pytest
import torch

from mllm_cl.clip_text import CLIPContrastive, TextTowerConfig, clip_config_hf, clip_state_dict_hf, save_clip
from mllm_cl.config import VisionConfig
from mllm_cl.model_folder import read_tensors
from mllm_cl.vision import VisionTower

transformers = pytest.importorskip("transformers")

EOS = 3


def tiny_model() -> CLIPContrastive:
    vision = VisionTower(VisionConfig(image_size=16, patch_size=4, d_model=32, n_layer=2, n_head=4, d_ff=64,
                                      projection_dim=24))
    text = TextTowerConfig(vocab_size=40, max_seq_len=12, d_model=32, n_layer=2, n_head=4, d_ff=64,
                           eos_token_id=EOS, pad_token_id=0)
    return CLIPContrastive(vision, text)


def tiny_batch(n: int = 4):
    pixels = torch.randn(n, 3, 16, 16)
    ids = torch.randint(4, 40, (n, 10))
    lengths = [10, 7, 4, 9, 6, 8][:n]
    for row, length in enumerate(lengths):  # right-padded, EOS last
        ids[row, length - 1] = EOS
        ids[row, length:] = 0
    return pixels, ids


def test_loss_is_symmetric_cross_entropy():
    model = tiny_model()
    pixels, ids = tiny_batch()
    loss = model(pixels, ids)
    with torch.no_grad():
        img = model.visual_projection(model.vision_model.pooled(pixels))
        txt = model.text_projection(model.text_model(ids))
        img = img / img.norm(dim=1, keepdim=True)
        txt = txt / txt.norm(dim=1, keepdim=True)
        sim = model.logit_scale.exp() * img @ txt.T
        n = len(sim)
        image_to_text = sum(torch.logsumexp(sim[i], 0) - sim[i, i] for i in range(n)) / n
        text_to_image = sum(torch.logsumexp(sim[:, j], 0) - sim[j, j] for j in range(n)) / n
    assert abs(loss.item() - (image_to_text + text_to_image).item() / 2) < 1e-5


def test_padding_after_eos_does_not_change_text_embedding():
    model = tiny_model().eval()
    _, ids = tiny_batch()
    other = ids.clone()
    other[1, 7:] = torch.tensor([5, EOS, 9])  # row 1 ends at 7: change only what follows its first EOS
    with torch.no_grad():
        assert torch.allclose(model.text_model(ids), model.text_model(other), atol=1e-6)


def test_loss_decreases():
    model = tiny_model()
    pixels, ids = tiny_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = model(pixels, ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def test_hugging_face_clip_model_loads_it_and_agrees(tmp_path):
    model = tiny_model().eval()
    with torch.no_grad():
        model.logit_scale.fill_(1.3)
    save_clip(model, tmp_path / "clip")
    config = json.loads((tmp_path / "clip" / "config.json").read_text())
    assert config == clip_config_hf(model)
    hf = transformers.CLIPModel(transformers.CLIPConfig(**config)).eval()
    hf.load_state_dict(read_tensors(tmp_path / "clip"), strict=True)
    assert set(clip_state_dict_hf(model)) == set(hf.state_dict())
    pixels, ids = tiny_batch()
    with torch.no_grad():
        ours = model(pixels, ids)
        ref = hf(input_ids=ids, pixel_values=pixels, attention_mask=(ids != 0).long(), return_loss=True).loss
    assert abs(ours.item() - ref.item()) < 1e-5


def test_bad_captions_raise_clear_errors():
    model = tiny_model()
    _, ids = tiny_batch()
    ids[2] = 5
    with pytest.raises(ValueError, match=r"row\(s\) \[2\] hold no EOS"):
        model.text_model(ids)
    with pytest.raises(ValueError, match="longer than the text tower's max_seq_len=12"):
        model.text_model(torch.full((1, 13), EOS))
