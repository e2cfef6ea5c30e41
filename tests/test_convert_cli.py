"""convert.py: an original-LLaVA folder with sharded .bin weights (as liuhaotian/llava-v1.5-7b comes) converted and
loaded equals its transformers twin; refusals are one `convert.py: error:` line and exit code 2."""

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_bin_weights import NotATensor, write_folder
from test_llava import mixed_batch
from test_llava_layouts import assert_same_logits, hf_llava, original_layout
from test_sentencepiece_model import train

import convert
from mllm_cl.llava import load_llava
from mllm_cl.model_folder import ModelFolderError
from mllm_cl.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_an_original_llava_folder_of_bin_shards_converts_and_equals_its_twin(tmp_path: Path, capsys) -> None:
    hf = hf_llava("llama", "default")
    hf.save_pretrained(tmp_path / "hf")
    folder, clip = original_layout(tmp_path, hf, "llava")
    tensors = load_file(str(folder / "model.safetensors"))
    # LLaMA checkpoints of transformers 4.31 (LLaVA-1.5's) also carry the rotary tables, which loading ignores
    tensors |= {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.rand(6) for i in range(2)}
    keys = sorted(tensors)
    source = tmp_path / "llava-v1.5"
    source.mkdir()
    weight_map = {}
    for i, part in enumerate((keys[:len(keys) // 2], keys[len(keys) // 2:]), 1):
        name = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save({k: tensors[k] for k in part}, source / name)
        weight_map |= {k: name for k in part}
    (source / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (source / "config.json").write_text((folder / "config.json").read_text())
    spm = train(tmp_path / "spm") / "tokenizer.model"  # the release's tokenizer: SentencePiece's tokenizer.model only
    (source / "tokenizer.model").write_bytes(spm.read_bytes())
    (source / "tokenizer_config.json").write_text(json.dumps({"legacy": False, "tokenizer_class": "LlamaTokenizer"}))
    with pytest.raises(ModelFolderError, match="found pickle files"):  # not loaded as they are
        load_llava(source, vision=clip)
    assert convert.main([str(source), str(tmp_path / "converted")]) == 0
    assert f"wrote {tmp_path / 'converted'}" in capsys.readouterr().out
    converted = load_llava(tmp_path / "converted", vision=clip)
    assert (tmp_path / "converted" / "tokenizer.json").is_file()  # written from tokenizer.model, which it reads alike
    text = "A photo of 3 red cubes,  naïve ☃ <image>\n"
    assert load_tokenizer(tmp_path / "converted").encode(text) == load_tokenizer(source).encode(text)
    print("largest logit difference, converted original layout:", assert_same_logits(converted, hf, mixed_batch()))


def test_refusals_are_one_error_line(tmp_path: Path, capsys) -> None:
    source = write_folder(tmp_path / "src")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    assert convert.main([str(source), str(tmp_path / "taken")]) == 2
    assert capsys.readouterr().err.startswith(f"convert.py: error: {tmp_path / 'taken'} exists and is not an empty "
                                              "folder")
    torch.save({"w": torch.zeros(2), "trainer": NotATensor()}, source / "pytorch_model.bin")
    assert convert.main([str(source), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"convert.py: error: {source / 'pytorch_model.bin'}: torch.load(weights_only=True) refuses")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_help(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["convert.py", "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "convert.py"), run_name="__main__")
    assert done.value.code == 0 and "python convert.py SRC_DIR OUT_DIR" in capsys.readouterr().out
