"""The synthetic world generator: deterministic, balanced, disjoint splits, well-formed files, usable tokenizer."""

import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from tokenizers import Tokenizer

from mllm_cl.conversation import TEMPLATES
from mllm_cl.synthetic import IMAGE_PREFIX, TASKS, build_world
from mllm_cl.synthetic.images import radius
from mllm_cl.synthetic.text import FACT_TEMPLATES
from mllm_cl.synthetic.world import GENERAL_VL, apart


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world") / "synthetic"
    build_world(out, seed=0, size="smoke")
    return out


def read_json(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_another_seed_differs(world: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    build_world(again, seed=0, size="smoke")
    assert all_files(again) == all_files(world)
    other = tmp_path / "other"
    build_world(other, seed=1, size="smoke")
    a, b = all_files(world), all_files(other)
    for name in ("text/train.txt", "nl/facts_mc.jsonl", "tasks/color/train.json", "images/000000.png"):
        assert a[name] != b[name], name


def test_manifest_lists_every_file_with_its_hash(world: Path) -> None:
    manifest = read_json(world / "world.json")
    assert manifest["tasks"] == list(TASKS) and len(TASKS) >= 4
    listed = set(manifest["files"]) | {"world.json"}
    on_disk = {p for p in all_files(world) if not p.startswith("images/")}
    assert listed == on_disk
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((world / name).read_bytes()).hexdigest() == digest
    assert manifest["images"]["count"] == len(list((world / "images").iterdir()))


def check_record(record: dict, world: Path, *, image: bool, answered: bool) -> None:
    assert isinstance(record["id"], str) and record["id"]
    turns = record["conversations"]
    assert [t["from"] for t in turns] == (["human", "gpt"] if answered else ["human"])
    assert all(isinstance(t["value"], str) for t in turns)
    if image:
        assert re.fullmatch(r"images/\d{6}\.png", record["image"]) and (world / record["image"]).is_file()
        assert turns[0]["value"].startswith(IMAGE_PREFIX) and turns[0]["value"].count("<image>") == 1
    else:
        assert "image" not in record and "<image>" not in turns[0]["value"]
    if answered:
        assert turns[1]["value"].strip() and "<image>" not in turns[1]["value"]


def test_llava_files_are_well_formed(world: Path) -> None:
    ids = []
    for record in read_json(world / "align.json"):
        check_record(record, world, image=True, answered=True)
        assert record["conversations"][0]["value"] == IMAGE_PREFIX
        ids.append(record["id"])
    for record in read_json(world / "inquiries.json"):
        check_record(record, world, image=False, answered=False)
        assert record["conversations"][0]["value"].rstrip().endswith((".", "?", "choices."))
        ids.append(record["id"])
    for task in TASKS:
        for split in ("train", "test"):
            for record in read_json(world / f"tasks/{task}/{split}.json"):
                check_record(record, world, image=True, answered=True)
                ids.append(record["id"])
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("task", list(TASKS))
def test_answers_are_balanced_and_test_images_are_new(world: Path, task: str) -> None:
    classes = TASKS[task][0]
    splits = {s: read_json(world / f"tasks/{task}/{s}.json") for s in ("train", "test")}
    for split, records in splits.items():
        counts = Counter(r["conversations"][1]["value"] for r in records)
        assert set(counts) == set(classes), (split, counts)
        assert max(counts.values()) / len(records) <= 1 / len(classes) + 0.05, (split, counts)
    pixels = {s: {Image.open(world / r["image"]).tobytes() for r in rs} for s, rs in splits.items()}
    assert len(pixels["train"]) == len(splits["train"]) and len(pixels["test"]) == len(splits["test"])
    assert not pixels["train"] & pixels["test"]


def test_choice_questions_list_the_answer_under_the_gold_letter(world: Path) -> None:
    for record in read_json(world / "tasks/choice/train.json"):
        question, letter = record["conversations"][0]["value"], record["conversations"][1]["value"]
        options = dict(re.findall(r"^([ABCD])\. (\w+)$", question, flags=re.M))
        assert sorted(options) == ["A", "B", "C", "D"] and len(set(options.values())) == 4
        assert letter in options


def test_images_are_64x64_rgb(world: Path) -> None:
    for path in sorted((world / "images").iterdir())[::7]:
        with Image.open(path) as image:
            assert image.size == (64, 64) and image.mode == "RGB"


def test_nl_benchmarks_follow_the_contract_and_agree_with_the_facts(world: Path) -> None:
    entities = {e["name"]: e for e in read_json(world / "text/entities.json")}
    facts_mc = read_jsonl(world / "nl/facts_mc.jsonl")
    for doc in facts_mc:
        assert set(doc) == {"id", "kind", "requests", "gold"} and doc["kind"] == "multiple_choice"
        contexts = {c for c, _ in doc["requests"]}
        continuations = [t for _, t in doc["requests"]]
        assert len(doc["requests"]) == 4 and len(contexts) == 1 and len(set(continuations)) == 4
        assert all(t.startswith(" ") and not t.startswith("  ") for t in continuations)
        context = contexts.pop()
        name = next(n for n in entities if n in context)
        assert continuations[doc["gold"]].strip() in entities[name].values()
    gold = Counter(d["gold"] for d in facts_mc)
    assert set(gold) == {0, 1, 2, 3} and max(gold.values()) - min(gold.values()) <= 1
    train = (world / "text/train.txt").read_text(encoding="utf-8")
    for doc in read_jsonl(world / "nl/last_word.jsonl"):
        assert set(doc) == {"id", "kind", "context", "target"} and doc["kind"] == "last_word"
        assert re.fullmatch(r" \w+", doc["target"]) and doc["target"] in doc["context"]
        assert doc["context"] + doc["target"] not in train  # the exact passage is never trained on


def test_corpus_is_one_document_per_paragraph_and_heldout_is_unseen(world: Path) -> None:
    train = (world / "text/train.txt").read_text(encoding="utf-8").split("\n\n")[:-1]
    heldout = (world / "text/heldout.txt").read_text(encoding="utf-8").split("\n\n")[:-1]
    assert all("\n" not in d for d in train + heldout)
    assert len(train) == 300 and len(heldout) == 40 and all(train) and all(heldout)
    assert not set(train) & set(heldout)


def test_tokenizer_round_trips_the_world_and_has_the_special_ids(world: Path) -> None:
    tokenizer = Tokenizer.from_file(str(world / "tokenizer.json"))
    assert tokenizer.token_to_id("<|endoftext|>") == 0 and tokenizer.token_to_id("<|padding|>") == 1
    assert tokenizer.get_vocab_size() <= 1024
    texts = (world / "text/heldout.txt").read_text(encoding="utf-8").split("\n\n")[:-1]
    texts += [t["value"] for r in read_json(world / "tasks/choice/test.json") for t in r["conversations"]]
    texts += ["USER: What colour is the circle? ASSISTANT: red", "Ünïcode and\ttabs\n"]
    for text in texts:
        ids = tokenizer.encode(text).ids
        assert 0 not in ids and 1 not in ids and tokenizer.decode(ids) == text
    assert len(tokenizer.encode(" red").ids) == 1 and len(tokenizer.encode(" ASSISTANT:").ids) <= 2
    system = TEMPLATES["pythia"].system  # the demo's chat format is in the tokenizer's training text
    assert len(tokenizer.encode(system).ids) <= len(system.split()) + 5
    config = read_json(world / "tokenizer_config.json")
    names = read_json(world / "special_tokens_map.json")
    for file in (config, names):
        assert file["bos_token"] == file["eos_token"] == "<|endoftext|>" and file["pad_token"] == "<|padding|>"


def test_refuses_to_overwrite_a_folder_that_is_not_a_world(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        build_world(tmp_path, seed=0, size="smoke")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_text_inquiries_are_unanswered_questions_about_the_text_world(world: Path) -> None:
    inquiries = read_json(world / "text_inquiries.json")
    names = {e["name"] for e in read_json(world / "text/entities.json")}
    assert len(inquiries) == read_json(world / "world.json")["sizes"]["inquiries"]
    for record in inquiries:
        assert "image" not in record and len(record["conversations"]) == 1, record  # no image, no answer
        question = record["conversations"][0]["value"]
        assert question.endswith("?") and IMAGE_PREFIX not in question
        assert any(name in question for name in names), question
    nl = " ".join(c for d in read_jsonl(world / "nl/facts_mc.jsonl") for c, _ in d["requests"])
    assert not any(r["conversations"][0]["value"] in nl for r in inquiries)  # not the NL benchmarks' text


def test_big_color_asks_the_colour_of_the_one_big_shape() -> None:
    _, make = TASKS["big_color"]
    rng = random.Random(0)
    for answer in ("red", "blue", "yellow") * 20:
        scene, question = make(answer, rng)
        big, small = sorted(scene, key=lambda s: -radius(s.size))
        assert (big.size, small.size) == ("big", "small") and big.colour == answer != small.colour
        assert apart(big, small) and "big" in question


def test_the_text_world_states_ages_in_digits(world: Path) -> None:
    # Count's answers are digits: the LLM's language pre-training must have used them.
    entities = read_json(world / "text/entities.json")
    train = (world / "text/train.txt").read_text(encoding="utf-8")
    assert {e["age"] for e in entities} <= set("123456") and len({e["age"] for e in entities}) > 1
    assert all(any(template.format(**e) in train for template in FACT_TEMPLATES["age"]) for e in entities)


def corpus_words(world: Path) -> set[str]:
    return set(re.findall(r"[\w']+", (world / "text/train.txt").read_text(encoding="utf-8").lower()))


def test_every_answer_word_of_the_general_mix_and_the_continual_tasks_is_in_the_corpus(world: Path) -> None:
    # An answer the LLM never read is not learned in a few steps (docs/world.md): every word the general mix
    # answers with, and every answer of a task an experiment config runs, must be in its language pre-training.
    words = corpus_words(world)
    for record in read_json(world / "general/train.json"):
        answer = record["conversations"][-1]["value"]
        assert set(re.findall(r"[\w']+", answer.lower())) <= words, (record["id"], answer)
    configs = Path(__file__).resolve().parents[1] / "configs/experiments"
    used = {task for path in configs.glob("*.json") for task in read_json(path).get("world_tasks", [])}
    assert used >= {"color", "big_color", "size"}
    for task in used:
        for answer in TASKS[task][0]:
            assert set(answer.lower().split()) <= words, (task, answer)


def test_the_general_mix_has_a_balanced_test_per_skill_on_new_pictures(world: Path) -> None:
    manifest = read_json(world / "world.json")
    skills = manifest["general_skills"]
    assert skills == list(GENERAL_VL) and len(skills) >= 2
    train = read_json(world / "general/train.json")
    train_pixels = {Image.open(world / r["image"]).tobytes() for r in train if "image" in r}
    parts = Counter(r["id"].rsplit("-", 1)[0] for r in train)
    assert set(parts) == {f"general-{s}" for s in skills} | {"general-text", "general-document"}
    assert max(parts.values()) - min(parts.values()) <= len(parts)  # equal parts
    for skill in skills:
        test = read_json(world / f"general/{skill}/test.json")
        summary = manifest["summary"]["general"]["skills"][skill]
        assert len(test) == manifest["sizes"]["general_test"] == summary["count"]
        counts = Counter(r["conversations"][-1]["value"] for r in test)
        assert set(counts) <= set(GENERAL_VL[skill][0]) and max(counts.values()) - min(counts.values()) <= 1
        assert not {Image.open(world / r["image"]).tobytes() for r in test} & train_pixels
    # the text part answers with the corpus's own sentences and documents, never a last-word benchmark's story
    stories = [d["context"] for d in read_jsonl(world / "nl/last_word.jsonl")]
    for record in train:
        if "image" not in record:
            answer = record["conversations"][-1]["value"]
            assert answer.endswith(".") and not any(story in answer for story in stories), record["id"]


def test_the_general_mix_asks_in_formats_no_continual_task_uses() -> None:
    # Two-word answers, never one colour or size word: the tasks' format stays new to the instruction-tuned model.
    task_answers = {answer for classes, _ in TASKS.values() for answer in classes}
    rng = random.Random(0)
    for skill, (classes, make) in GENERAL_VL.items():
        assert not set(classes) & task_answers and all(len(c.split()) == 2 for c in classes), skill
        for answer in classes[:6]:
            scene, question = make(answer, rng)
            shapes = sorted(scene, key=lambda s: -radius(s.size))
            if skill == "describe":
                assert [f"{s.size} {s.colour}" for s in shapes] == [answer]
            else:
                assert [s.colour for s in shapes] == answer.split() and [s.size for s in shapes] == ["big", "small"]
                assert apart(*shapes)
