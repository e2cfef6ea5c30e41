"""NL log-likelihood scoring against a one-request-at-a-time brute force; VL answer scoring; bad input files."""

import copy
import json
import math

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from mllm_cl.config import LLMConfig, VisionConfig
from mllm_cl.conversation import get_template, render_prompt
from mllm_cl.data import load_image
from mllm_cl.evaluation_nl import (EvalDataError, LastWordDoc, MultipleChoiceDoc, _hosts, encode_request,
                                   evaluate_nl_documents, read_nl_documents, score_loglikelihood)
from mllm_cl.evaluation_vl import (VLEvalCache, evaluate_vl_examples, extract_choice, generate_answers,
                                   is_correct, normalize_answer, parse_options, read_vl_test_set, stop_ids)
from mllm_cl.llava import LlavaModel
from mllm_cl.llm import LanguageModel
from mllm_cl.projector import build_projector
from mllm_cl.tokenizer import load_tokenizer
from mllm_cl.vision import VisionTower

CORPUS = ["the cat sat on the mat", "a dog ran in the park", "the sun is hot and the moon is cold",
          "birds fly over the green hills", "water boils at one hundred degrees", "she put the book on the shelf",
          "the trophy did not fit in the suitcase because it was too big"] * 3


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CORPUS, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    backend.save(str(path))
    return load_tokenizer(path)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = LLMConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_kv_head=2, d_model=32, d_ff=64,
                       max_seq_len=64, init_std=0.5)  # large init: peaked, distinct predictions
    return LanguageModel(config).eval()


MC_DOCS = [
    # ARC / PIQA style: one context, several continuations (some of one token: they share one forward)
    MultipleChoiceDoc("arc", [("Question: where did the cat sit?\nAnswer:", c) for c in
                              (" on the mat", " in the park", " the", " a")], gold=0),
    # a context ending in spaces: they move to the continuation
    MultipleChoiceDoc("space", [("water boils at ", c) for c in ("one hundred degrees", "cold", "the moon")], 2),
    # WinoGrande style: different contexts, one shared continuation
    MultipleChoiceDoc("wino", [(c, " was too big") for c in ("the trophy did not fit in the suitcase because the "
                                                             "trophy", "the trophy did not fit in the suitcase "
                                                             "because the suitcase")], gold=0),
    # an empty context becomes the prefix token
    MultipleChoiceDoc("empty", [("", " the cat"), ("", " a dog"), ("", " birds fly")], gold=1),
    MultipleChoiceDoc("long", [("she put the book on the shelf " * 3, c) for c in (" hot", " the mat is cold")], 1),
]


def brute_force_encode(tokenizer, context, continuation):
    """lm-eval's `_encode_pair`, written out again."""
    if not context:
        return [tokenizer.bos_id], tokenizer.encode(continuation)
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole = tokenizer.encode(stripped + continuation)
    n = len(tokenizer.encode(stripped))
    return whole[:n], whole[n:]


@torch.no_grad()
def brute_force_score(model, context_ids, continuation_ids, max_seq_len):
    """One request, one unpadded forward, a plain loop over continuation tokens."""
    window = (context_ids + continuation_ids)[-(max_seq_len + 1):][:-1]
    logits = model(input_ids=torch.tensor([window])).logits[0]
    total, greedy = 0.0, True
    for k, token in enumerate(continuation_ids):
        position = len(window) - len(continuation_ids) + k
        row = torch.log_softmax(logits[position].double(), dim=-1)
        total += row[token].item()
        greedy &= int(row.argmax()) == token
    return total, greedy


def brute_force_mc(model, tokenizer, docs, max_seq_len):
    acc = acc_norm = 0
    for doc in docs:
        lls = [brute_force_score(model, *brute_force_encode(tokenizer, c, x), max_seq_len)[0] for c, x in doc.requests]
        norm = [ll / len(x.encode()) for ll, (_, x) in zip(lls, doc.requests)]
        acc += lls.index(max(lls)) == doc.gold
        acc_norm += norm.index(max(norm)) == doc.gold
    return acc / len(docs), acc_norm / len(docs)


def test_encode_request_follows_lm_eval(tokenizer):
    context, continuation = encode_request(tokenizer, "water boils at  ", "one")
    assert context == tokenizer.encode("water boils at")
    assert context + continuation == tokenizer.encode("water boils at  one")
    assert encode_request(tokenizer, "", " the cat") == ([tokenizer.bos_id], tokenizer.encode(" the cat"))


