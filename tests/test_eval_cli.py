"""eval.py end to end: a tiny saved LLM and tiny NL task files, run in a subprocess, checked through --json."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from mllm_cl.config import LLMConfig, VisionConfig
from mllm_cl.evaluation import NL_PATTERN, VL_PATTERN, EvalDataError, find_tasks, vl_image_folder
from mllm_cl.evaluation_nl import evaluate_nl_documents, read_nl_documents
from mllm_cl.llava import LlavaModel, save_llava
from mllm_cl.llm import LanguageModel
from mllm_cl.projector import build_projector
from mllm_cl.tokenizer import load_tokenizer
from mllm_cl.vision import VisionTower
from mllm_cl.weights import load_llm, save_llm

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("eval_cli", ROOT / "eval.py")
eval_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eval_cli)
TEXT = ["the red fox eats the small mouse", "the blue bird sings in the tall tree", "a green frog sits on a log"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(TEXT * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    (root / "tok").mkdir()
    backend.save(str(root / "tok" / "tokenizer.json"))
    torch.manual_seed(0)
    config = LLMConfig(vocab_size=backend.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2, d_model=32, d_ff=64,
                       max_seq_len=32, init_std=0.5)
    save_llm(LanguageModel(config), root / "model", tokenizer_from=root / "tok")

    nl = root / "nl"
    nl.mkdir()
    animals = ["fox", "bird", "frog", "mouse", "tree"]
    with (nl / "facts_mc.jsonl").open("w") as f:
        for i in range(6):
            choices = [" " + a for a in animals[i % 3:i % 3 + 3]]
            f.write(json.dumps({"id": f"mc{i}", "kind": "multiple_choice",
                                "requests": [[f"Question {i}: which animal is red? Answer:", c] for c in choices],
                                "gold": i % 3}) + "\n")
    with (nl / "last_word.jsonl").open("w") as f:
        for i, line in enumerate(TEXT * 2):
            context, word = line.rsplit(" ", 1)
            f.write(json.dumps({"id": f"lw{i}", "kind": "last_word", "context": context, "target": " " + word}) + "\n")
    return root


def run_eval(*args):
    return subprocess.run([sys.executable, str(ROOT / "eval.py"), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_eval_cli_nl_suite_writes_json(world, tmp_path):
    out = tmp_path / "results.json"
    proc = run_eval(world / "model", "--suite", "nl", "--nl-dir", world / "nl", "--limit", "4", "--batch-size", "3",
                    "--device", "cpu", "--json", out)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert set(results) == {"facts_mc", "last_word"}
    assert set(results["facts_mc"]) == {"acc", "acc_norm", "n"} and results["facts_mc"]["n"] == 4
    assert set(results["last_word"]) == {"acc", "perplexity", "n"} and results["last_word"]["n"] == 4
    model, tokenizer = load_llm(world / "model").eval(), load_tokenizer(world / "model")
    for task, metrics in results.items():
        docs = read_nl_documents(world / "nl" / f"{task}.jsonl", limit=4)
        expected = evaluate_nl_documents(model, tokenizer, docs, max_seq_len=32, batch_size=1)
        assert metrics == pytest.approx(expected)
        assert 0.0 <= metrics["acc"] <= 1.0
    assert "facts_mc" in proc.stdout and "examples/s" in proc.stdout


def test_eval_cli_named_task_and_errors(world, tmp_path, capsys):
    """The same entry point in-process (a subprocess per case would spend its time importing torch)."""
    out = tmp_path / "one.json"
    assert eval_cli.main([str(world / "model"), "--suite", "all", "--tasks", "last_word", "--nl-dir",
                          str(world / "nl"), "--json", str(out)]) == 0
    assert list(json.loads(out.read_text())) == ["last_word"] and json.loads(out.read_text())["last_word"]["n"] == 6
    assert "VL suite skipped" in capsys.readouterr().out

    assert eval_cli.main([str(world / "model"), "--suite", "nl", "--tasks", "nope", "--nl-dir", str(world / "nl")]) == 2
    assert "task 'nope'" in capsys.readouterr().err

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.jsonl").write_text('{"id": "a", "kind": "last_word", "context": "x", "target": " y"}\n{oops\n')
    assert eval_cli.main([str(world / "model"), "--suite", "nl", "--nl-dir", str(bad)]) == 2
    assert f"{bad / 'broken.jsonl'}, line 2" in capsys.readouterr().err

    assert eval_cli.main([str(world / "model"), "--suite", "vl"]) == 2
    assert "needs a LLaVA folder" in capsys.readouterr().err


def test_find_tasks_first_folder_wins(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for path in (a / "x.jsonl", b / "x.jsonl", b / "y.jsonl", b / "tasks/color/test.json", b / "tasks/count/test.json"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    assert find_tasks([a, b], NL_PATTERN) == {"x": a / "x.jsonl", "y": b / "y.jsonl"}
    assert find_tasks([a, b], NL_PATTERN, ["y"]) == {"y": b / "y.jsonl"}
    vl = find_tasks([a, b], VL_PATTERN)
    assert vl == {"color": b / "tasks/color/test.json", "count": b / "tasks/count/test.json"}
    assert vl_image_folder(vl["color"]) == b
    with pytest.raises(EvalDataError, match="task 'z'"):
        find_tasks([a, b], NL_PATTERN, ["z"])
    with pytest.raises(EvalDataError, match="run `make data`"):
        find_tasks([tmp_path / "empty"], NL_PATTERN)


def test_eval_cli_llava_folder_runs_both_suites(world, tmp_path):
    torch.manual_seed(0)
    tokenizer = load_tokenizer(world / "tok")
    vision = VisionTower(VisionConfig(image_size=16, patch_size=8, d_model=32, n_layer=2, n_head=2, d_ff=64))
    llm = LanguageModel(LLMConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_kv_head=2, d_model=32,
                                  d_ff=64, max_seq_len=512))
    save_llava(LlavaModel(vision, build_projector("linear", 32, 32), llm), tmp_path / "llava",
               tokenizer_from=world / "tok")
    vl = tmp_path / "vl"
    (vl / "images").mkdir(parents=True)
    (vl / "tasks/colour").mkdir(parents=True)
    records = []
    for i, (name, colour) in enumerate([("red", (255, 0, 0)), ("blue", (0, 0, 255)), ("green", (0, 255, 0))]):
        Image.new("RGB", (16, 16), colour).save(vl / f"images/{i}.png")
        records.append({"id": str(i), "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": name}]})
    (vl / "tasks/colour/test.json").write_text(json.dumps(records))
    out = tmp_path / "all.json"
    assert eval_cli.main([str(tmp_path / "llava"), "--suite", "all", "--nl-dir", str(world / "nl"), "--vl-dir", str(vl),
                          "--limit", "2", "--max-new-tokens", "4", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results) == {"facts_mc", "last_word", "colour"}
    assert set(results["colour"]) == {"acc", "n"} and results["colour"]["n"] == 2


def test_eval_cli_report(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"methods": {"naive": {"nl_delta": 7.83, "vl_hmean": 5.29},
                                                              "soft_targets": {"nl_delta": 2.83, "vl_hmean": 10.57}}}))
    assert eval_cli.main(["--report", str(run), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "REPORT.md").read_text()
    assert "soft_targets" in text and "7.83" in text
    assert eval_cli.main(["--report", str(tmp_path / "missing")]) == 2
    assert "results.json" in capsys.readouterr().err
