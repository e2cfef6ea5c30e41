"""Datasets: LLaVA conversations with images, text corpora for language pre-training, UIR's text-only inquiries.

Also LLaVA's image preprocessing (pad to square with the mean colour, bicubic resize, CLIP normalisation),
the right-padding `collate`, and a seeded, resumable batch order. Bad input raises `DataError` naming the
file, the entry and the fix; with `skip_bad=True` such entries are skipped and counted instead.
"""

from __future__ import annotations

import collections.abc
import functools
import json
import os
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mllm_cl.config import IGNORE_INDEX, LLMConfig, StageConfig, VisionConfig
from mllm_cl.conversation import (ASSISTANT, IMAGE_TOKEN, USER, ConversationError, Template, render_conversation,
                                  render_inquiry, render_prompt)
from mllm_cl.errors import UserError
from mllm_cl.tokenizer import Tokenizer, lone_surrogate

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ROLES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT}


class DataError(UserError, ValueError):
    """Bad input data. `reason` is a short key (e.g. "missing_image") under which skipped entries are counted."""

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------- images

def expand_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """LLaVA's expand2square: centre the image on a square canvas of colour `fill`."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode, by the image's real range: PIL's own convert("RGB") clips 16-bit and 32-bit
    integer pixels to 255 (almost white) and float pixels to 0/255; here 16-bit values scale by 255/65535 and
    float ones in [0, 1] by 255. Integers beyond 16 bits and floats outside [0, 1] have no range to read: refused."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        pixels = np.asarray(image)
        if image.mode == "F":
            if not (np.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 1):
                raise ValueError("float pixels outside [0, 1] (or not finite): their range cannot be known")
            eight = np.round(pixels * 255)
        else:
            if pixels.min() < 0 or pixels.max() > 65535:
                raise ValueError(f"{image.mode} pixels from {pixels.min()} to {pixels.max()}: beyond 16 bits")
            eight = np.round(pixels.astype(np.float64) * (255 / 65535)) if image.mode != "I" or pixels.max() > 255 \
                else pixels  # mode I holding 8-bit values (a converted L image) stays as it is
        image = Image.fromarray(eight.astype(np.uint8), mode="L")
    if image.mode in ("La", "RGBa"):  # premultiplied alpha: Pillow converts these only to their plain forms
        image = image.convert(image.mode[:-1] + "A")
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise DataError(f"an image of mode {image.mode} cannot be converted to RGB ({e})", "unreadable_image") \
            from None


def preprocess_image(image: Image.Image, image_size: int, mean: tuple[float, ...] = CLIP_MEAN,
                     std: tuple[float, ...] = CLIP_STD) -> torch.Tensor:
    """RGB, pad to square with the mean colour (as ints, like LLaVA), bicubic resize, [0,1], normalise -> (3,S,S)."""
    side = max(image.size)
    if side * side > Image.MAX_IMAGE_PIXELS:  # the square canvas, not the image: a 60000x1 strip asks for 3.6e9
        raise ValueError(f"a {image.size[0]}x{image.size[1]} image pads to a {side}x{side} square, over the "
                         f"{Image.MAX_IMAGE_PIXELS:,} pixels allowed; crop or resize it")
    image = expand_to_square(to_rgb(image), tuple(int(m * 255) for m in mean))
    image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32) / 255.0  # (S,S,3)
    pixels = (pixels - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))  # (3,S,S)


def load_image(path: str | Path, image_size: int) -> torch.Tensor:
    try:
        with Image.open(path) as image:
            return preprocess_image(image, image_size)
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist", "missing_image") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"image {path} cannot be read ({e}): replace or remove the file", "unreadable_image") from None


# ---------------------------------------------------------------- reading and validating LLaVA entries

@dataclass
class Entry:
    """A validated LLaVA entry: roles normalised to "user"/"assistant", image path resolved (or None)."""

    id: str
    messages: list[tuple[str, str]]
    image: Path | None


def read_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(where, record) for each record of a JSON list or a JSONL file; `where` is "entry N" or "line N".

    A JSONL line that is not valid JSON is yielded as a DataError in place of the record.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist", "missing_file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})", "invalid_json") from None
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield f"line {number}", json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                yield f"line {number}", DataError(f"{path}: line {number} is not valid JSON ({e})", "invalid_json")
        return
    try:
        records = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise DataError(f"{path} is not valid JSON: {e} (a .jsonl file holds one JSON object per line)",
                        "invalid_json") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of entries, got {type(records).__name__}", "invalid_json")
    for index, record in enumerate(records):
        yield f"entry {index}", record


def validate_entry(record: Any, where: str, path: Path, image_folder: Path | None) -> Entry:
    """Check one raw LLaVA record; LLaVA's own fix-up is applied: an image with no `<image>` gets "<image>\\n"
    put before its first human message."""
    entry_id = str(record.get("id", "")) if isinstance(record, dict) else ""

    def fail(problem: str, reason: str) -> DataError:
        named = f" (id {entry_id!r})" if entry_id else ""
        return DataError(f"{path}: {where}{named}: {problem}", reason)

    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise fail('missing key "conversations" (a list of {"from": ..., "value": ...} turns)', "missing_key")
    messages: list[tuple[str, str]] = []
    for turn_index, turn in enumerate(record["conversations"]):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise fail(f'turn {turn_index} needs keys "from" and "value"', "missing_key")
        role = ROLES.get(turn["from"])
        if role is None:
            raise fail(f"turn {turn_index} has unknown role {turn['from']!r}; use one of {sorted(ROLES)}",
                       "unknown_role")
        expected = USER if turn_index % 2 == 0 else ASSISTANT
        if role != expected:
            raise fail(f"turn {turn_index} is from {turn['from']!r} but turns must alternate human, gpt, ... "
                       f"starting with human", "role_order")
        if not isinstance(turn["value"], str) or not turn["value"].strip():
            raise fail(f"turn {turn_index} has empty text", "empty_text")
        surrogate = lone_surrogate(turn["value"])
        if surrogate is not None:
            raise fail(f"turn {turn_index} holds {surrogate}, which is not Unicode text", "bad_text")
        messages.append((role, turn["value"]))
    if not messages or messages[-1][0] != ASSISTANT:
        raise fail("a conversation must end with a gpt answer", "role_order")

    placeholders = sum(text.count(IMAGE_TOKEN) for _, text in messages)
    if any(IMAGE_TOKEN in text for role, text in messages if role == ASSISTANT):
        raise fail(f"a gpt answer contains {IMAGE_TOKEN!r}; it belongs in a human turn", "image_placeholder")
    image = record.get("image")
    if image is None:
        if placeholders:
            raise fail(f"has {IMAGE_TOKEN!r} in its text but no \"image\" key", "image_placeholder")
        return Entry(entry_id, messages, None)
    if not isinstance(image, str) or not image:
        raise fail(f'"image" must be one relative path, got {image!r}', "missing_key")
    if placeholders > 1:
        raise fail(f"has {placeholders} {IMAGE_TOKEN!r} placeholders for one image", "image_placeholder")
    if placeholders == 0:
        messages[0] = (USER, f"{IMAGE_TOKEN}\n{messages[0][1]}")
    return Entry(entry_id, messages, _image_path(image, image_folder, fail))


def _image_path(image: str, image_folder: Path | None, fail: Any) -> Path:
    if image_folder is None:
        raise fail(f"has image {image!r} but no image folder was given", "missing_image")
    if os.path.isabs(image) or ".." in Path(image).parts:
        raise fail(f"image path {image!r} leaves the image folder; paths must be relative to {image_folder}",
                   "image_outside_folder")
    full = image_folder / image
    if not full.is_file():
        raise fail(f"image {full} does not exist", "missing_image")
    if image_folder.resolve() not in full.resolve().parents:  # a symlink inside the folder pointing out of it
        raise fail(f"image {full} links to {full.resolve()}, outside the image folder {image_folder}",
                   "image_outside_folder")
    problem = undecodable(full)
    if problem:
        raise fail(f"image {full} cannot be read ({problem})", "unreadable_image")
    return full


def undecodable(path: Path) -> str | None:
    """Why the image at `path` cannot be decoded (truncated, corrupt, a decompression bomb), or None.

    Decodes it once, as training will: JPEGs at a reduced size (`draft`), so the check stays cheap."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.draft("RGB", (64, 64))
                image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        return f"{type(e).__name__}: {e}"
    return None