def test_hosts_share_forwards_only_with_extensions():
    inputs = [(1, 2), (1, 2, 3), (1, 2), (1, 3), (2,), (1, 2, 3, 4)]
    host = _hosts(inputs, [True, True, True, True, True, False])
    assert host[0] == host[1] == host[2] == 1  # (1,2) is a prefix of (1,2,3); (1,2,3,4) is not shareable
    assert host[3:] == [3, 4, 5]


@pytest.mark.parametrize("max_seq_len", [64, 9])  # 9: long requests are truncated from the left
def test_multiple_choice_matches_brute_force(model, tokenizer, max_seq_len):
    requests = [brute_force_encode(tokenizer, c, x) for doc in MC_DOCS for c, x in doc.requests]
    assert requests == [encode_request(tokenizer, c, x) for doc in MC_DOCS for c, x in doc.requests]
    scores = score_loglikelihood(model, requests, max_seq_len=max_seq_len, batch_size=4)
    for (ctx, cont), (loglik, greedy) in zip(requests, scores):
        expected, expected_greedy = brute_force_score(model, ctx, cont, max_seq_len)
        assert loglik == pytest.approx(expected, abs=1e-4)
        assert greedy == expected_greedy
    metrics = evaluate_nl_documents(model, tokenizer, MC_DOCS, max_seq_len=max_seq_len, batch_size=4)
    acc, acc_norm = brute_force_mc(model, tokenizer, MC_DOCS, max_seq_len)
    assert metrics == {"acc": pytest.approx(acc), "acc_norm": pytest.approx(acc_norm), "n": len(MC_DOCS)}


def test_batch_size_does_not_change_results(model, tokenizer):
    requests = [encode_request(tokenizer, c, x) for doc in MC_DOCS for c, x in doc.requests]
    runs = [score_loglikelihood(model, requests, max_seq_len=64, batch_size=b) for b in (1, 3, 100)]
    for run in runs[1:]:
        assert [g for _, g in run] == [g for _, g in runs[0]]
        assert [ll for ll, _ in run] == pytest.approx([ll for ll, _ in runs[0]], abs=1e-5)


def test_greedy_flag_against_greedy_decoding(model, tokenizer):
    """A continuation built by greedy decoding is greedy; changing its last token makes it not."""
    context = tokenizer.encode("the sun is hot and")
    ids = list(context)
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    greedy_cont = ids[len(context):]
    other = greedy_cont[:-1] + [(greedy_cont[-1] + 1) % tokenizer.vocab_size]
    scores = score_loglikelihood(model, [(context, greedy_cont), (context, other)], max_seq_len=64)
    assert [greedy for _, greedy in scores] == [True, False]


def test_last_word_matches_brute_force(model, tokenizer):
    docs = [LastWordDoc(str(i), text.rsplit(" ", 1)[0], " " + text.rsplit(" ", 1)[1]) for i, text in
            enumerate(CORPUS[:7])]
    metrics = evaluate_nl_documents(model, tokenizer, docs, max_seq_len=64, batch_size=3)
    total = hits = 0
    for doc in docs:
        context, target = brute_force_encode(tokenizer, doc.context, doc.target)
        ids = list(context)  # greedy decoding, one token at a time
        with torch.no_grad():
            for _ in target:
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        hits += ids[len(context):] == target
        total += brute_force_score(model, context, target, 64)[0]
    assert metrics["acc"] == pytest.approx(hits / len(docs))
    assert metrics["perplexity"] == pytest.approx(math.exp(-total / len(docs)), rel=1e-4)
    assert metrics["n"] == len(docs) and set(metrics) == {"acc", "perplexity", "n"}


