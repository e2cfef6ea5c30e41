"""Seeded random mutations of three valid inputs (a LLaVA JSON file, a model folder's config.json, an NL
benchmark JSONL file): every case must end in a correct run or a clear error (`UserError`), never a traceback
from deep inside Python, torch or a parser."""

import copy
import json
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image
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

    def make_input(rng: random.Random, case: int) -> None:
        if case % 4 == 3:
            path.write_bytes(corrupt_text(dump(valid), rng))
        else:
            write = dump_escaped if case % 4 == 2 else dump
            path.write_text(write(mutate(valid, rng)), encoding="utf-8", errors="surrogatepass")

    def use() -> None:
        for skip_bad in (False, True):
            data = ConversationDataset(path, tokenizer, "vicuna_v1", image_folder=tmp_path, image_size=8,
                                       num_image_tokens=4, max_len=64, skip_bad=skip_bad)
            for i in range(len(data)):
                data[i]

    assert run_cases(make_input, use, seed=1) == []


def test_mutated_model_config(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = LanguageModel(LLMConfig(vocab_size=300, n_layer=1, n_head=2, n_kv_head=2, d_model=16, d_ff=32,
                                    rotary_pct=0.25, max_seq_len=32))
    folder = save_llm(model, tmp_path / "llm")
    valid = json.loads((folder / "config.json").read_text())

    def make_input(rng: random.Random, case: int) -> None:
        if case % 4 == 3:
            (folder / "config.json").write_bytes(corrupt_text(dump(valid), rng))
        else:
            write = dump_escaped if case % 4 == 2 else dump
            (folder / "config.json").write_text(write(mutate(valid, rng)), encoding="utf-8", errors="surrogatepass")

    def use() -> None:
        loaded = load_llm(folder)
        loaded(torch.randint(0, loaded.config.vocab_size, (1, 4)))

    assert run_cases(make_input, use, seed=2) == []


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
