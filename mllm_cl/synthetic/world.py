"""The synthetic world: everything `make demo` trains and evaluates on, generated offline and deterministically.

    python data/synthetic_world.py --out data/synthetic --seed 0 [--size smoke|small|demo]

writes a text corpus and NL benchmarks (task 1, the LLM's language pre-training; see text.py),
64x64 images with alignment captions, VL instruction tasks in LLaVA JSON, text-only inquiries for UIR
(LLaVA-c: the VL tasks' questions without their images in inquiries.json, general questions about the text
world in text_inquiries.json), a byte-level BPE tokenizer trained on the world's text, and `world.json`, a
manifest of the lot.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mllm_cl.conversation import TEMPLATES
from mllm_cl.synthetic import text
from mllm_cl.synthetic.images import COLOURS, SHAPES, SIZES, Shape, Word, radius, render

# How much of everything each size makes. `demo` is what `make demo` runs on.
WORLD_VERSION = 7  # bumped whenever the same seed and size would draw a different world
WORLD_SIZES: dict[str, dict[str, int]] = {
    "smoke": dict(entities=8, documents=300, heldout=40, facts_mc=40, last_word=40, train=40, test=20,
                  align=40, inquiries=30, general=60, general_test=10),
    "small": dict(entities=20, documents=2000, heldout=150, facts_mc=120, last_word=100, train=500, test=100,
                  align=600, inquiries=200, general=900, general_test=100),
    "demo": dict(entities=40, documents=6000, heldout=300, facts_mc=240, last_word=200, train=1500, test=200,
                 align=2000, inquiries=500, general=1500, general_test=100),
    # `make experiment`: tasks of a size one epoch at paper 1's schedule can learn (the demo's, 4x the training data)
    "experiment": dict(entities=40, documents=6000, heldout=300, facts_mc=240, last_word=200, train=6000, test=500,
                       align=4000, inquiries=2000, general=12000, general_test=250),
}
READ_WORDS = ("sun", "cat", "box", "map", "cup", "pen", "hat", "key")
COUNTS = ("1", "2", "3", "4", "5")
LETTERS = ("A", "B", "C", "D")
RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
SPECIAL_TOKENS = ("<|endoftext|>", "<|padding|>")  # ids 0 (bos = eos) and 1 (pad), as in Pythia
CHAT_TEMPLATE = TEMPLATES["pythia"]  # the demo LLM's chat format: its words belong in the tokenizer too
IMAGE_PREFIX = "<image>\n"  # how LLaVA JSON marks where the image goes

Scene = list[Shape | Word]


# ----------------------------------------------------------------------------- scene layout helpers

def random_shape(rng: random.Random, kind: str | None = None, colour: str | None = None,
                 size: str | None = None) -> Shape:
    """A shape at a random position that keeps it inside the image."""
    kind = kind or rng.choice(SHAPES)
    colour = colour or rng.choice(list(COLOURS))
    size = size or rng.choice(list(SIZES))
    margin = radius(size) + 0.03
    return Shape(kind, colour, size, rng.uniform(margin, 1 - margin), rng.uniform(margin, 1 - margin))


def apart(a: Shape, b: Shape) -> bool:
    return ((a.x - b.x) ** 2 + (a.y - b.y) ** 2) ** 0.5 > radius(a.size) + radius(b.size) + 0.05


def other_than(values: Iterable[str], exclude: str, rng: random.Random) -> str:
    return rng.choice([v for v in values if v != exclude])


# ----------------------------------------------------------------------------- the VL tasks
# Each task function gets the answer it must produce and returns (scene, question); the caller balances
# the answers. Every task has its own instruction style.

def color_task(answer: str, rng: random.Random) -> tuple[Scene, str]:
    """What colour is the shape? One shape of any kind and size. (A second shape, telling the two apart by kind,
    asked for what the tiny tower's tokens carry weakly: its kind probe scores 30-40%; big_color binds the colour
    to the size instead.)"""
    target = random_shape(rng, colour=answer)
    return [target], f"What colour is the {target.kind}? Answer with one word."


def grid_shapes(n: int, rng: random.Random) -> Scene:
    """`n` small shapes of any kind and colour in distinct cells of a 3x3 grid."""
    return [Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), "small",
                  (c % 3 + 0.5) / 3 + rng.uniform(-0.05, 0.05), (c // 3 + 0.5) / 3 + rng.uniform(-0.05, 0.05))
            for c in rng.sample(range(9), n)]


def count_task(answer: str, rng: random.Random) -> tuple[Scene, str]:
    """How many shapes? Small shapes spread over a grid.

    Not learnable at demo size: the tiny tower's tokens carry count at about 50% even to a logistic or MLP probe
    fitted on 1,600 scenes, whatever its captions say (README, "Why these three tasks")."""
    return grid_shapes(int(answer), rng), rng.choice(("How many shapes are in the image? Answer with a number.",
                                                      "Count the shapes in the picture. Answer with a number."))


def big_color_task(answer: str, rng: random.Random) -> tuple[Scene, str]:
    """What colour is the big shape? A big and a small shape of different colours: the colour must be bound to
    the shape that is big, whatever its kind."""
    big = random_shape(rng, colour=answer, size="big")
    small = random_shape(rng, colour=other_than(COLOURS, answer, rng), size="small")
    while not apart(big, small):
        small = random_shape(rng, kind=small.kind, colour=small.colour, size="small")
    scene: Scene = [big, small]
    rng.shuffle(scene)
    return scene, rng.choice(("What colour is the big shape? Answer with one word.",
                              "Which colour does the bigger shape have? Answer with one word."))


def size_task(answer: str, rng: random.Random) -> tuple[Scene, str]:
    """Is the shape big or small? One shape of any kind and colour, anywhere."""
    shape = random_shape(rng, size=answer)
    return [shape], f"Is the {shape.kind} big or small? Answer with one word."


def spatial_pair(relation: str, rng: random.Random) -> tuple[Shape, Shape]:
    """Two small shapes of different kinds and colours, the first `relation` (left/right/above/below) of the
    second, both on one row or one column so the relation is unambiguous."""
    first = random_shape(rng, size="small")
    second = random_shape(rng, kind=other_than(SHAPES, first.kind, rng), colour=other_than(COLOURS, first.colour, rng),
                          size="small")
    near, far = rng.uniform(0.15, 0.4), rng.uniform(0.6, 0.85)
    a, b = (near, far) if relation in ("left", "above") else (far, near)
    across = rng.uniform(0.2, 0.8)
    if relation in ("left", "right"):
        return replace(first, x=a, y=across), replace(second, x=b, y=across)
    return replace(first, x=across, y=a), replace(second, x=across, y=b)


def spatial_task(answer: str, rng: random.Random) -> tuple[Scene, str]:
    """Is X left of / right of / above / below Y? Asks the true relation or its opposite; yes or no.

    Not learnable at demo size: it needs where a shape is, which the tiny tower's tokens keep only in their slot
    (README, "Why these three tasks"); naive fine-tuning stayed at chance after 150 steps."""
    relation = rng.choice(list(RELATIONS))
    first, second = spatial_pair(relation, rng)
    asked = relation if answer == "yes" else OPPOSITE[relation]
    question = (f"Is the {first.colour} {first.kind} {RELATIONS[asked]} the {second.colour} {second.kind}? "
                "Answer yes or no.")
    return [first, second], question


def read_task(answer: str, rng: random.Random) -> tuple[Scene, str]:
    """What word is written? One short word in a random colour and place."""
    return [Word(answer, rng.choice(list(COLOURS)), rng.uniform(0.35, 0.65), rng.uniform(0.25, 0.75))], \
        "What word is written in the image? Answer with the word."


def choice_task(answer: str, rng: random.Random) -> tuple[Scene, str]:
    """Which shape is shown? Four options in the question, answered with a letter."""
    shape = random_shape(rng)
    options = rng.sample([k for k in SHAPES if k != shape.kind], 3)
    options.insert(LETTERS.index(answer), shape.kind)
    listed = "\n".join(f"{letter}. {option}" for letter, option in zip(LETTERS, options))
    return [shape], f"Which shape is in the image?\n{listed}\nAnswer with the option's letter from the given choices."


TASKS: dict[str, tuple[tuple[str, ...], Callable[[str, random.Random], tuple[Scene, str]]]] = {
    "color": (tuple(COLOURS), color_task),
    "count": (COUNTS, count_task),
    "big_color": (tuple(COLOURS), big_color_task),
    "size": (tuple(SIZES), size_task),
    "spatial": (("yes", "no"), spatial_task),
    "read": (READ_WORDS, read_task),
    "choice": (LETTERS, choice_task),
}


# ----------------------------------------------------------------------------- the general instruction mix
# The world's "LLaVA-665k" (paper 2's continual fine-tuning starts from a model instruction-tuned on it). Its VL
# part asks for what the tower's tokens carry (colour and size, docs/world.md) in formats no continual task
# uses: two-word answers, never a single colour or size word, so the tasks stay unseen (their zero-shot accuracy
# from the tuned model is near chance). Its text part holds language as LLaVA-1.5's text-only conversations do:
# questions about the creatures answered with a sentence of the corpus, and "tell me about ..." answered with a
# document. The VL part, held out per skill, is the general-VL test.

def describe_question(answer: str, rng: random.Random) -> tuple[Scene, str]:
    """Size and colour of one shape, in two words ("small red")."""
    size, colour = answer.split()
    return [random_shape(rng, colour=colour, size=size)], rng.choice((
        "Describe the shape in two words: its size, then its colour.", "Give the size and the colour of the shape."))


def pair_question(answer: str, rng: random.Random) -> tuple[Scene, str]:
    """The colours of a big and a small shape, the big one's first ("red blue")."""
    big_colour, small_colour = answer.split()
    big = random_shape(rng, colour=big_colour, size="big")
    small = random_shape(rng, colour=small_colour, size="small")
    while not apart(big, small):
        small = random_shape(rng, kind=small.kind, colour=small_colour, size="small")
    scene: Scene = [big, small]
    rng.shuffle(scene)
    return scene, rng.choice(("Name the colours of the two shapes, the big one first.",
                              "Which colours do the two shapes have? Start with the bigger one."))