def write_lines(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


GOOD_MC = {"id": "q1", "kind": "multiple_choice", "requests": [["Q:", " a"], ["Q:", " b"]], "gold": 1}


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not valid JSON"),
    ({"id": "q2", "kind": "multiple_choice", "requests": [["Q:", " a"], ["Q:", " b"]]}, "missing key(s) ['gold']"),
    ({**GOOD_MC, "id": "q2", "gold": 2}, "'gold' must be an integer in [0, 1]"),
    ({**GOOD_MC, "id": "q2", "gold": True}, "'gold' must be an integer"),
    ({**GOOD_MC, "id": "q2", "requests": [["Q:", 3], ["Q:", " b"]]}, "requests[0] must be a [context, continuation]"),
    ({**GOOD_MC, "id": "q2", "kind": "essay"}, "'kind' must be"),
    ({**GOOD_MC}, "id 'q1' already used on line 1"),
    ({"id": "q2", "kind": "last_word", "context": "a", "target": " b"}, "documents of different kinds"),
])
def test_malformed_request_file_names_file_and_line(tmp_path, bad, message):
    path = write_lines(tmp_path / "task.jsonl", [GOOD_MC, "", bad])
    with pytest.raises(EvalDataError) as error:
        read_nl_documents(path)
    assert str(path) in str(error.value) and "line 3" in str(error.value) and message in str(error.value)


def test_read_request_file_and_limit(tmp_path):
    lines = [{**GOOD_MC, "id": f"q{i}", "gold": i % 2} for i in range(5)]
    path = write_lines(tmp_path / "task.jsonl", lines)
    docs = read_nl_documents(path, limit=3)
    assert [d.id for d in docs] == ["q0", "q1", "q2"] and docs[1].gold == 1
    assert docs[0].requests == [("Q:", " a"), ("Q:", " b")]