# ---------------------------------------------------------------- datasets

class ConversationDataset(torch.utils.data.Dataset):
    """LLaVA conversations rendered once at construction; images are loaded and preprocessed per item.

    Samples rendered with no supervised token are dropped and counted; construction fails if they exceed
    `max_unsupervised_share` of the valid entries. Truncated samples are kept and counted.
    """

    def __init__(self, path: str | Path, tokenizer: Tokenizer, template: str | Template, *,
                 image_folder: str | Path | None = None, image_size: int = 224, num_image_tokens: int = 0,
                 max_len: int = 2048, skip_bad: bool = False, max_unsupervised_share: float = 0.05):
        self.path, self.image_size, self.pad_id = Path(path), image_size, tokenizer.pad_id
        folder = Path(image_folder) if image_folder is not None else None
        self.counts: Counter[str] = Counter()
        self.samples: list[tuple[np.ndarray, np.ndarray, Path | None]] = []
        render_prompt(tokenizer, [(USER, "?")], template, 0)  # a template/tokenizer mismatch fails here, once
        for where, record in read_records(self.path):
            try:
                if isinstance(record, DataError):
                    raise record
                entry = validate_entry(record, where, self.path, folder)
                try:
                    rendered = render_conversation(tokenizer, entry.messages, template, num_image_tokens, max_len)
                except ConversationError as e:
                    raise DataError(f"{self.path}: {where} (id {entry.id!r}): {e}", "image_too_long") from None
            except DataError as e:
                if not skip_bad:
                    raise DataError(f"{e} -- fix the entry, or set skip_bad to skip and count such entries",
                                    e.reason) from None
                self.counts[e.reason] += 1
                continue
            if rendered.num_supervised == 0:
                self.counts["no_supervision"] += 1
                continue
            self.counts["truncated"] += rendered.truncated
            self.samples.append((np.asarray(rendered.input_ids, dtype=np.int64),
                                 np.asarray(rendered.labels, dtype=np.int64), entry.image))
        self.counts["kept"] = len(self.samples)
        valid = len(self.samples) + self.counts["no_supervision"]
        if valid and self.counts["no_supervision"] / valid > max_unsupervised_share:
            raise DataError(f"{self.path}: {self.counts['no_supervision']} of {valid} samples have no supervised "
                            f"token after rendering with max_len={max_len} (limit {max_unsupervised_share:.0%}): "
                            f"raise max_len or check the answers", "no_supervision")
        print(self.summary_line())

    def summary(self) -> dict[str, int]:
        """Counts by reason: "kept", "truncated", "no_supervision" and each reason a bad entry was skipped for."""
        fixed = ("kept", "truncated", "no_supervision")
        return {**{r: self.counts[r] for r in fixed}, **{r: c for r, c in self.counts.items() if r not in fixed and c}}

    def summary_line(self) -> str:
        counts = self.summary()
        skipped = {r: c for r, c in counts.items() if r not in ("kept", "truncated", "no_supervision")}
        reasons = f" ({', '.join(f'{r} {c}' for r, c in sorted(skipped.items()))})" if skipped else ""
        return (f"{self.path}: kept {counts['kept']} samples; skipped {sum(skipped.values())}{reasons}; "
                f"no supervised token {counts['no_supervision']}; truncated {counts['truncated']}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | None]:
        ids, labels, image = self.samples[index]
        pixel_values = load_image(image, self.image_size) if image is not None else None
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels), "pixel_values": pixel_values}