GENERAL_VL: dict[str, tuple[tuple[str, ...], Callable[[str, random.Random], tuple[Scene, str]]]] = {
    "describe": (tuple(f"{size} {colour}" for size in SIZES for colour in COLOURS), describe_question),
    "pair": (tuple(f"{a} {b}" for a in COLOURS for b in COLOURS if a != b), pair_question),
}


def make_general_mix(entities: list[text.Entity], n_train: int, n_test: int, images: ImageFolder, seed: int,
                     forbidden_stories: set[tuple[str, str, str]]) -> tuple[list[dict], dict[str, list[dict]]]:
    """(train, {skill: test}): train mixes each GENERAL_VL skill, text questions answered with a sentence and
    documents about a creature in equal parts (the documents tell none of the last-word benchmark's stories);
    each skill's test, n_test questions on pictures drawn for it alone, is its general-VL benchmark."""
    rng = random.Random(f"{seed}:general")
    part = n_train // (len(GENERAL_VL) + 2)
    train: list[dict] = []
    for name, (classes, make) in GENERAL_VL.items():
        train += draw_split(classes, make, part, rng, images, f"general-{name}")
    for i, (question, answer) in enumerate(text.make_text_conversations(entities, part, rng)):
        train.append(llava_record(f"general-text-{i:05d}", None, question, answer))
    for i in range(n_train - len(train)):
        entity = rng.choice(entities)
        question = rng.choice((f"Tell me about {entity.name}.", f"What do you know about {entity.name}?"))
        train.append(llava_record(f"general-document-{i:05d}", None, question,
                                  text.make_document(entity, entities, rng, forbidden_stories)))
    rng.shuffle(train)
    tests = {name: draw_split(classes, make, n_test, rng, images, f"general-{name}-test")
             for name, (classes, make) in GENERAL_VL.items()}
    return train, tests


