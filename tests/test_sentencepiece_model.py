"""SentencePiece tokenizer.model read by hand: tiny models trained here with the sentencepiece library (LLaMA's
trainer settings), read back and compared with protobuf's own parser, with transformers' LlamaTokenizer built
from the same file, and with sentencepiece's own encoder."""

import io
import json
import random
import struct
from pathlib import Path

import pytest
import sentencepiece
from sentencepiece import sentencepiece_model_pb2
from tokenizers import Tokenizer as BackendTokenizer
from transformers import LlamaTokenizer

from mllm_cl.sentencepiece_model import NormalizerSpec, Piece, TrainerSpec, read_sentencepiece_model
from mllm_cl.tokenizer import TokenizerError, load_tokenizer, write_tokenizer_json

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards read old books about tokenizers and models "
         "café naïve über façade résumé 東京 日本語 学生 2024 31 415 hello world").split()
PUNCTUATION = [",", ".", ";", ":", "!", "?", "(", ")", "-"]

# What LLaMA's tokenizer.model records (its trainer_spec and normalizer_spec), at a few hundred pieces.
LLAMA_TRAINER = dict(model_type="bpe", vocab_size=400, byte_fallback=True, split_digits=True,
                     normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
                     allow_whitespace_only_pieces=True, split_by_unicode_script=True, split_by_number=True,
                     split_by_whitespace=True, treat_whitespace_as_suffix=False, character_coverage=0.99995,
                     max_sentencepiece_length=16, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
                     minloglevel=2)
VICUNA_CONFIG = {"legacy": False, "add_bos_token": True, "add_eos_token": False, "tokenizer_class": "LlamaTokenizer",
                 "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None}

TEXTS = ["", " ", "  ", "hello world", " leading", "  two leading", "trailing ", "trailing  ", "a  b   c", "\n",
         "line one\nline two\n\n", "tab\tseparated", "\t\tindent", "digits 12345 and 3.14", "007 1000000",
         "punctuation: a, b; c! (d)? [e] {f} \"g\" 'h'", "café naïve über FAÇADE", "東京 日本語 学生",
         "emoji 🙂👍 end", "Ωmega ψ unseen ∑ ñ ß", "<s>", "</s>", "text <s> inside </s> here", "<unk>",
         "\u2581literal metaspace", "QUICK Brown Fox", "x" * 40, "mixed 東京2024café!"]
BYTE_IDS = range(3, 3 + 256)  # <0x00>..<0xFF> come right after <unk> <s> </s>


def corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(1500):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.3:
            words[-1] += rng.choice(PUNCTUATION)
        lines.append(" ".join(words))
    return lines + ["  indented line\twith a tab", "trailing   spaces   ", "brackets [a] {b} \"c\" 'd'"] * 20


def train(folder: Path, config: dict | None = None, **overrides) -> Path:
    """folder/tokenizer.model trained on `corpus()` with LLAMA_TRAINER + overrides, and tokenizer_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_writer=model,
                                             **{**LLAMA_TRAINER, **overrides})
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def reference(folder: Path, **kwargs) -> LlamaTokenizer:
    """transformers' tokenizer from the folder; "<s>" in text stays text, as in our Tokenizer."""
    return LlamaTokenizer.from_pretrained(str(folder), split_special_tokens=True, **kwargs)


def processor(folder: Path) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))


@pytest.fixture(scope="module")
def llama_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(tmp_path_factory.mktemp("llama"))


