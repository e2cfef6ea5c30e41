"""Seeded random mutations of valid inputs (a LLaVA JSON file, a model folder's config.json, an NL benchmark JSONL
file, a safetensors index, a tokenizer_config.json) and images of every PIL mode: every case must end in a correct
run or a clear error (`UserError`), never a traceback from deep inside Python, torch or a parser."""

import copy
import json
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_tokenizer import byte_tokenizer_folder

from mllm_cl.config import LLMConfig
from mllm_cl.data import ConversationDataset
from mllm_cl.errors import UserError
from mllm_cl.evaluation import evaluate_nl_suite
from mllm_cl.llm import LanguageModel
from mllm_cl.tokenizer import load_tokenizer
from mllm_cl.weights import load_llm, save_llm

CASES = 120  # per input kind
WEIRD_VALUES: list[Any] = [None, 0, -1, 1.5, float("inf"), True, "", "x", "128", "\ud800", "\udcff text", [], {},
                           [1, 2], {"a": 1}, 10 ** 30, -(10 ** 30), "../../etc/passwd", "<image>", "<image>" * 3]


def mutate(value: Any, rng: random.Random) -> Any:
    """One random change somewhere in a JSON value: replace, delete, duplicate or re-type a part of it."""
    if isinstance(value, dict) and value and rng.random() < 0.7:
        key = rng.choice(sorted(value))
        action = rng.random()
        if action < 0.25:
            return {k: v for k, v in value.items() if k != key}
        if action < 0.5:
            return {**value, key: rng.choice(WEIRD_VALUES)}
        return {**value, key: mutate(value[key], rng)}
    if isinstance(value, list) and value and rng.random() < 0.7:
        i = rng.randrange(len(value))
        action = rng.random()
        if action < 0.2:
            return value[:i] + value[i + 1:]
        if action < 0.35:
            return value + [copy.deepcopy(value[i])]
        return value[:i] + [mutate(value[i], rng)] + value[i + 1:]
    return rng.choice(WEIRD_VALUES)


def corrupt_text(text: str, rng: random.Random) -> bytes:
    """The file's bytes cut, spliced with bytes that are not UTF-8, or wrapped in deep nesting."""
    data = text.encode("utf-8", "surrogatepass")
    action = rng.random()
    if action < 0.4:
        return data[: rng.randrange(len(data))]
    if action < 0.8:
        i = rng.randrange(len(data))
        return data[:i] + bytes(rng.randrange(128, 256) for _ in range(3)) + data[i:]
    return b"[" * 100_000 + b"]" * 100_000


def run_cases(make_input: Callable[[random.Random, int], None], use: Callable[[], None], seed: int) -> list[str]:
    """Run `use` on CASES mutated inputs; return a description of every case that ended in another exception."""
    rng, failures = random.Random(seed), []
    for case in range(CASES):
        make_input(rng, case)
        try:
            use()
        except UserError:
            pass
        except Exception as e:  # noqa: BLE001 - anything else is what this test looks for
            failures.append(f"case {case}: {type(e).__name__}: {str(e)[:200]}")
    return failures


def dump(value: Any) -> str:
    """JSON with non-ASCII text written raw, lone surrogates included (as `surrogatepass` bytes)."""
    return json.dumps(value, ensure_ascii=False)


def dump_escaped(value: Any) -> str:
    """JSON with every non-ASCII character escaped: a lone surrogate parses back as one."""
    return json.dumps(value)


def mutated_json_file(path: Path, valid: Any) -> Callable[[random.Random, int], None]:
    """make_input for a JSON file: in turn mutated and written raw, mutated and written escaped, corrupted."""
    def make_input(rng: random.Random, case: int) -> None:
        if case % 4 == 3:
            path.write_bytes(corrupt_text(dump(valid), rng))
        else:
            write = dump_escaped if case % 4 == 2 else dump
            path.write_text(write(mutate(valid, rng)), encoding="utf-8", errors="surrogatepass")

    return make_input


def tiny_llm_folder(folder: Path) -> Path:
    torch.manual_seed(0)
    return save_llm(LanguageModel(LLMConfig(vocab_size=300, n_layer=1, n_head=2, n_kv_head=2, d_model=16, d_ff=32,
                                            rotary_pct=0.25, max_seq_len=32)), folder)


def load_and_run(folder: Path) -> None:
    loaded = load_llm(folder)
    loaded(torch.randint(0, loaded.config.vocab_size, (1, 4)))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("fuzz_tok")
    return load_tokenizer(byte_tokenizer_folder(folder, tokenizer_config={"bos_token": "<s>", "eos_token": "</s>",
                                                                         "pad_token": "<pad>"}))


