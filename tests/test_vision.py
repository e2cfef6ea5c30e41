"""The vision tower against transformers' CLIPVisionModel: same keys, same hidden states, same pooled output."""

import pytest
import torch

from mllm_cl.config import VisionConfig
from mllm_cl.vision import VisionTower

transformers = pytest.importorskip("transformers")


def tiny_pair(**select):
    config = VisionConfig(image_size=16, patch_size=4, d_model=32, n_layer=3, n_head=4, d_ff=64, **select)
    hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=16,
        patch_size=4, num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5)).eval()
    with torch.no_grad():  # random, non-trivial values everywhere, biases and norms included
        for p in hf.parameters():
            p.normal_(0.0, 0.2)
    tower = VisionTower(config).eval()
    # a CLIPModel file prefixes the tower with `vision_model.`: loading is a prefix strip and a strict load
    tower.load_state_dict({k.removeprefix("vision_model."): v for k, v in hf.state_dict().items()}, strict=True)
    return tower, hf


def test_state_dict_keys_are_hugging_face_keys():
    tower, hf = tiny_pair()
    assert list(tower.state_dict()) == [k.removeprefix("vision_model.") for k in hf.state_dict()]
    assert "pre_layrnorm.weight" in tower.state_dict() and "embeddings.patch_embedding.weight" in tower.state_dict()


@pytest.mark.parametrize("select_layer", [-2, -1, 0, 1])
@pytest.mark.parametrize("select_feature", ["patch", "cls_patch"])
def test_selected_hidden_state_matches_hugging_face(select_layer, select_feature):
    tower, hf = tiny_pair(select_layer=select_layer, select_feature=select_feature)
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ours = tower(pixels)
        ref = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[select_layer]
    ref = ref[:, 1:] if select_feature == "patch" else ref
    assert ours.shape == (2, tower.num_image_tokens, 32) == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-4


def test_only_needed_layers_run():
    tower, _ = tiny_pair(select_layer=-2)
    calls = []
    for i, layer in enumerate(tower.encoder.layers):
        layer.register_forward_hook(lambda *_, i=i: calls.append(i))
    tower(torch.randn(1, 3, 16, 16))
    assert calls == [0, 1]


def test_pooled_output_matches_hugging_face():
    tower, hf = tiny_pair()
    pixels = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        diff = (tower.pooled(pixels) - hf(pixel_values=pixels).pooler_output).abs().max().item()
    assert diff <= 1e-4


def test_bad_inputs_raise_clear_errors():
    tower, _ = tiny_pair()
    with pytest.raises(ValueError, match="16x16 images, got 32x32"):
        tower(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="select_layer=4 is out of range"):
        VisionTower(VisionConfig(image_size=16, patch_size=4, d_model=32, n_layer=3, n_head=4, select_layer=4))