class TextCorpus(torch.utils.data.Dataset):
    """A plain-text file cut into fixed-length blocks for language (pre-)training.

    Documents are separated by one or more blank lines (lines inside a document are kept with their "\\n").
    Each document is followed by the eos token, the stream is cut into `block_len` tokens and the short tail
    is dropped. Labels equal the input ids: the loss shifts them, as for conversations.
    """

    def __init__(self, path: str | Path, tokenizer: Tokenizer, block_len: int):
        path = Path(path)
        if not path.is_file():
            raise DataError(f"text corpus {path} does not exist", "missing_file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"text corpus {path} is not UTF-8 text (byte {e.start}: {e.reason})",
                            "invalid_text") from None
        documents = [d.strip("\n") for d in text.split("\n\n") if d.strip()]
        stream: list[int] = []
        for document in documents:
            stream += tokenizer.encode(document) + [tokenizer.eos_id]
        if len(stream) < block_len:
            raise DataError(f"{path}: {len(stream)} tokens make no block of {block_len}: use a larger corpus or a "
                            f"smaller block length", "too_short")
        num_blocks = len(stream) // block_len
        self.blocks = torch.tensor(stream[:num_blocks * block_len], dtype=torch.long).view(num_blocks, block_len)
        self.num_documents, self.pad_id = len(documents), tokenizer.pad_id

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | None]:
        block = self.blocks[index]
        return {"input_ids": block, "labels": block.clone(), "pixel_values": None}