def test_mutated_llava_json(tmp_path: Path, tokenizer) -> None:
    Image.fromarray(np.zeros((6, 6, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    valid = [{"id": "1", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                             {"from": "gpt", "value": "Black."}]},
             {"id": "2", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}]
    path = tmp_path / "data.json"

    def use() -> None:
        for skip_bad in (False, True):
            data = ConversationDataset(path, tokenizer, "vicuna_v1", image_folder=tmp_path, image_size=8,
                                       num_image_tokens=4, max_len=64, skip_bad=skip_bad)
            for i in range(len(data)):
                data[i]

    assert run_cases(mutated_json_file(path, valid), use, seed=1) == []


def test_mutated_model_config(tmp_path: Path) -> None:
    folder = tiny_llm_folder(tmp_path / "llm")
    valid = json.loads((folder / "config.json").read_text())
    assert run_cases(mutated_json_file(folder / "config.json", valid), lambda: load_and_run(folder), seed=2) == []


def test_mutated_nl_benchmark(tmp_path: Path, tokenizer) -> None:
    torch.manual_seed(0)
    model = LanguageModel(LLMConfig(vocab_size=320, n_layer=1, n_head=2, n_kv_head=2, d_model=16, d_ff=32,
                                    rotary_pct=0.25, max_seq_len=64)).eval()
    valid = [{"id": "a", "kind": "multiple_choice", "requests": [["The sky is", " blue"], ["The sky is", " red"]],
              "gold": 0},
             {"id": "b", "kind": "multiple_choice", "requests": [["Two and", " two"], ["Two and", " three"]],
              "gold": 1}]
    path = tmp_path / "task.jsonl"

    def make_input(rng: random.Random, case: int) -> None:
        text = "\n".join(dump(doc) for doc in valid) + "\n"
        if case % 4 == 3:
            path.write_bytes(corrupt_text(text, rng))
        else:
            lines, write = mutate(valid, rng), dump_escaped if case % 4 == 2 else dump
            body = "\n".join(write(doc) for doc in lines) if isinstance(lines, list) else write(lines)
            path.write_text(body + "\n", encoding="utf-8", errors="surrogatepass")

    def use() -> None:
        with torch.no_grad():
            evaluate_nl_suite(model, tokenizer, {"task": path}, max_seq_len=64, batch_size=4)

    assert run_cases(make_input, use, seed=3) == []


def test_mutated_safetensors_index(tmp_path: Path) -> None:
    folder = tiny_llm_folder(tmp_path / "llm")
    keys = sorted(load_file(str(folder / "model.safetensors")))
    (folder / "model.safetensors").rename(folder / "shard.safetensors")
    valid = {"metadata": {"total_size": 1}, "weight_map": {key: "shard.safetensors" for key in keys}}
    index = folder / "model.safetensors.index.json"
    index.write_text(dump(valid))
    load_and_run(folder)  # the unmutated index loads
    assert run_cases(mutated_json_file(index, valid), lambda: load_and_run(folder), seed=4) == []


def test_mutated_tokenizer_config(tmp_path: Path) -> None:
    valid = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "model_max_length": 64}
    folder = byte_tokenizer_folder(tmp_path / "tok", tokenizer_config=valid)

    def use() -> None:
        tok = load_tokenizer(folder)
        tok.decode(tok.encode("Hello there."))

    assert run_cases(mutated_json_file(folder / "tokenizer_config.json", valid), use, seed=5) == []


# Every mode Pillow can make: from a file in a format that keeps it (PNG where it can, else TIFF), or, for the
# modes no format writes (a user cannot hand us such a file, but a caller of preprocess_image can), in memory.
MODES = {"1": "png", "L": "png", "P": "png", "RGB": "png", "RGBA": "png", "LA": "png", "I;16": "png", "I": "tiff",
         "I;16B": "tiff", "F": "tiff", "CMYK": "tiff", "YCbCr": "tiff", "LAB": "tiff", "RGBX": "tiff",
         "HSV": None, "PA": None, "La": None, "RGBa": None}


def test_images_of_every_mode_give_a_tensor_or_one_error(tmp_path: Path) -> None:
    import time

    from mllm_cl.data import load_image, preprocess_image

    rng, outcomes = np.random.default_rng(6), {}
    for mode, ext in MODES.items():
        for trial in range(3):  # values in range; the type's extremes; beyond what the type can mean
            size = (int(rng.integers(1, 40)), int(rng.integers(1, 40)))
            if mode == "F":  # floats in [0, 1], [0, 1] again, then up to 3
                image = Image.fromarray((rng.random(size[::-1]) * (1, 1, 3)[trial]).astype(np.float32), mode="F")
            elif mode.startswith("I"):  # 8-bit values, 16-bit ones, then (mode I only) 20-bit ones
                top = (255, 65535, 2 ** 20 if mode == "I" else 65535)[trial]
                image = Image.fromarray(rng.integers(0, top + 1, size[::-1]).astype(np.int32), mode="I").convert(mode)
            else:
                bands = len(Image.new(mode, (1, 1)).getbands())
                image = Image.frombytes(mode, size, rng.integers(0, 256, size[0] * size[1] * bands,
                                                                 dtype=np.uint8).tobytes())
            name = f"{mode.replace(';', '_')}_{trial}" + (f".{ext}" if ext else "")
            start = time.perf_counter()
            try:
                if ext:
                    image.save(tmp_path / name)
                    pixels = load_image(tmp_path / name, 16)
                else:
                    pixels = preprocess_image(image, 16)
            except UserError as e:
                outcomes[name] = str(e)
            else:
                assert pixels.shape == (3, 16, 16) and bool(torch.isfinite(pixels).all()), name
                outcomes[name] = "read"
            assert time.perf_counter() - start < 5, name
    refused = {name: why for name, why in outcomes.items() if why != "read"}
    assert sorted(refused) == ["F_2.tiff", "I_2.tiff"], refused  # only the values no range can explain
    assert "float pixels outside [0, 1]" in refused["F_2.tiff"] and "beyond 16 bits" in refused["I_2.tiff"]
    assert len(outcomes) == 3 * len(MODES)
