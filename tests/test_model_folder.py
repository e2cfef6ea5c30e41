import json
import os

import pytest
import torch
from safetensors.torch import save_file

from mllm_cl.model_folder import (ModelFolderError, atomic_save_tensors, read_config, read_tensors,
                                  remove_stale_staging, write_model_folder)


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
    with pytest.raises(ModelFolderError, match=r"never unpickled: `python convert.py .* OUT_DIR` writes them"):
        read_tensors(tmp_path)
    with pytest.raises(ModelFolderError, match="config.json"):
        read_config(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelFolderError, match="cannot read"):
        read_tensors(tmp_path)


def test_atomic_save_leaves_no_temporary_file(tmp_path) -> None:
    atomic_save_tensors(tmp_path / "t.safetensors", {"x": torch.ones(2)})
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_weights_holding_nan_or_inf_are_not_loaded(tmp_path, bad) -> None:
    weight = torch.randn(3, 4)
    weight[1, 2] = bad
    save_file({"ok": torch.randn(2), "layer.weight": weight.to(torch.bfloat16)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelFolderError, match=r"model.safetensors: tensor 'layer.weight' holds NaN or inf"):
        read_tensors(tmp_path)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/s.safetensors", ".."])
def test_an_index_naming_a_shard_outside_the_folder_is_refused(tmp_path, shard) -> None:
    folder = tmp_path / "m"
    (folder / "sub").mkdir(parents=True)
    save_file({"a": torch.ones(1)}, str(tmp_path / "outside.safetensors"))
    save_file({"a": torch.ones(1)}, str(folder / "sub" / "s.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shard}}))
    with pytest.raises(ModelFolderError, match="outside the folder"):
        read_tensors(folder)


def test_a_killed_swap_always_leaves_one_complete_version(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "checkpoint"
    write_model_folder(folder, {"v": torch.ones(1)}, {"version": 1})
    real_replace = os.replace

    def killed_at(call: int):
        calls = []

        def replace(src, dst):
            calls.append((src, dst))
            if len(calls) == call:
                raise KeyboardInterrupt  # SIGKILL stands in: nothing after this point runs
            real_replace(src, dst)
        return replace

    monkeypatch.setattr(os, "replace", killed_at(2))  # version 1 moved aside, version 2 not yet in place
    with pytest.raises(KeyboardInterrupt):
        write_model_folder(folder, {"v": torch.ones(1) * 2}, {"version": 2})
    old = tmp_path / ".checkpoint.old"
    assert not folder.exists() and read_config(old) == {"version": 1}
    monkeypatch.setattr(os, "replace", killed_at(1))  # the next write is killed before its swap: keep .old
    with pytest.raises(KeyboardInterrupt):
        write_model_folder(folder, {"v": torch.ones(1) * 3}, {"version": 3})
    assert read_config(old) == {"version": 1}
    monkeypatch.setattr(os, "replace", real_replace)
    write_model_folder(folder, {"v": torch.ones(1) * 4}, {"version": 4})
    assert read_config(folder) == {"version": 4} and not old.exists()


def test_stale_staging_folders_are_removed(tmp_path) -> None:
    (tmp_path / ".checkpoint.abc123.tmp").mkdir()
    (tmp_path / ".model.abc123.tmp").mkdir()
    assert [p.name for p in remove_stale_staging(tmp_path / "checkpoint")] == [".checkpoint.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.abc123.tmp"]


def test_a_full_disk_while_writing_a_model_keeps_the_previous_one_and_says_so(tmp_path, monkeypatch) -> None:
    from safetensors import SafetensorError

    import mllm_cl.model_folder as model_folder

    folder = write_model_folder(tmp_path / "m", {"a": torch.ones(3)}, {"model_type": "x"})
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              "\"No space left on device\" })")

    monkeypatch.setattr(model_folder, "save_file", full_disk)
    with pytest.raises(ModelFolderError, match=rf"cannot write {folder}: .*No space left on device.*; the previous "
                                               rf"{folder} is kept as it was"):
        write_model_folder(folder, {"a": torch.zeros(3)}, {"model_type": "y"})
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    with pytest.raises(ModelFolderError, match="no partial copy is left"):
        write_model_folder(tmp_path / "new", {"a": torch.zeros(3)}, {"model_type": "y"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging folder, no half model
