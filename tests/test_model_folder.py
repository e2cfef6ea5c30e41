import json

import pytest
import torch
from safetensors.torch import save_file

from mllm_cl.model_folder import (ModelFolderError, atomic_save_tensors, read_config, read_tensors,
                                  write_model_folder)


def test_write_then_read_round_trip_and_tokenizer_copy(tmp_path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / "tokenizer.json").write_text("{}")
    tensors = {"a": torch.randn(2, 3), "b": torch.arange(4)}
    folder = write_model_folder(tmp_path / "m", tensors, {"model_type": "x"}, copy_from=source)
    assert read_config(folder) == {"model_type": "x"}
    loaded = read_tensors(folder)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert (folder / "tokenizer.json").is_file()
    write_model_folder(folder, {"a": torch.zeros(1)}, {"model_type": "y"})  # replaces the old folder whole
    assert set(read_tensors(folder)) == {"a"} and not (folder / "tokenizer.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_sharded_folder_and_duplicate_keys(tmp_path) -> None:
    save_file({"a": torch.ones(1)}, str(tmp_path / "s1.safetensors"))
    save_file({"b": torch.ones(2)}, str(tmp_path / "s2.safetensors"))
    index = {"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert set(read_tensors(tmp_path)) == {"a", "b"}
    save_file({"a": torch.ones(1)}, str(tmp_path / "s2.safetensors"))
    with pytest.raises(ModelFolderError, match="appears in both"):
        read_tensors(tmp_path)


def test_clear_errors_for_missing_and_pickled_weights(tmp_path) -> None:
    with pytest.raises(ModelFolderError, match="does not exist"):
        read_tensors(tmp_path / "nope")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelFolderError, match="never loaded"):
        read_tensors(tmp_path)
    with pytest.raises(ModelFolderError, match="config.json"):
        read_config(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelFolderError, match="cannot read"):
        read_tensors(tmp_path)


def test_atomic_save_leaves_no_temporary_file(tmp_path) -> None:
    atomic_save_tensors(tmp_path / "t.safetensors", {"x": torch.ones(2)})
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]