def with_config(model_folder: Path, folder: Path, config: dict | None = None, **files: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes((model_folder / "tokenizer.model").read_bytes())
    files = {**({"tokenizer_config": config} if config is not None else {}), **files}
    for name, content in files.items():
        (folder / f"{name}.json").write_text(json.dumps(content))
    return folder


# ---------------------------------------------------------------- the protobuf reader

def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def assert_same_as_protobuf(path: Path) -> None:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    ours = read_sentencepiece_model(path)
    assert [(p.piece, p.score, p.type) for p in ours.pieces] == [(p.piece, p.score, p.type) for p in proto.pieces]
    for spec, cls, proto_spec in ((ours.trainer_spec, TrainerSpec, proto.trainer_spec),
                                  (ours.normalizer_spec, NormalizerSpec, proto.normalizer_spec),
                                  (ours.denormalizer_spec, NormalizerSpec, proto.denormalizer_spec)):
        for name in cls.__dataclass_fields__:
            assert getattr(spec, name) == getattr(proto_spec, name), name


def test_reader_equals_protobuf_on_a_trained_model(llama_model: Path) -> None:
    assert_same_as_protobuf(llama_model / "tokenizer.model")
    model = read_sentencepiece_model(llama_model / "tokenizer.model")
    assert model.trainer_spec.pad_id == -1 and model.trainer_spec.byte_fallback  # a negative int32, a bool
    assert model.normalizer_spec.name == "identity" and not model.normalizer_spec.remove_extra_whitespaces
    assert len(model.pieces) == 400 and model.pieces[3] == Piece("<0x00>", 0.0, 6)


def test_reader_defaults_unknown_fields_and_merged_messages(tmp_path: Path) -> None:
    """Absent fields take the .proto's defaults; unknown fields of every wire type are skipped; a message given
    twice is merged field by field. protobuf itself parses the same bytes as the reference."""
    proto = sentencepiece_model_pb2.ModelProto()
    for piece, kind in (("<unk>", 2), ("a", 1), ("▁b", 1)):
        proto.pieces.add(piece=piece, score=-1.5, type=kind)
    data = proto.SerializeToString()
    data += varint(99 << 3 | 0) + varint(150) + varint(98 << 3 | 1) + struct.pack("<d", 2.5)  # unknown fields
    data += varint(97 << 3 | 5) + struct.pack("<f", 1.0) + varint(96 << 3 | 2) + varint(3) + b"abc"
    for trainer in (sentencepiece_model_pb2.TrainerSpec(model_type=2, bos_id=7),
                    sentencepiece_model_pb2.TrainerSpec(eos_id=-5, unk_piece="[UNK]")):
        raw = trainer.SerializeToString()
        data += varint(2 << 3 | 2) + varint(len(raw)) + raw  # ModelProto.trainer_spec, twice
    (tmp_path / "tokenizer.model").write_bytes(data)
    assert_same_as_protobuf(tmp_path / "tokenizer.model")
    model = read_sentencepiece_model(tmp_path / "tokenizer.model")
    assert (model.trainer_spec.model_type, model.trainer_spec.bos_id, model.trainer_spec.eos_id) == (2, 7, -5)
    assert model.normalizer_spec.add_dummy_prefix and model.normalizer_spec.remove_extra_whitespaces  # defaults


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not a model"])
def test_malformed_file_gives_error_naming_it(llama_model: Path, tmp_path: Path, damage: str) -> None:
    data = (llama_model / "tokenizer.model").read_bytes()
    content = {"truncated": data[:len(data) // 2], "garbage": random.Random(0).randbytes(3000), "empty": b"",
               "not a model": b'{"model": {"type": "BPE"}}'}[damage]
    (tmp_path / "tokenizer.model").write_bytes(content)
    with pytest.raises(TokenizerError, match=str(tmp_path / "tokenizer.model")):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------- the tokenizer against transformers and sentencepiece

@pytest.mark.parametrize("legacy", [False, True])
def test_ids_and_decode_equal_transformers(llama_model: Path, tmp_path: Path, legacy: bool) -> None:
    folder = with_config(llama_model, tmp_path, {**VICUNA_CONFIG, "legacy": legacy})
    ours, ref = load_tokenizer(folder), reference(folder)
    assert json.loads(ours.backend.to_str()) == json.loads(ref.backend_tokenizer.to_str())
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        with_specials = [ours.bos_id, *ids, 0, ours.eos_id]
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
        assert ours.decode(with_specials) == ref.decode(with_specials, skip_special_tokens=True), text
        assert ours.decode(with_specials, skip_special=False) == ref.decode(with_specials), text
    assert any(i in BYTE_IDS for text in TEXTS for i in ours.encode(text))  # byte fallback fired
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.eos_token_id)
    sp = processor(folder)
    assert (ours.bos_id, ours.eos_id, ours.token_to_id("<unk>")) == (sp.bos_id(), sp.eos_id(), sp.unk_id()) == \
        (1, 2, 0)


def test_ids_equal_sentencepiece_where_transformers_does(llama_model: Path, tmp_path: Path) -> None:
    """transformers differs from sentencepiece only on text that starts with a space (its Metaspace does not add a
    second "▁" before one): there we follow transformers; everywhere else all three agree."""
    folder = with_config(llama_model, tmp_path, VICUNA_CONFIG)
    ours, ref, sp = load_tokenizer(folder), reference(folder), processor(folder)
    disagree = [text for text in TEXTS if ref.encode(text, add_special_tokens=False) != sp.encode(text)]
    assert disagree == [text for text in TEXTS if text.startswith((" ", "\u2581"))]
    for text in TEXTS:
        if text not in disagree:
            assert ours.encode(text) == sp.encode(text), text
            assert ours.decode(ours.encode(text)) == sp.decode(sp.encode(text)), text


def test_user_defined_symbols_and_legacy(tmp_path: Path) -> None:
    """A USER_DEFINED piece is always one token; `legacy` decides whether the text after it gets a "▁"."""
    model = train(tmp_path / "model", user_defined_symbols=["<image>"])
    texts = ["a<image>b", "<image> describe", "look: <image>\nwhat is it?", "<image><image>"]
    for legacy in (False, True):
        folder = with_config(model, tmp_path / f"legacy_{legacy}", {**VICUNA_CONFIG, "legacy": legacy})
        ours, ref = load_tokenizer(folder), reference(folder)
        image = ours.token_to_id("<image>")
        for text in texts:
            assert ours.encode(text) == ref.encode(text, add_special_tokens=False), (legacy, text)
            assert ours.decode(ours.encode(text)) == ref.decode(ours.encode(text)), (legacy, text)
        assert ours.encode("a<image>b").count(image) == 1
        if not legacy:  # sentencepiece also writes a "▁" before a symbol that starts the text; transformers not
            sp = processor(folder)
            assert [text for text in texts if ours.encode(text) != sp.encode(text)] == \
                [text for text in texts if text.startswith("<image>")]
    assert load_tokenizer(tmp_path / "legacy_True").encode("a<image>b") != \
        load_tokenizer(tmp_path / "legacy_False").encode("a<image>b")


def test_no_dummy_prefix(tmp_path: Path) -> None:
    """add_dummy_prefix false (and no add_prefix_space in the config): no "▁" is prepended, as sentencepiece does."""
    folder = train(tmp_path, add_dummy_prefix=False)
    ours, sp = load_tokenizer(folder), processor(folder)
    ref = reference(folder, add_prefix_space=False)
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False) == sp.encode(text), text
        assert ours.decode(ours.encode(text)) == ref.decode(ours.encode(text)), text


