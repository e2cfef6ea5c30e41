"""Vision-language (VL) evaluation: generate an answer per test question, score it, accuracy per task.

Open-ended answers are compared by exact match after VQA-style normalisation (the VQA challenge's
answer processing, simplified: lower case, punctuation, articles, number words). Multiple-choice
questions, which list their options as lines like "A. red", are scored by the option letter the
answer names ("A", "(A)", "A.", "The answer is A", or the option's text itself).

Under torchrun every rank generates its share of the batches and the answers are gathered (`mllm_cl.sharding`):
every rank ends with exactly the answers one process gives.
"""

from __future__ import annotations

import re
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mllm_cl.conversation import EOS, Template, get_template, render_prompt
from mllm_cl.data import DataError, load_image, read_records, validate_entry
from mllm_cl.evaluation_nl import EvalDataError
from mllm_cl.llava import LlavaModel
from mllm_cl.sharding import gather_results, my_batches
from mllm_cl.tokenizer import Tokenizer

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.)]\s+(\S.*?)\s*$")
# The letter itself is case-sensitive: "a" and "A red car" are an article, not option A.
_ANSWER_IS = re.compile(r"\b(?i:answer)\s*(?:(?i:is)|:)\s*:?\s*\(?([A-Z])\b")
_LEADING_LETTER = re.compile(r"^\(?([A-Z])(?:[.):]|\s*$)")