# ----------------------------------------------------------------------------- captions for alignment

def caption(rng: random.Random) -> tuple[Scene, str]:
    """A random scene (one shape, two shapes, several shapes or a word) and a sentence describing it."""
    kind = rng.choice(("one", "two", "several", "word"))
    if kind == "one":
        s = random_shape(rng)
        where = ("top" if s.y < 0.4 else "bottom" if s.y > 0.6 else "middle") + (
            " left" if s.x < 0.4 else " right" if s.x > 0.6 else "")
        return [s], rng.choice((f"A {s.size} {s.colour} {s.kind} in the {where}.",
                                f"A picture of a {s.size} {s.colour} {s.kind}."))
    if kind == "two":
        relation = rng.choice(list(RELATIONS))
        first, second = spatial_pair(relation, rng)
        return [first, second], f"A {first.colour} {first.kind} {RELATIONS[relation]} a {second.colour} {second.kind}."
    if kind == "several":
        n = rng.randint(1, 5)
        return grid_shapes(n, rng), f"{n} shape{'s' if n > 1 else ''}."
    scene, _ = read_task(rng.choice(READ_WORDS), rng)
    return scene, f"The word {scene[0].text} written in {scene[0].colour}."


# ----------------------------------------------------------------------------- writing

class ImageFolder:
    """Saves each scene once as images/NNNNNN.png and refuses a picture it has already drawn, so no image
    is shared between tasks or between a train and a test split."""

    def __init__(self, root: Path, image_size: int) -> None:
        self.root, self.image_size = root, image_size
        (root / "images").mkdir(parents=True, exist_ok=True)
        self.seen: set[bytes] = set()

    def save(self, scene: Scene) -> str | None:
        image = render(scene, self.image_size)
        digest = hashlib.sha256(image.tobytes()).digest()
        if digest in self.seen:
            return None
        self.seen.add(digest)
        path = f"images/{len(self.seen) - 1:06d}.png"
        image.save(self.root / path, format="PNG")
        return path