class TextOnlyInquiries(torch.utils.data.Dataset):
    """UIR's unlabeled inquiries: the first human question of each text-only entry of a LLaVA file, rendered
    as a generation prompt (no answer, no labels) and cut to `max_len`. Entries with an image are passed over."""

    def __init__(self, path: str | Path, tokenizer: Tokenizer, template: str | Template, max_len: int = 512):
        self.path, self.pad_id = Path(path), tokenizer.pad_id
        self.inquiries: list[torch.Tensor] = []
        for where, record in read_records(self.path):
            if isinstance(record, DataError):
                raise record
            if not isinstance(record, dict) or "image" in record:
                continue
            turns = record.get("conversations")
            if not (isinstance(turns, list) and turns and isinstance(turns[0], dict)
                    and ROLES.get(turns[0].get("from")) == USER and isinstance(turns[0].get("value"), str)):
                raise DataError(f"{self.path}: {where}: the first turn must be a human question", "missing_key")
            question = turns[0]["value"]
            if question.strip():
                ids = render_inquiry(tokenizer, question, template)[:max_len]
                if not ids:
                    raise DataError(f"{self.path}: {where}: the inquiry renders to no token with template "
                                    f"{getattr(template, 'name', template)!r} (it drops the user's text): "
                                    "use a chat template such as pythia or vicuna_v1", "empty_text")
                self.inquiries.append(torch.tensor(ids, dtype=torch.long))
        if not self.inquiries:
            raise DataError(f"{self.path} holds no text-only entry (one without \"image\") to use as an inquiry",
                            "no_inquiries")

    def __len__(self) -> int:
        return len(self.inquiries)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | None]:
        return {"input_ids": self.inquiries[index], "pixel_values": None}


# ---------------------------------------------------------------- batching

def collate(samples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor | None]:
    """Right-pad to the longest sample: input_ids with `pad_id`, labels with IGNORE_INDEX, attention_mask 1/0.

    pixel_values stacks the images in sample order ((N,3,H,W), None when no sample has one). Samples without
    "labels" (inquiries) give a batch without labels.
    """
    length = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    has_labels = "labels" in samples[0]
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        input_ids[row, :n] = sample["input_ids"]
        attention_mask[row, :n] = 1
        if has_labels:
            labels[row, :n] = sample["labels"]
    images = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
    batch: dict[str, torch.Tensor | None] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if has_labels:
        batch["labels"] = labels
    batch["pixel_values"] = torch.stack(images) if images else None
    return batch


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch: a permutation that depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def batches(dataset: Any, batch_size: int, seed: int, epoch: int, start_index: int = 0,
            num_workers: int = 0) -> Iterator[dict[str, torch.Tensor | None]]:
    """Collated batches of one epoch in a seeded order, starting at sample `start_index` of that order
    (the data position a resumed run saved). The last batch may be smaller. `dataset` needs `pad_id`.
    With `num_workers` > 0, samples (image decoding) are prepared by that many worker processes."""
    order = epoch_order(len(dataset), seed, epoch)
    index_batches = [order[i:i + batch_size].tolist() for i in range(start_index, len(order), batch_size)]
    if num_workers == 0:
        for indices in index_batches:
            yield collate([dataset[i] for i in indices], dataset.pad_id)
        return
    yield from torch.utils.data.DataLoader(dataset, batch_sampler=index_batches, num_workers=num_workers,
                                           collate_fn=functools.partial(collate, pad_id=dataset.pad_id))


class EpochBatches(collections.abc.Sequence):
    """One epoch's collated micro-batches as a sequence (len + indexing), for the trainer.

    Batch i holds samples order[i*B:(i+1)*B] of the epoch's seeded order, collated on demand, so the same
    (seed, epoch) always gives the same batches and a resumed run can jump straight to its saved position.
    """

    def __init__(self, dataset: Any, batch_size: int, seed: int, epoch: int) -> None:
        if len(dataset) == 0:
            raise DataError("the dataset is empty: nothing to train on", "empty")
        self.dataset, self.batch_size = dataset, batch_size
        self.order = epoch_order(len(dataset), seed, epoch)

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | None]:  # type: ignore[override]
        if not 0 <= index < len(self):
            raise IndexError(index)
        indices = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        return collate([self.dataset[int(i)] for i in indices], self.dataset.pad_id)


def multimodal_dataset(cfg: StageConfig, path: str, image_folder: str, tokenizer: Tokenizer, template: str,
                       vision_config: VisionConfig) -> ConversationDataset:
    """A LLaVA JSON file rendered for a stage: its max_len and skip_bad, the vision tower's image size and tokens."""
    return ConversationDataset(path, tokenizer, template, image_folder=image_folder or None,
                               image_size=vision_config.image_size,
                               num_image_tokens=vision_config.num_image_tokens, max_len=cfg.max_len,
                               skip_bad=cfg.skip_bad)


def check_fits(max_len: int, tokenizer: Tokenizer, llm_config: LLMConfig, where: str) -> None:
    """A DataError unless samples of `max_len` tokens and every id of `tokenizer` fit the LLM (`where` names it)."""
    if max_len > llm_config.max_seq_len:
        raise DataError(f"max_len={max_len} is longer than {where}'s max_seq_len={llm_config.max_seq_len}: "
                        f"set max_len <= {llm_config.max_seq_len}", "too_long")
    if tokenizer.max_id >= llm_config.vocab_size:
        raise DataError(f"the tokenizer has ids up to {tokenizer.max_id} but {where} has only {llm_config.vocab_size} "
                        "embeddings: use the tokenizer the LLM was trained with", "vocab")