@pytest.mark.parametrize("text, expected", [
    ("Yes.", "yes"), ("The Two red cubes!", "2 red cubes"), ("  an   apple ", "apple"), ("1,000", "1000"),
    ("3.5 meters", "3.5 meters"), ("t-shirt", "t shirt"), ("None", "0"), ("Three", "3"), ("A", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


QUESTION = "<image>\nWhat colour is the shape?\nA. red\nB. dark blue\n(C) green\nAnswer with the option's letter."


@pytest.mark.parametrize("answer, letter", [
    ("A", "A"), ("(B)", "B"), ("C.", "C"), ("B) dark blue", "B"), ("The answer is C", "C"), ("Answer: (A)", "A"),
    ("dark blue", "B"), ("Green.", "C"), ("A red car", None), ("D", None), ("purple", None),
])
def test_extract_choice(answer, letter):
    options = parse_options(QUESTION)
    assert options == {"A": "red", "B": "dark blue", "C": "green"}
    assert extract_choice(answer, options) == letter


def test_is_correct_open_and_multiple_choice():
    assert is_correct("Two.", "2", "<image>\nHow many circles?")
    assert not is_correct("3", "2", "<image>\nHow many circles?")
    assert parse_options("How many?\nI. think\nno options here") == {}
    assert is_correct("The answer is B", "B", QUESTION) and is_correct("dark blue", "(B)", QUESTION)
    assert not is_correct("A", "dark blue", QUESTION)
    with pytest.raises(EvalDataError, match="names none of the options"):
        is_correct("A", "purple", QUESTION)


def test_vl_test_set_needs_an_answer(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    good = {"id": "1", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ?"},
                                                           {"from": "gpt", "value": "red"}]}
    path = tmp_path / "test.json"
    path.write_text(json.dumps([good]))
    (example,) = read_vl_test_set(path, tmp_path)
    assert example.answer == "red" and example.question == "<image>\nQ?" and example.image == tmp_path / "a.png"
    path.write_text(json.dumps([good, {"id": "x7", "image": "a.png", "conversations": good["conversations"][:1]}]))
    with pytest.raises(EvalDataError, match=r"test.json: entry 1 \(id 'x7'\): .*gpt answer.*gold answer"):
        read_vl_test_set(path, tmp_path)
    choice = {"id": "c1", "image": "a.png", "conversations": [{"from": "human", "value": QUESTION},
                                                              {"from": "gpt", "value": "pink"}]}
    path.write_text(json.dumps([good, choice]))
    with pytest.raises(EvalDataError, match=r"entry 1 \(id 'c1'\): the question lists options .* names none"):
        read_vl_test_set(path, tmp_path)


@pytest.fixture(scope="module")
def llava(tokenizer):
    torch.manual_seed(1)
    vision = VisionTower(VisionConfig(image_size=16, patch_size=8, d_model=32, n_layer=2, n_head=2, d_ff=64))
    llm = LanguageModel(LLMConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_kv_head=2, d_model=32,
                                  d_ff=64, max_seq_len=512, init_std=0.5))
    return LlavaModel(vision, build_projector("mlp2x_gelu", 32, 32), llm).eval()


def test_vl_batched_generation_matches_one_at_a_time(llava, tokenizer, tmp_path):
    for name, colour in (("red.png", (255, 0, 0)), ("blue.png", (0, 0, 255))):
        Image.new("RGB", (20, 12), colour).save(tmp_path / name)
    entries = [
        {"id": "a", "image": "red.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                          {"from": "gpt", "value": "red"}]},
        {"id": "b", "conversations": [{"from": "human", "value": "Which animal is it?\nA. cat\nB. dog"},
                                      {"from": "gpt", "value": "B"}]},
        {"id": "c", "image": "blue.png", "conversations": [{"from": "human", "value": "Is the big shape blue?"},
                                                           {"from": "gpt", "value": "yes"}]},
    ]
    (tmp_path / "test.json").write_text(json.dumps(entries))
    examples = read_vl_test_set(tmp_path / "test.json", tmp_path)
    assert examples[2].question.startswith("<image>\n")  # LLaVA's fix-up: an image with no <image> goes first

    stops = stop_ids(tokenizer, get_template("pythia"))
    expected = []
    with torch.no_grad():
        for ex in examples:  # one example at a time, no KV cache: re-run the whole sequence for every token
            ids = render_prompt(tokenizer, ex.messages, "pythia", llava.num_image_tokens)
            pixels = load_image(ex.image, 16)[None] if ex.image is not None else None
            new = []
            while len(new) < 6 and not (new and new[-1] in stops):
                logits = llava(torch.tensor([ids + new]), pixel_values=pixels).logits
                new.append(int(logits[0, -1].argmax()))
            expected.append(tokenizer.decode([t for t in new if t not in stops]).strip())
    answers = generate_answers(llava, tokenizer, examples, template="pythia", batch_size=2, max_new_tokens=6)
    assert answers == expected

    examples[0].answer = expected[0] or "red"  # one gold answer the model does give: accuracy is not always 0
    metrics = evaluate_vl_examples(llava, tokenizer, examples, template="pythia", batch_size=3, max_new_tokens=6)
    assert metrics == {"acc": pytest.approx(sum(is_correct(a, ex.answer, ex.question) for a, ex in
                                                zip(expected, examples)) / 3), "n": 3}


def test_vl_cache_reuses_tower_features_and_drops_them_when_the_tower_changes(llava, tokenizer, tmp_path):
    colours = [(255, 0, 0), (0, 0, 255), (0, 200, 0), (90, 90, 90), (250, 250, 0)]
    entries = []
    for i, colour in enumerate(colours):
        Image.new("RGB", (16, 16), colour).save(tmp_path / f"{i}.png")
        entries.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour" + "?" * i}, {"from": "gpt", "value": "red"}]})
    (tmp_path / "test.json").write_text(json.dumps(entries))
    model = copy.deepcopy(llava)
    examples = read_vl_test_set(tmp_path / "test.json", tmp_path)
    plain = generate_answers(model, tokenizer, examples, template="pythia", batch_size=2, max_new_tokens=4)
    cache = VLEvalCache()
    assert cache.test_set(tmp_path / "test.json", tmp_path) is cache.test_set(tmp_path / "test.json", tmp_path)
    encoded = []
    model.vision.register_forward_hook(lambda module, args, out: encoded.append(args[0].shape[0]))
    for _ in range(2):
        assert generate_answers(model, tokenizer, examples, template="pythia", batch_size=2, max_new_tokens=4,
                                cache=cache) == plain
    assert encoded == [2, 2, 1]  # every image encoded once, by the first pass

    with torch.no_grad():  # a changed tower (in place): its old features must not be used
        for parameter in model.vision.parameters():
            parameter.mul_(1.5)
    changed = generate_answers(model, tokenizer, examples, template="pythia", batch_size=2, max_new_tokens=4)
    assert generate_answers(model, tokenizer, examples, template="pythia", batch_size=2, max_new_tokens=4,
                            cache=cache) == changed
    assert encoded == [2, 2, 1, 2, 2, 1, 2, 2, 1]  # the uncached pass, then the cache's fresh encoding

    small = VLEvalCache(max_bytes=1)  # nothing fits: every pass encodes, and still answers the same
    assert generate_answers(model, tokenizer, examples, template="pythia", batch_size=2, max_new_tokens=4,
                            cache=small) == changed