def draw_until_new(images: ImageFolder, make: Callable[[], tuple[Scene, str]]) -> tuple[str, str]:
    """Call `make` until it gives a picture not drawn before: (image path, its text)."""
    for _ in range(1000):
        scene, words = make()
        if (path := images.save(scene)) is not None:
            return path, words
    raise RuntimeError("could not draw a new picture in 1000 tries: ask for fewer images per task")


def llava_record(record_id: str, image: str | None, question: str, answer: str | None) -> dict:
    human = {"from": "human", "value": question if image is None else IMAGE_PREFIX + question}
    record: dict = {"id": record_id}
    if image is not None:
        record["image"] = image
    record["conversations"] = [human] + ([] if answer is None else [{"from": "gpt", "value": answer}])
    return record


def balanced(classes: tuple[str, ...], n: int, rng: random.Random) -> list[str]:
    answers = [classes[i % len(classes)] for i in range(n)]
    rng.shuffle(answers)
    return answers


def draw_split(classes: tuple[str, ...], make: Callable[[str, random.Random], tuple[Scene, str]], n: int,
               rng: random.Random, images: ImageFolder, prefix: str) -> list[dict]:
    """`n` records with balanced answers, each on a picture not drawn before, ids `<prefix>-NNNNN`."""
    records = []
    for i, answer in enumerate(balanced(classes, n, rng)):
        path, question = draw_until_new(images, lambda: make(answer, rng))
        records.append(llava_record(f"{prefix}-{i:05d}", path, question, answer))
    return records


