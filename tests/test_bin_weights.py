"""PyTorch .bin checkpoints -> safetensors: the tensors come out bit for bit (tied and shared ones too), shards
mirror the .bin index, the other files are copied, the model loads with logits equal to transformers', and
whatever is not a plain state dict of tensors is refused by name."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mllm_cl.bin_weights import convert_bin_folder
from mllm_cl.model_folder import ModelFolderError, read_tensors
from mllm_cl.weights import load_llm

transformers = pytest.importorskip("transformers")
OTHER_FILES = {"config.json": '{"model_type": "llama"}', "tokenizer_config.json": '{"bos_token": "<s>"}',
               "generation_config.json": '{"bos_token_id": 1}', "special_tokens_map.json": "{}"}


class NotATensor:
    """A class the weights-only loader has never heard of: unpickling it in full would run its code."""


def source_tensors() -> dict[str, torch.Tensor]:
    """Tensors in several dtypes, one tied to another (the same tensor twice) and two views of one storage."""
    torch.manual_seed(0)
    embed = torch.randn(11, 4)
    packed = torch.randn(6, 4)
    return {"model.embed_tokens.weight": embed, "lm_head.weight": embed, "a.weight": packed[:2], "b.weight": packed[2:],
            "half.weight": torch.randn(3, 5).half(), "brain.weight": torch.randn(5).bfloat16(),
            "steps": torch.arange(4)}


def write_folder(folder: Path, shards: list[dict[str, torch.Tensor]] | None = None) -> Path:
    """A folder as the LLaVA-1.5 releases come: .bin weights (one file, or shards and their index), other files."""
    folder.mkdir(parents=True)
    for name, text in OTHER_FILES.items():
        (folder / name).write_text(text)
    if shards is None:
        torch.save(source_tensors(), folder / "pytorch_model.bin")
        return folder
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
        torch.save(shard, folder / name)
        weight_map |= {key: name for key in shard}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": 0},
                                                                     "weight_map": weight_map}))
    return folder


def assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key


def test_a_single_file_with_tied_and_shared_tensors(tmp_path: Path) -> None:
    source = write_folder(tmp_path / "src")
    (source / "training_args.bin").write_bytes(b"a pickle that is not part of the weights")
    out = convert_bin_folder(source, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == sorted([*OTHER_FILES, "model.safetensors"])
    for name, text in OTHER_FILES.items():
        assert (out / name).read_text() == text
    assert_same_tensors(read_tensors(out), source_tensors())
    assert_same_tensors(read_tensors(out), torch.load(source / "pytorch_model.bin", weights_only=True))


def test_shards_mirror_the_index(tmp_path: Path) -> None:
    tensors = source_tensors()
    keys = list(tensors)
    source = write_folder(tmp_path / "src", [{k: tensors[k] for k in keys[:3]}, {k: tensors[k] for k in keys[3:]}])
    out = convert_bin_folder(source, tmp_path / "out")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    assert index["weight_map"] == {k: first if i < 3 else second for i, k in enumerate(keys)}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert set(load_file(str(out / first))) == set(keys[:3])
    assert not any(p.name.endswith((".bin", ".bin.index.json")) for p in out.iterdir())
    assert_same_tensors(read_tensors(out), tensors)


def test_a_converted_llama_loads_with_logits_equal_to_transformers(tmp_path: Path) -> None:
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(config).eval()
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    keys = sorted(state)
    source = write_folder(tmp_path / "src", [{k: state[k] for k in keys[:5]}, {k: state[k] for k in keys[5:]}])
    (source / "config.json").write_text(config.to_json_string())
    model = load_llm(convert_bin_folder(source, tmp_path / "out")).eval()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        difference = (model(ids).logits - reference(ids).logits).abs().max()
    print("largest logit difference, converted LLaMA:", float(difference))
    assert difference <= 1e-5


def test_a_pickle_that_is_not_weights_only_is_refused_by_name(tmp_path: Path) -> None:
    source = write_folder(tmp_path / "src")
    torch.save({"w": torch.zeros(2), "trainer": NotATensor()}, source / "pytorch_model.bin")
    with pytest.raises(ModelFolderError, match=r"pytorch_model.bin: torch.load\(weights_only=True\) refuses it "
                                               r"\(Unsupported global: GLOBAL test_bin_weights.NotATensor"):
        convert_bin_folder(source, tmp_path / "out")
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("content, message", [
    ({"state_dict": {"w": torch.zeros(2)}}, r"is not a state dict of tensors: 'state_dict' \(dict\) is not"),
    ({"w": torch.zeros(2), "step": 3}, r"'step' \(int\) is not a named tensor"),
    (torch.zeros(2), "holds a Tensor, not a state dict"),
    ({}, "holds a dict, not a state dict"),
])
def test_a_file_that_is_not_a_state_dict_of_tensors_is_named(tmp_path: Path, content, message) -> None:
    source = write_folder(tmp_path / "src")
    torch.save(content, source / "pytorch_model.bin")
    with pytest.raises(ModelFolderError, match="pytorch_model.bin.*" + message):
        convert_bin_folder(source, tmp_path / "out")


def test_damaged_files_and_a_wrong_index_are_named(tmp_path: Path) -> None:
    source = write_folder(tmp_path / "src")
    data = (source / "pytorch_model.bin").read_bytes()
    (source / "pytorch_model.bin").write_bytes(data[:len(data) // 2])
    with pytest.raises(ModelFolderError, match="pytorch_model.bin cannot be read as a PyTorch checkpoint"):
        convert_bin_folder(source, tmp_path / "out")
    tensors = source_tensors()
    source = write_folder(tmp_path / "sharded", [{"a.weight": tensors["a.weight"]}, {"b.weight": tensors["b.weight"]}])
    index = json.loads((source / "pytorch_model.bin.index.json").read_text())
    index["weight_map"]["b.weight"] = "pytorch_model-00001-of-00002.bin"
    index["weight_map"]["c.weight"] = "pytorch_model-00002-of-00002.bin"
    (source / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFolderError, match=r"does not list what its shards hold: \['b.weight', 'c.weight'\]"):
        convert_bin_folder(source, tmp_path / "out")
    index["weight_map"]["b.weight"] = "../pytorch_model-00002-of-00002.bin"
    (source / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFolderError, match="outside the folder"):
        convert_bin_folder(source, tmp_path / "out")
    (source / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(ModelFolderError, match="is not a checkpoint index"):
        convert_bin_folder(source, tmp_path / "out")
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text("{}")
    with pytest.raises(ModelFolderError, match=r"has neither pytorch_model.bin nor pytorch_model.bin.index.json: "
                                               r"there are no PyTorch weights to convert; it holds \['config.json'\]"):
        convert_bin_folder(tmp_path / "no_weights", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_output_folder_must_be_new_or_empty_and_outside_the_source(tmp_path: Path) -> None:
    source = write_folder(tmp_path / "src")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ModelFolderError, match="exists and is not an empty folder"):
        convert_bin_folder(source, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(ModelFolderError, match="would write inside the folder to convert"):
        convert_bin_folder(source, source / "converted")
    (tmp_path / "empty").mkdir()
    assert (convert_bin_folder(source, tmp_path / "empty") / "model.safetensors").is_file()
    with pytest.raises(ModelFolderError, match="already holds safetensors weights"):
        convert_bin_folder(tmp_path / "empty", tmp_path / "again")


def test_the_sentencepiece_hook_writes_tokenizer_json_when_there_is_none(tmp_path: Path) -> None:
    source = write_folder(tmp_path / "src")
    (source / "tokenizer.model").write_bytes(b"sentencepiece model")
    calls = []

    def fake_converter(model: Path, target: Path) -> None:
        calls.append((model, target.name))
        target.write_text(json.dumps({"from": model.read_bytes().decode()}))

    out = convert_bin_folder(source, tmp_path / "out", convert_tokenizer=fake_converter)
    assert calls == [(source / "tokenizer.model", "tokenizer.json")]
    assert json.loads((out / "tokenizer.json").read_text()) == {"from": "sentencepiece model"}
    assert (out / "tokenizer.model").read_bytes() == b"sentencepiece model"
    (source / "tokenizer.json").write_text("{}")
    convert_bin_folder(source, tmp_path / "out2", convert_tokenizer=fake_converter)
    assert len(calls) == 1 and (tmp_path / "out2" / "tokenizer.json").read_text() == "{}"