# ---------------------------------------------------------------- folders, special ids, conversion, refusals

def test_folder_with_only_tokenizer_model(llama_model: Path, tmp_path: Path) -> None:
    folder = with_config(llama_model, tmp_path)  # no config file: ids from the trainer_spec, pad falls back to eos
    ours, ref = load_tokenizer(folder), reference(folder)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 2) and ours.source.endswith("tokenizer.model")
    assert [ours.encode(text) for text in TEXTS] == [ref.encode(text, add_special_tokens=False) for text in TEXTS]
    assert load_tokenizer(folder / "tokenizer.model").eos_id == 2  # the file itself works too


def test_special_ids_from_config_files(llama_model: Path, tmp_path: Path) -> None:
    folder = with_config(llama_model, tmp_path / "llava", VICUNA_CONFIG, special_tokens_map={"pad_token": "<unk>"})
    assert load_tokenizer(folder).pad_id == 0  # LLaVA-1.5 pads with <unk>
    folder = with_config(llama_model, tmp_path / "ids", generation_config={"eos_token_id": 5})
    assert load_tokenizer(folder).eos_id == 5
    folder = with_config(llama_model, tmp_path / "bad", {"eos_token": "<|eot|>"})
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json names eos_token '<\|eot\|>'.*tokenizer\.model"):
        load_tokenizer(folder)
    folder = with_config(llama_model, tmp_path / "added", {"added_tokens_decoder": {"400": {"content": "<image>"}}})
    with pytest.raises(TokenizerError, match=r"adds token '<image>' as id 400"):
        load_tokenizer(folder)
    folder = with_config(llama_model, tmp_path / "flag", {"legacy": "no"})
    with pytest.raises(TokenizerError, match=r"\"legacy\" must be true or false"):
        load_tokenizer(folder)


