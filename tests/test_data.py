"""Datasets and batching: LLaVA preprocessing against numpy, every bad-input error and its counted skip,
no-supervision detection, collate padding, seeded and resumable batch order, text corpus, UIR inquiries."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_tokenizer import byte_ids, byte_tokenizer_folder

from mllm_cl.config import IMAGE_PLACEHOLDER_ID
from mllm_cl.conversation import ConversationError, Template, render_conversation, render_inquiry
from mllm_cl.data import (CLIP_MEAN, CLIP_STD, ConversationDataset, DataError, TextCorpus, TextOnlyInquiries, batches,
                          collate, load_image, preprocess_image)
from mllm_cl.tokenizer import Tokenizer, load_tokenizer

N_IMG, SIZE = 4, 8


@pytest.fixture
def tok(tmp_path: Path) -> Tokenizer:
    return load_tokenizer(byte_tokenizer_folder(tmp_path / "tok", tokenizer_config={"bos_token": "<s>",
                                                                                   "eos_token": "</s>",
                                                                                   "pad_token": "<pad>"}))


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)).save(folder / "wide.png")
    Image.fromarray(rng.integers(0, 256, (12, 5, 3), dtype=np.uint8)).save(folder / "sub" / "tall.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    return folder


def turn(who: str, text: str) -> dict:
    return {"from": who, "value": text}


GOOD = [
    {"id": "img", "image": "wide.png", "conversations": [turn("human", "<image>\nWhat?"), turn("gpt", "Noise.")]},
    {"id": "txt", "conversations": [turn("user", "Hi?"), turn("assistant", "Hello."), turn("human", "Bye?"),
                                    turn("gpt", "Bye.")]},
    {"id": "nophold", "image": "sub/tall.png", "conversations": [turn("human", "Colour?"), turn("gpt", "Grey.")]},
]


def write(path: Path, records: list) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    else:
        path.write_text(json.dumps(records))
    return path


def dataset(path: Path, tok: Tokenizer, images: Path, **kw) -> ConversationDataset:
    return ConversationDataset(path, tok, "vicuna_v1", image_folder=images, image_size=SIZE,
                               num_image_tokens=N_IMG, **kw)


# ---------------------------------------------------------------- image preprocessing

def numpy_preprocess(image: Image.Image, size: int) -> np.ndarray:
    """LLaVA's recipe written with numpy: pad with the int mean colour, PIL bicubic resize, rescale, normalise."""
    pixels = np.asarray(image.convert("RGB"))
    h, w, _ = pixels.shape
    side = max(h, w)
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    canvas[:] = [int(m * 255) for m in CLIP_MEAN]  # (122, 116, 104)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top:top + h, left:left + w] = pixels
    resized = np.asarray(Image.fromarray(canvas).resize((size, size), Image.BICUBIC), dtype=np.float64) / 255.0
    return ((resized - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).transpose(2, 0, 1)


@pytest.mark.parametrize("shape, mode", [((6, 10, 3), "RGB"), ((12, 5, 3), "RGB"), ((7, 7, 4), "RGBA"),
                                         ((9, 4), "L")])
def test_preprocess_matches_numpy(shape: tuple, mode: str) -> None:
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8), mode)
    ours = preprocess_image(image, 16)
    assert ours.shape == (3, 16, 16) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), numpy_preprocess(image, 16), atol=1e-5)


