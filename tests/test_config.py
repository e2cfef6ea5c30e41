import dataclasses
import json

import pytest

from mllm_cl.config import (LLM_PRESETS, VISION_PRESETS, ConfigError, LLMConfig, apply_overrides, from_dict,
                            llm_preset, load_json, vision_preset)


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


@dataclasses.dataclass
class _Inner:
    rate: float = 0.1


@dataclasses.dataclass
class _Settings:
    steps: int = 1
    flag: bool = False
    limit: int | None = None
    names: list[str] = dataclasses.field(default_factory=list)
    lrs: dict[str, float] = dataclasses.field(default_factory=dict)
    pair: tuple[int, int] = (0, 0)
    inner: _Inner = dataclasses.field(default_factory=_Inner)


def test_values_are_checked_against_the_field_types() -> None:
    ok = from_dict(_Settings, {"steps": 3, "limit": None, "names": ["a"], "lrs": {"": 1}, "pair": [1, 2],
                               "inner": {"rate": 2}})
    assert (ok.steps, ok.limit, ok.names, ok.pair, ok.inner.rate) == (3, None, ["a"], [1, 2], 2.0)
    assert isinstance(ok.lrs[""], float) and isinstance(ok.inner.rate, float)  # ints widen to floats
    assert from_dict(_Settings, {"limit": 5}).limit == 5
    bad = [({"steps": "abc"}, "config.steps: expected an integer, got 'abc'"),
           ({"steps": True}, "config.steps: expected an integer"),  # a bool is no count
           ({"steps": 1.5}, "config.steps: expected an integer"),
           ({"flag": "yes"}, "config.flag: expected true or false"),
           ({"limit": "all"}, "config.limit: expected an integer, got 'all' or null"),
           ({"names": "a,b"}, "config.names: expected a list"),
           ({"names": ["a", 2]}, r"config.names\[1\]: expected a string"),
           ({"lrs": {"llm.": "fast"}}, "config.lrs.llm.: expected a number"),
           ({"pair": [1]}, "config.pair: expected a list of 2 items"),
           ({"inner": 3}, "config.inner: expected an object of _Inner settings"),
           ({"inner": {"rate": None}}, "config.inner.rate: expected a number")]
    for data, message in bad:
        with pytest.raises(ConfigError, match=message):
            from_dict(_Settings, data)


def test_an_override_of_the_wrong_type_names_its_key() -> None:
    with pytest.raises(ConfigError, match="n_layer: expected an integer, got 'two'"):
        apply_overrides(llm_preset("tiny"), ["n_layer=two"])


# ---------------------------------------------------------------- settings refused before anything runs (issue 30)

REFUSED_OVERRIDES = [
    ("finetune", "max_len=0", "StageConfig.max_len must be a positive integer"),
    ("finetune", "max_len=-5", "StageConfig.max_len must be a positive integer"),
    ("continual", "eval.batch_size=0", "EvalSpec.batch_size must be a positive integer"),
    ("continual", "eval.max_new_tokens=0", "EvalSpec.max_new_tokens must be a positive integer"),
    ("continual", "eval.nl_limit=-1", "EvalSpec.nl_limit must be an integer >= 0"),
    ("finetune", "projector=foo", "projector: unknown projector kind 'foo'"),
    ("finetune", "projector=mlp100000000x_gelu", "with 1 <= N <= 16"),
    ("finetune", "train.device=mps", "device must be auto, cpu, cuda or cuda:N, got 'mps'"),
    ("finetune", "train.device=meta", "device must be auto, cpu, cuda or cuda:N, got 'meta'"),
    ("continual", 'tasks=[{"name": "x/../../../escaped", "train": "a.json", "test": "b.json"}]',
     "task name 'x/../../../escaped' must be a plain name"),
    ("continual", 'tasks=[{"name": "..", "train": "a.json", "test": "b.json"}]', "task name '..' must be a plain name"),
    ("experiment", 'methods={"../../../x": ["naive"]}', "method run '../../../x' must be a plain name"),
    ("experiment", "device=mps", "device must be auto, cpu, cuda or cuda:N, got 'mps'"),
    ("experiment", "max_len=0", "ExperimentConfig.max_len must be a positive integer"),
    ("experiment", "world_size=bogus", "world_size must be one of smoke, small, demo, experiment"),
]


@pytest.mark.parametrize("stage, override, message", REFUSED_OVERRIDES)
def test_train_py_refuses_settings_no_later_check_would_catch(stage, override, message, tmp_path, capsys) -> None:
    import train

    out = tmp_path / "out"
    assert train.main([stage, override, f"out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"train.py {stage}: error: ") and message in err, err
    assert err.count("\n") == 1, err  # one line, no traceback
    assert not out.exists()  # refused before anything was written


def test_plain_names_accept_the_names_the_grids_use() -> None:
    from mllm_cl.config import ExperimentConfig, TaskSpec

    for name in ("easy_vqa", "big_color", "msgm+rehearsal", "lora+modelmix", "llava_c", "uir+sac", "p1", "t.2"):
        TaskSpec(name=name)
        ExperimentConfig(methods={name: ["naive"]})