def test_write_tokenizer_json(llama_model: Path, tmp_path: Path) -> None:
    source = with_config(llama_model, tmp_path / "source", VICUNA_CONFIG)
    out = write_tokenizer_json(source, tmp_path / "converted")
    assert out == tmp_path / "converted" / "tokenizer.json"
    assert json.loads(BackendTokenizer.from_file(str(out)).to_str()) == \
        json.loads(reference(source).backend_tokenizer.to_str())
    ours, converted = load_tokenizer(source), load_tokenizer(out)
    assert [converted.encode(text) for text in TEXTS] == [ours.encode(text) for text in TEXTS]
    assert (converted.bos_id, converted.eos_id) == (1, 2)
    named = write_tokenizer_json(source / "tokenizer.model", tmp_path / "staging" / "tokenizer.json")
    assert named.read_text() == out.read_text()  # the file itself, as bin_weights.convert_bin_folder passes it


REFUSED = [
    ({"model_type": "unigram"}, "is a UNIGRAM model", "hello world"),
    ({"normalization_rule_name": "nmt_nfkc"}, "has a normalization rule", "ｆｕｌｌ ｗｉｄｔｈ ①"),
    ({"remove_extra_whitespaces": True}, "sets normalizer_spec.remove_extra_whitespaces", "a  b   c"),
    ({"byte_fallback": False}, "has byte_fallback off", "unseen ∑"),
]


@pytest.mark.parametrize("overrides, message, text", REFUSED, ids=[m for _, m, _ in REFUSED])
def test_models_transformers_misreads_are_refused(tmp_path: Path, overrides: dict, message: str, text: str) -> None:
    """Each of these tokenizes `text` differently in transformers' LlamaTokenizer and in sentencepiece: refused."""
    folder = train(tmp_path, VICUNA_CONFIG, hard_vocab_limit=False, **overrides)  # a unigram stops short of 400
    ref, sp = reference(folder), processor(folder)
    assert ref.encode(text, add_special_tokens=False) != sp.encode(text)
    with pytest.raises(TokenizerError, match=rf"tokenizer\.model {message}"):
        load_tokenizer(folder)


def unused_piece(proto) -> None:
    proto.pieces[300].type = 5


def no_byte_piece(proto) -> None:
    proto.pieces[3].type = 1


def whitespace_suffix(proto) -> None:
    proto.trainer_spec.treat_whitespace_as_suffix = True


def no_escape(proto) -> None:
    proto.normalizer_spec.escape_whitespaces = False


@pytest.mark.parametrize("edit, message", [(unused_piece, "has UNUSED pieces"),
                                           (no_byte_piece, "has byte_fallback on but not the 256"),
                                           (whitespace_suffix, "sets trainer_spec.treat_whitespace_as_suffix"),
                                           (no_escape, "clears normalizer_spec.escape_whitespaces")])
def test_edited_models_are_refused(llama_model: Path, tmp_path: Path, edit, message: str) -> None:
    """Settings the trainer cannot combine with LLaMA's, set in the model file with protobuf."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((llama_model / "tokenizer.model").read_bytes())
    edit(proto)
    (tmp_path / "tokenizer.model").write_bytes(proto.SerializeToString())
    with pytest.raises(TokenizerError, match=rf"tokenizer\.model {message}"):
        load_tokenizer(tmp_path)