def test_padding_colour_is_the_integer_mean() -> None:
    image = Image.fromarray(np.zeros((2, 8, 3), dtype=np.uint8))
    corner = preprocess_image(image, 8)[:, 0, 0]  # the top row is padding
    expected = (torch.tensor([122, 116, 104]) / 255.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(corner, expected.float(), atol=1e-6)


# ---------------------------------------------------------------- conversations

def test_dataset_renders_loads_and_inserts_the_placeholder(tmp_path: Path, tok: Tokenizer, images: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    ds = dataset(write(tmp_path / "d.json", GOOD), tok, images)
    assert len(ds) == 3 and ds.summary() == {"kept": 3, "truncated": 0, "no_supervision": 0}
    assert "kept 3 samples; skipped 0; no supervised token 0; truncated 0" in capsys.readouterr().out
    first = ds[0]
    want = render_conversation(tok, [("user", "<image>\nWhat?"), ("assistant", "Noise.")], "vicuna_v1", N_IMG)
    assert first["input_ids"].tolist() == want.input_ids and first["labels"].tolist() == want.labels
    assert torch.equal(first["pixel_values"], load_image(images / "wide.png", SIZE))
    assert ds[1]["pixel_values"] is None
    third = ds[2]["input_ids"].tolist()  # LLaVA's fix-up: "<image>\n" put before the first human message
    want = render_conversation(tok, [("user", "<image>\nColour?"), ("assistant", "Grey.")], "vicuna_v1", N_IMG)
    assert third == want.input_ids and third.count(IMAGE_PLACEHOLDER_ID) == N_IMG


def test_jsonl_reads_the_same(tmp_path: Path, tok: Tokenizer, images: Path) -> None:
    a = dataset(write(tmp_path / "d.json", GOOD), tok, images)
    b = dataset(write(tmp_path / "d.jsonl", GOOD), tok, images)
    assert all(torch.equal(a[i]["input_ids"], b[i]["input_ids"]) for i in range(3))


BAD = [
    ({"id": "a"}, "missing_key", 'missing key "conversations"'),
    ({"id": "b", "conversations": [{"from": "human"}]}, "missing_key", 'turn 0 needs keys "from" and "value"'),
    ({"id": "c", "conversations": [turn("bot", "x"), turn("gpt", "y")]}, "unknown_role", "unknown role 'bot'"),
    ({"id": "d", "conversations": [turn("gpt", "x"), turn("human", "y")]}, "role_order", "turn 0 is from 'gpt'"),
    ({"id": "e", "conversations": [turn("human", "x")]}, "role_order", "must end with a gpt answer"),
    ({"id": "f", "conversations": [turn("human", "x"), turn("gpt", "  ")]}, "empty_text", "turn 1 has empty text"),
    ({"id": "g", "conversations": [turn("human", "<image>\nx"), turn("gpt", "y")]}, "image_placeholder",
     "no \"image\" key"),
    ({"id": "h", "image": "wide.png", "conversations": [turn("human", "<image><image>x"), turn("gpt", "y")]},
     "image_placeholder", "2 '<image>' placeholders"),
    ({"id": "i", "image": "wide.png", "conversations": [turn("human", "x"), turn("gpt", "<image>")]},
     "image_placeholder", "gpt answer contains"),
    ({"id": "j", "image": "gone.png", "conversations": [turn("human", "x"), turn("gpt", "y")]}, "missing_image",
     "gone.png does not exist"),
    ({"id": "k", "image": "broken.png", "conversations": [turn("human", "x"), turn("gpt", "y")]},
     "unreadable_image", "broken.png cannot be read"),
    ({"id": "l", "image": "../wide.png", "conversations": [turn("human", "x"), turn("gpt", "y")]},
     "image_outside_folder", "leaves the image folder"),
    ({"id": "m", "image": "/etc/passwd", "conversations": [turn("human", "x"), turn("gpt", "y")]},
     "image_outside_folder", "leaves the image folder"),
    ({"id": "n", "image": "wide.png", "conversations": [turn("human", "x" * 300), turn("gpt", "y")]},
     "image_too_long", "image block ends at position"),
]


@pytest.mark.parametrize("record, reason, message", BAD, ids=[r[1] + "-" + r[0]["id"] for r in BAD])
def test_bad_entry_names_file_entry_and_problem(tmp_path: Path, tok: Tokenizer, images: Path, record: dict,
                                                reason: str, message: str) -> None:
    path = write(tmp_path / "d.json", [GOOD[1], record])
    with pytest.raises(DataError) as error:
        dataset(path, tok, images, max_len=1024 if record["id"] != "n" else 100)
    assert error.value.reason == reason
    assert str(error.value).startswith(f"{path}: entry 1 (id {record['id']!r}): ") and message in str(error.value)


def test_skip_bad_counts_every_reason(tmp_path: Path, tok: Tokenizer, images: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    records = [json.dumps(r) for r in GOOD * 10 + [b[0] for b in BAD if b[0]["id"] != "n"]] + ["{broken"]
    ds = dataset(write(tmp_path / "d.jsonl", records), tok, images, skip_bad=True)
    expected = {"kept": 30, "truncated": 0, "no_supervision": 0, "invalid_json": 1}
    for _, reason, _ in BAD[:-1]:
        expected[reason] = expected.get(reason, 0) + 1
    assert ds.summary() == expected and len(ds) == 30
    assert "skipped 14 (empty_text 1, image_outside_folder 2, image_placeholder 3, invalid_json 1" in \
        capsys.readouterr().out
    with pytest.raises(DataError, match=r"d\.jsonl: line 31 \(id 'a'\): missing key"):
        dataset(tmp_path / "d.jsonl", tok, images)  # without skip_bad the first bad line stops the run
    with pytest.raises(DataError, match=r"e\.jsonl: line 4 is not valid JSON"):
        dataset(write(tmp_path / "e.jsonl", GOOD + ["{broken"]), tok, images)


def test_no_supervision_is_counted_and_bounded(tmp_path: Path, tok: Tokenizer, images: Path) -> None:
    long_question = {"id": "long", "conversations": [turn("human", "q" * 400), turn("gpt", "a")]}
    path = write(tmp_path / "d.json", GOOD * 10 + [long_question])
    with pytest.raises(DataError, match=r"1 of 31 samples have no supervised token .*max_len=300 \(limit 1%\)"):
        dataset(path, tok, images, max_len=300, max_unsupervised_share=0.01)
    ds = dataset(path, tok, images, max_len=300)  # 1/31 is under the default 5%
    assert ds.summary() == {"kept": 30, "truncated": 0, "no_supervision": 1}
    ds = dataset(path, tok, images, max_len=200)  # the system prompt alone is ~190 tokens
    assert ds.summary()["truncated"] > 0 and all(len(ds[i]["input_ids"]) <= 200 for i in range(len(ds)))


def test_template_tokenizer_mismatch_fails_once(tmp_path: Path, images: Path) -> None:
    bare = load_tokenizer(byte_tokenizer_folder(tmp_path / "t2"))
    odd = Template("odd", specials=("<none>",), begin="<none>")
    with pytest.raises(ConversationError, match="needs the special token '<none>'"):
        ConversationDataset(write(tmp_path / "d.json", GOOD), bare, odd, image_folder=images, skip_bad=True)


# ---------------------------------------------------------------- collate and batch order

def test_collate_pads_right_and_stacks_images_in_order() -> None:
    img_a, img_b = torch.rand(3, 4, 4), torch.rand(3, 4, 4)
    samples = [{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7]), "pixel_values": img_a},
               {"input_ids": torch.tensor([8]), "labels": torch.tensor([8]), "pixel_values": None},
               {"input_ids": torch.tensor([IMAGE_PLACEHOLDER_ID, 9]), "labels": torch.tensor([-100, 9]),
                "pixel_values": img_b}]
    batch = collate(samples, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [IMAGE_PLACEHOLDER_ID, 9, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100], [-100, 9, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert torch.equal(batch["pixel_values"], torch.stack([img_a, img_b]))
    assert all(batch[k].dtype == torch.long for k in ("input_ids", "labels", "attention_mask"))
    assert collate(samples[1:2], pad_id=0)["pixel_values"] is None


def test_batches_are_seeded_and_resume_from_a_position(tmp_path: Path, tok: Tokenizer) -> None:
    text = "\n\n".join(f"document number {i}" for i in range(40))
    corpus = TextCorpus(_text(tmp_path, text), tok, block_len=8)
    n = len(corpus)
    run = [b["input_ids"] for b in batches(corpus, 4, seed=3, epoch=0)]
    again = [b["input_ids"] for b in batches(corpus, 4, seed=3, epoch=0)]
    assert all(torch.equal(a, b) for a, b in zip(run, again, strict=True))
    seen = sorted(tuple(row.tolist()) for b in run for row in b)
    assert seen == sorted(tuple(row.tolist()) for row in corpus.blocks) and len(run) == -(-n // 4)
    other = torch.cat([b["input_ids"] for b in batches(corpus, 4, seed=3, epoch=1)])
    assert not torch.equal(torch.cat(run), other)  # a new epoch, a new order
    resumed = [b["input_ids"] for b in batches(corpus, 4, seed=3, epoch=0, start_index=8)]
    assert all(torch.equal(a, b) for a, b in zip(run[2:], resumed, strict=True))
    workers = [b["input_ids"] for b in batches(corpus, 4, seed=3, epoch=0, start_index=8, num_workers=1)]
    assert all(torch.equal(a, b) for a, b in zip(resumed, workers, strict=True))


def _text(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- text corpus and inquiries

def test_text_corpus_joins_documents_with_eos(tmp_path: Path, tok: Tokenizer) -> None:
    path = _text(tmp_path, "first doc\nline two\n\n\n\nsecond\n\nthird one\n")
    corpus = TextCorpus(path, tok, block_len=6)
    stream = byte_ids("first doc\nline two") + [tok.eos_id] + byte_ids("second") + [tok.eos_id] + \
        byte_ids("third one") + [tok.eos_id]
    blocks = len(stream) // 6
    assert corpus.num_documents == 3 and len(corpus) == blocks
    assert corpus.blocks.flatten().tolist() == stream[:blocks * 6]
    sample = corpus[1]
    assert torch.equal(sample["labels"], sample["input_ids"]) and sample["pixel_values"] is None
    with pytest.raises(DataError, match="make no block of 100"):
        TextCorpus(path, tok, block_len=100)
    with pytest.raises(DataError, match="does not exist"):
        TextCorpus(tmp_path / "nope.txt", tok, block_len=6)


def test_inquiries_are_text_only_prompts(tmp_path: Path, tok: Tokenizer) -> None:
    question = {"id": "q", "conversations": [turn("human", "Why?"), turn("gpt", "So.")]}
    path = write(tmp_path / "d.json", GOOD + [question])
    inquiries = TextOnlyInquiries(path, tok, "vicuna_v1", max_len=190)
    assert len(inquiries) == 2  # entries with an image are passed over
    assert inquiries[0]["input_ids"].tolist() == render_inquiry(tok, "Hi?", "vicuna_v1")[:190]
    batch = next(batches(inquiries, 2, seed=0, epoch=0))
    assert "labels" not in batch and batch["pixel_values"] is None
    assert batch["attention_mask"].sum(1).tolist() == [len(inquiries[i]["input_ids"]) for i in
                                                      np.random.default_rng([0, 0]).permutation(2)]
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.pad_id).all()
    with pytest.raises(DataError, match="no text-only entry"):
        TextOnlyInquiries(write(tmp_path / "i.json", GOOD[:1]), tok, "vicuna_v1")


def _one_image_entry(tmp_path: Path, image: str) -> Path:
    return write(tmp_path / "one.json", [GOOD[1], {"id": "x", "image": image,
                                                   "conversations": [turn("human", "x"), turn("gpt", "y")]}])


def test_a_truncated_image_is_caught_at_validation_and_skip_bad_covers_it(tmp_path: Path, tok: Tokenizer,
                                                                          images: Path) -> None:
    whole = (images / "wide.png").read_bytes()
    (images / "cut.png").write_bytes(whole[: len(whole) // 2])  # the header parses; decoding fails
    path = _one_image_entry(tmp_path, "cut.png")
    with pytest.raises(DataError, match=r"entry 1 \(id 'x'\): image .*cut.png cannot be read") as error:
        dataset(path, tok, images)
    assert error.value.reason == "unreadable_image"
    assert dataset(path, tok, images, skip_bad=True).summary()["unreadable_image"] == 1


def test_a_decompression_bomb_is_a_counted_bad_entry(tmp_path: Path, tok: Tokenizer, images: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)  # wide.png's 60 pixels are a "bomb" past 2x this limit
    path = _one_image_entry(tmp_path, "wide.png")
    with pytest.raises(DataError, match="DecompressionBomb"):
        dataset(path, tok, images)
    ds = dataset(write(tmp_path / "two.json", [GOOD[1], json.loads(path.read_text())[1]]), tok, images, skip_bad=True)
    assert len(ds) == 1 and ds.summary()["unreadable_image"] == 1


def test_a_symlink_out_of_the_image_folder_is_not_followed(tmp_path: Path, tok: Tokenizer, images: Path) -> None:
    outside = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(outside)
    (images / "link.png").symlink_to(outside)
    with pytest.raises(DataError, match=r"link.png links to .*secret.png, outside the image folder") as error:
        dataset(_one_image_entry(tmp_path, "link.png"), tok, images)
    assert error.value.reason == "image_outside_folder"


# ---------------------------------------------------------------- images of every depth, and thin strips (issue 30)

def test_16_bit_and_float_images_are_read_by_their_real_range(tmp_path: Path) -> None:
    values = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    eight_bit = Image.fromarray(np.round(values * 255).astype(np.uint8), mode="L")
    Image.fromarray(np.round(values * 65535).astype(np.uint16)).save(tmp_path / "deep.png")  # 16-bit grey
    Image.fromarray(values.astype(np.float32), mode="F").save(tmp_path / "float.tiff")
    expected = preprocess_image(eight_bit, 16)
    for name in ("deep.png", "float.tiff"):
        with Image.open(tmp_path / name) as image:
            assert image.mode in ("I;16", "I", "F"), image.mode
            clipped = preprocess_image(image.convert("RGB"), 16)  # PIL's own conversion: white or black
        assert (clipped - expected).abs().max() > 1.0, name
        torch.testing.assert_close(load_image(tmp_path / name, 16), expected, atol=0.02, rtol=0), name


def test_images_without_a_range_to_read_are_refused(tmp_path: Path) -> None:
    Image.fromarray(np.full((8, 8), 2.5, dtype=np.float32), mode="F").save(tmp_path / "hdr.tiff")
    Image.fromarray(np.full((8, 8), 70000, dtype=np.int32), mode="I").save(tmp_path / "wide.tiff")
    with pytest.raises(DataError, match=r"hdr.tiff cannot be read \(float pixels outside \[0, 1\]"):
        load_image(tmp_path / "hdr.tiff", 16)
    with pytest.raises(DataError, match=r"wide.tiff cannot be read \(I pixels from 70000 to 70000: beyond 16 bits"):
        load_image(tmp_path / "wide.tiff", 16)


@pytest.mark.parametrize("width", [60000, 20000])
def test_a_thin_strip_that_pads_to_a_huge_square_is_refused_before_padding(tmp_path: Path, width: int) -> None:
    Image.new("L", (width, 1)).save(tmp_path / "strip.png")
    assert (tmp_path / "strip.png").stat().st_size < 1000  # a tiny file that would ask for a 4e8 to 3.6e9-pixel canvas
    with pytest.raises(DataError, match=f"a {width}x1 image pads to a {width}x{width} square, over the 89,478,485 "
                                        "pixels"):
        load_image(tmp_path / "strip.png", 16)
    Image.new("L", (4000, 3)).save(tmp_path / "wide_but_fine.png")  # 16e6 pixels once square: allowed
    assert load_image(tmp_path / "wide_but_fine.png", 16).shape == (3, 16, 16)


def test_a_lone_surrogate_is_bad_data_that_skip_bad_counts(tmp_path: Path, tok: Tokenizer, images: Path) -> None:
    surrogate = ('{"id": "s", "conversations": [{"from": "human", "value": "Hi \\ud800?"}, '
                 '{"from": "gpt", "value": "Ok."}]}')
    path = write(tmp_path / "d.jsonl", [json.dumps(r) for r in GOOD] + [surrogate])
    with pytest.raises(DataError, match=r"d\.jsonl: line 4 \(id 's'\): turn 0 holds a lone surrogate '\\ud800' at "
                                        "character 3, which is not Unicode text") as error:
        dataset(path, tok, images)
    assert error.value.reason == "bad_text"
    ds = dataset(path, tok, images, skip_bad=True)
    assert len(ds) == 3 and ds.summary()["bad_text"] == 1


def test_a_lone_surrogate_in_an_nl_benchmark_names_its_line(tmp_path: Path) -> None:
    from mllm_cl.evaluation import EvalDataError
    from mllm_cl.evaluation_nl import read_nl_documents

    (tmp_path / "nl.jsonl").write_text('{"id": "a", "kind": "multiple_choice", "gold": 0, '
                                       '"requests": [["Q", " yes"], ["Q", " n\\udc80o"]]}\n')
    with pytest.raises(EvalDataError, match=r"nl\.jsonl, line 1: its text holds a lone surrogate '\\udc80'"):
        read_nl_documents(tmp_path / "nl.jsonl")