def normalize_answer(text: str) -> str:
    """'The Two red-ish cubes.' -> '2 red ish cubes'."""
    text = text.lower().strip()
    text = re.sub(r"(?<=\d),(?=\d)", "", text)  # 1,000 -> 1000
    text = re.sub(r"(?!(?<=\d)\.(?=\d))[^\w\s]", " ", text)  # punctuation -> space, but keep 3.5
    words = [_NUMBER_WORDS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def parse_options(question: str) -> dict[str, str]:
    """The options a question lists, one per line ("A. red", "(B) blue", "C) green"): {letter: text}.

    Only a run of consecutive letters from A counts, so a stray line like "I. ..." is not an option list;
    fewer than two options means the question is open-ended ({}).
    """
    options: dict[str, str] = {}
    for line in question.splitlines():
        match = _OPTION_LINE.match(line)
        if match and match.group(1) == chr(ord("A") + len(options)):
            options[match.group(1)] = match.group(2)
    return options if len(options) >= 2 else {}


def extract_choice(answer: str, options: dict[str, str]) -> str | None:
    """The option letter an answer names, or None. Tried in order: "answer is X" / "Answer: X", an answer that
    starts with the letter ("X", "X.", "(X)", "X) text"), then the option's text itself (after normalisation)."""
    text = answer.strip()
    for pattern in (_ANSWER_IS, _LEADING_LETTER):
        match = pattern.search(text)
        if match and match.group(1) in options:
            return match.group(1)
    normalized = normalize_answer(text)
    for letter, option in options.items():
        if normalized == normalize_answer(option):
            return letter
    return None


def is_correct(prediction: str, gold: str, question: str) -> bool:
    """Score one generated answer against the gold answer of its question."""
    options = parse_options(question)
    if not options:
        return normalize_answer(prediction) == normalize_answer(gold)
    gold_letter = extract_choice(gold, options)
    if gold_letter is None:
        raise EvalDataError(f"gold answer {gold!r} names none of the options {options} of question {question!r}")
    return extract_choice(prediction, options) == gold_letter


@dataclass
class VLExample:
    id: str
    messages: list[tuple[str, str]]  # ("user" | "assistant", text), ending with the question
    image: Path | None
    answer: str  # the gold answer: the last gpt turn

    @property
    def question(self) -> str:
        return self.messages[-1][1]


def read_vl_test_set(path: str | Path, image_folder: str | Path | None, limit: int | None = None) -> list[VLExample]:
    """The first `limit` entries (all if None) of a task's test split, validated as training data is."""
    path = Path(path)
    folder = Path(image_folder) if image_folder is not None else None
    examples = []
    try:
        for where, record in read_records(path):
            if limit is not None and len(examples) >= limit:
                break
            if isinstance(record, DataError):
                raise record
            entry = validate_entry(record, where, path, folder)
            example = VLExample(entry.id or where, entry.messages[:-1], entry.image, entry.messages[-1][1])
            options = parse_options(example.question)
            if options and extract_choice(example.answer, options) is None:
                raise EvalDataError(f"{path}: {where} (id {example.id!r}): the question lists options {options} "
                                    f"but its answer {example.answer!r} names none of them")
            examples.append(example)
    except DataError as e:
        note = " (in a test split the last gpt turn is the gold answer)" if e.reason in ("role_order", "empty_text") \
            else ""
        raise EvalDataError(f"{e}{note}") from None
    if not examples:
        raise EvalDataError(f"VL test file {path} holds no entries")
    return examples


def majority_share(examples: list[VLExample]) -> float:
    """The share of the test's most common gold answer (after normalisation), in percent: the accuracy of always
    giving that answer, which is the chance level a test's accuracy is read against."""
    counts = Counter(normalize_answer(example.answer) for example in examples)
    return 100.0 * max(counts.values()) / len(examples)


class VLEvalCache:
    """What repeated evaluations of models that share one frozen vision tower can reuse: each test file as read
    and validated, and the tower's features of each test image.

    Every stage after pre-training keeps the tower frozen, so a continual run that evaluates after every task,
    or the alpha curves that evaluate some sixty consolidations of one model, would otherwise read, decode and
    encode the same images every time. Features are kept for one tower (the module object, on one device, in
    one dtype) and all dropped when any of its parameters changes in place (a tensor's version counter moves),
    so a stale feature is never used. A batch with any image not cached is encoded whole, exactly as without a
    cache, so cached and uncached evaluations give the same answers. `max_bytes` bounds the features kept;
    images beyond it are encoded each time.
    """

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self._tests: dict[tuple, list[VLExample]] = {}
        self._tower: weakref.ref | None = None
        self._state: tuple = ()
        self._features: dict[Path, torch.Tensor] = {}
        self._bytes = 0

    def test_set(self, path: str | Path, image_folder: str | Path | None, limit: int | None = None) -> list[VLExample]:
        """`read_vl_test_set`'s examples, read again only when the file changes."""
        path = Path(path)
        stamp = path.stat().st_mtime_ns if path.is_file() else None
        key = (str(path.resolve()), str(image_folder), limit, stamp)
        if stamp is None or key not in self._tests:
            self._tests[key] = read_vl_test_set(path, image_folder, limit)
        return self._tests[key]

    def features(self, vision: torch.nn.Module, images: list[Path], pixels: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The tower's (N, P, d_vision) features of `images`; `pixels()` gives their (N, 3, S, S) input."""
        first = next(vision.parameters())
        state = (first.device, first.dtype, tuple(p._version for p in vision.parameters()))
        if self._tower is None or self._tower() is not vision or state != self._state:
            self._features.clear()
            self._tower, self._state, self._bytes = weakref.ref(vision), state, 0
        if all(image in self._features for image in images):
            return torch.stack([self._features[image] for image in images])
        with torch.no_grad():
            features = vision(pixels())
        for image, feature in zip(images, features):
            size = feature.numel() * feature.element_size()
            if image not in self._features and self._bytes + size <= self.max_bytes:
                self._features[image] = feature
                self._bytes += size
        return features


def stop_ids(tokenizer: Tokenizer, template: Template) -> list[int]:
    """The ids that end an answer: the tokenizer's EOS and the template's end-of-turn token."""
    ids = {tokenizer.eos_id}
    if template.answer_end != EOS and (token := tokenizer.token_to_id(template.answer_end)) is not None:
        ids.add(token)
    return sorted(ids)


@torch.inference_mode()
def generate_answers(model: LlavaModel, tokenizer: Tokenizer, examples: list[VLExample], *, template: str,
                     batch_size: int = 16, max_new_tokens: int = 32, cache: VLEvalCache | None = None) -> list[str]:
    """Greedy answers, one per example, in order. Prompts are batched by length and right-padded. With a `cache`,
    the tower's features of images it has seen are reused. Under torchrun each rank generates its share of the
    batches (and caches their images); every rank returns all the answers."""
    template = get_template(template)
    device = next(model.llm.parameters()).device
    dtype = next(model.vision.parameters()).dtype
    image_size = model.vision.config.image_size
    prompts = [render_prompt(tokenizer, ex.messages, template, model.num_image_tokens) for ex in examples]
    stops = stop_ids(tokenizer, template)
    order = sorted(range(len(examples)), key=lambda i: -len(prompts[i]))
    answers = [""] * len(examples)
    mine: list[int] = []
    for batch in my_batches(order, batch_size):
        width = len(prompts[batch[0]])
        input_ids = torch.full((len(batch), width), tokenizer.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, :len(prompts[i])] = torch.tensor(prompts[i])
            attention_mask[row, :len(prompts[i])] = 1
        images = [examples[i].image for i in batch if examples[i].image is not None]

        def pixels() -> torch.Tensor:  # (N, 3, S, S)
            return torch.stack([load_image(image, image_size) for image in images]).to(device, dtype)

        pixel_values = features = None
        if images and cache is not None:
            features = cache.features(model.vision, images, pixels)
        elif images:
            pixel_values = pixels()
        out = model.generate(input_ids.to(device), attention_mask.to(device), pixel_values, features,
                             max_new_tokens=max_new_tokens, stop_ids=stops, pad_id=tokenizer.pad_id)
        for row, i in enumerate(batch):
            tokens = out.tokens[row, :int(out.lengths[row])].tolist()
            if tokens and tokens[-1] in stops:
                tokens.pop()
            answers[i] = tokenizer.decode(tokens).strip()
        mine += batch
    return gather_results(answers, mine)


def evaluate_vl_examples(model: LlavaModel, tokenizer: Tokenizer, examples: list[VLExample], *, template: str,
                         batch_size: int = 16, max_new_tokens: int = 32,
                         cache: VLEvalCache | None = None) -> dict[str, float]:
    """{"acc", "n"} of one task."""
    answers = generate_answers(model, tokenizer, examples, template=template, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, cache=cache)
    correct = sum(is_correct(answer, ex.answer, ex.question) for answer, ex in zip(answers, examples))
    return {"acc": correct / len(examples), "n": len(examples)}
