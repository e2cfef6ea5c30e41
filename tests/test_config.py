import json

import pytest

from mllm_cl.config import (LLM_PRESETS, VISION_PRESETS, ConfigError, LLMConfig, apply_overrides, llm_preset,
                            load_json, vision_preset)


def test_every_preset_builds() -> None:
    for name in LLM_PRESETS:
        assert llm_preset(name).name == name
    for name in VISION_PRESETS:
        assert vision_preset(name).name == name
    assert llm_preset("pythia-160m").rotary_dim == 16
    assert vision_preset("clip-vit-l-14-336").num_patches == 576


def test_overrides_parse_types_and_reject_unknown_keys() -> None:
    cfg = apply_overrides(llm_preset("tiny"), ["n_layer=2", "norm_eps=1e-6", "tie_embeddings=true", "name=x"])
    assert (cfg.n_layer, cfg.norm_eps, cfg.tie_embeddings, cfg.name) == (2, 1e-6, True, "x")
    with pytest.raises(ConfigError, match="n_layers"):
        apply_overrides(cfg, ["n_layers=3"])
    with pytest.raises(ConfigError, match="divisible"):
        apply_overrides(cfg, ["n_head=3"])


def test_json_file_round_trip_and_errors(tmp_path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"name": "a", "n_layer": 3}))
    assert load_json(LLMConfig, path).n_layer == 3
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_json(LLMConfig, path)
    path.write_text(json.dumps({"bogus": 1}))
    with pytest.raises(ConfigError, match="bogus"):
        load_json(LLMConfig, path)