def make_task_split(task: str, split: str, n: int, images: ImageFolder, seed: int) -> list[dict]:
    classes, make = TASKS[task]
    return draw_split(classes, make, n, random.Random(f"{seed}:{task}:{split}"), images, f"{task}-{split}")


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2/Pythia style: a leading space belongs to the word after it), specials 0 and 1."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def write_json(root: Path, path: str, obj: object, jsonl: bool = False) -> None:
    body = "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in obj) if jsonl else \
        json.dumps(obj, ensure_ascii=False, indent=1) + "\n"
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / path).write_text(body, encoding="utf-8")


def answer_counts(records: list[dict]) -> dict[str, int]:
    return dict(sorted(Counter(r["conversations"][-1]["value"] for r in records).items()))


def build_world(out: str | Path, seed: int = 0, size: str = "demo", image_size: int = 64, vocab_size: int = 1024,
                train_per_task: int | None = None, test_per_task: int | None = None) -> dict:
    """Generate the whole world into `out` (replaced if it holds an earlier world) and return its manifest."""
    if size not in WORLD_SIZES:
        raise ValueError(f"unknown world size {size!r}; choose one of {sorted(WORLD_SIZES)}")
    sizes = dict(WORLD_SIZES[size])
    sizes["train"] = sizes["train"] if train_per_task is None else train_per_task
    sizes["test"] = sizes["test"] if test_per_task is None else test_per_task
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "world.json").exists():
        raise FileExistsError(f"{out} is not empty and holds no world.json: refusing to overwrite it; "
                              "pass another --out folder")
    root = out.with_name(out.name + ".partial")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)

    # Text world (task 1) and its NL benchmarks.
    rng = random.Random(f"{seed}:text")
    entities = text.make_entities(sizes["entities"], rng)
    keys = text.story_keys(entities, sizes["last_word"], rng)
    train_docs, heldout_docs = text.make_corpus(entities, sizes["documents"], sizes["heldout"], rng, set(keys))
    facts_mc = text.make_facts_mc(entities, sizes["facts_mc"], rng)
    last_word = text.make_last_word(entities, keys, rng)
    (root / "text").mkdir()
    # One document per paragraph (blank-line separated), the layout mllm_cl.data.TextCorpus reads.
    (root / "text/train.txt").write_text("".join(d + "\n\n" for d in train_docs), encoding="utf-8")
    (root / "text/heldout.txt").write_text("".join(d + "\n\n" for d in heldout_docs), encoding="utf-8")
    write_json(root, "text/entities.json", [e.facts() for e in entities])
    write_json(root, "nl/facts_mc.jsonl", facts_mc, jsonl=True)
    write_json(root, "nl/last_word.jsonl", last_word, jsonl=True)

    # Images: alignment captions, then every task's train and test splits.
    images = ImageFolder(root, image_size)
    rng = random.Random(f"{seed}:align")
    align = []
    for i in range(sizes["align"]):
        path, words = draw_until_new(images, lambda: caption(rng))
        align.append(llava_record(f"align-{i:05d}", path, "", words))
    write_json(root, "align.json", align)
    tasks = {}
    for task in TASKS:
        tasks[task] = {split: make_task_split(task, split, sizes[split], images, seed) for split in ("train", "test")}
        for split, records in tasks[task].items():
            write_json(root, f"tasks/{task}/{split}.json", records)

    general_train, general_tests = make_general_mix(entities, sizes["general"], sizes["general_test"], images, seed,
                                                    set(keys))
    write_json(root, "general/train.json", general_train)
    for skill, records in general_tests.items():
        write_json(root, f"general/{skill}/test.json", records)

    # Text-only inquiries for UIR: the tasks' questions about imagined pictures, no answers.
    rng = random.Random(f"{seed}:inquiries")
    inquiries = []
    for i in range(sizes["inquiries"]):
        classes, make = TASKS[rng.choice(list(TASKS))]
        inquiries.append(llava_record(f"inquiry-{i:05d}", None, make(rng.choice(classes), rng)[1], None))
    write_json(root, "inquiries.json", inquiries)
    # General text inquiries (LLaVA-c's kind): questions about the text world, no answers.
    rng = random.Random(f"{seed}:text_inquiries")
    write_json(root, "text_inquiries.json",
               [llava_record(f"text-inquiry-{i:05d}", None, question, None)
                for i, question in enumerate(text.make_text_questions(entities, sizes["inquiries"], rng))])

    # Tokenizer on all of the world's text, chat template words included.
    chats = [f"{CHAT_TEMPLATE.system} USER: {question.removeprefix(IMAGE_PREFIX)} ASSISTANT: {answer}"
             for splits in tasks.values() for records in splits.values()
             for question, answer in ((t["value"] for t in r["conversations"]) for r in records)]
    corpus = (train_docs + heldout_docs + [a["conversations"][1]["value"] for a in align] + chats
              + [q["conversations"][0]["value"] for q in inquiries]
              + [c + t for d in facts_mc for c, t in d["requests"]] + [d["context"] + d["target"] for d in last_word])
    tokenizer = train_tokenizer(corpus, vocab_size)
    tokenizer.save(str(root / "tokenizer.json"))
    names = {"bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[0], "unk_token": SPECIAL_TOKENS[0],
             "pad_token": SPECIAL_TOKENS[1]}
    write_json(root, "special_tokens_map.json", names)
    write_json(root, "tokenizer_config.json", {**names, "tokenizer_class": "PreTrainedTokenizerFast",
                                               "add_bos_token": False, "add_eos_token": False,
                                               "model_max_length": 512})

    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.parent.name != "images")
    image_digest = hashlib.sha256()
    for i in range(len(images.seen)):
        image_digest.update((root / f"images/{i:06d}.png").read_bytes())
    manifest = {
        "name": "synthetic-world", "version": WORLD_VERSION, "seed": seed, "size": size, "sizes": sizes,
        "image_size": image_size,
        "vocab_size": tokenizer.get_vocab_size(), "tasks": list(TASKS), "general_skills": list(GENERAL_VL),
        "files": {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in files},
        "images": {"folder": "images", "count": len(images.seen), "sha256": image_digest.hexdigest()},
        "summary": {
            "entities": len(entities), "train_documents": len(train_docs), "heldout_documents": len(heldout_docs),
            "train_tokens": sum(len(e.ids) for e in tokenizer.encode_batch(train_docs)),
            "facts_mc": {"count": len(facts_mc), "gold": dict(sorted(Counter(d["gold"] for d in facts_mc).items()))},
            "last_word": {"count": len(last_word)}, "align": len(align), "inquiries": len(inquiries),
            "general": {"train": len(general_train), "skills": {skill: {"count": len(rs), "answers": answer_counts(rs)}
                                                                for skill, rs in general_tests.items()}},
            "text_inquiries": sizes["inquiries"],
            "tasks": {t: {s: {"count": len(rs), "answers": answer_counts(rs)} for s, rs in splits.items()}
                      for t, splits in tasks.items()},
        },
    }
    write_json(root, "world.json", manifest)
    shutil.rmtree(out, ignore_errors=True)
    root.rename(out)
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/synthetic", help="folder to write the world into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", default="demo", choices=sorted(WORLD_SIZES))
    parser.add_argument("--image-size", type=int, default=64, help="side of the square images (the vision tower's)")
    parser.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary size (the LLM's vocab_size)")
    parser.add_argument("--train-per-task", type=int, default=None, help="override the size's train samples per task")
    parser.add_argument("--test-per-task", type=int, default=None, help="override the size's test samples per task")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        manifest = build_world(args.out, args.seed, args.size, args.image_size, args.vocab_size,
                               args.train_per_task, args.test_per_task)
    except (FileExistsError, ValueError, RuntimeError) as error:
        parser.error(str(error))
    s = manifest["summary"]
    print(f"wrote {args.out}: {s['train_documents']} documents ({s['train_tokens']} tokens), "
          f"{manifest['images']['count']} images, tasks {', '.join(manifest['tasks'])}, "
          f"vocab {manifest['vocab_size']} in {time.perf_counter() - start:.1f}s")
