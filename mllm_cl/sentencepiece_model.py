"""Read a SentencePiece `tokenizer.model` by hand and rebuild it as the `tokenizers` BPE that transformers makes.

The file is a serialized protobuf `sentencepiece.ModelProto`; the fields read here, with their numbers and defaults,
are those of https://github.com/google/sentencepiece/blob/master/src/sentencepiece_model.proto (the same as the
`sentencepiece_model_pb2` module that sentencepiece 0.2.3 ships). Protobuf's wire format
(https://protobuf.dev/programming-guides/encoding/): each field is a varint key `number << 3 | wire_type`, then
a varint (0), 8 bytes (1), a varint length and that many bytes (2: strings, bytes, nested messages) or 4 bytes (5).

`llama_tokenizer` follows transformers 5.23's `LlamaTokenizer` built from such a file (models/llama/
tokenization_llama.py, with `SentencePieceExtractor` and `generate_merges` of convert_slow_tokenizer.py and
tokenization_utils_base.py). What that build cannot reproduce (a Unigram model, a normalization rule, ...) is
refused by `check_llama_compatible` with the difference named.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from mllm_cl.errors import UserError

VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5
MAX_VARINT_BYTES = 10

# TrainerSpec.ModelType and ModelProto.SentencePiece.Type.
MODEL_TYPES = {1: "UNIGRAM", 2: "BPE", 3: "WORD", 4: "CHAR"}
UNIGRAM, BPE_TYPE = 1, 2
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPACE = "\u2581"  # "▁", SentencePiece's escaped whitespace


class SentencePieceError(UserError, ValueError):
    """A tokenizer.model that is malformed, or that holds a tokenizer this module does not rebuild faithfully."""


@dataclass(frozen=True)
class Piece:
    """ModelProto.SentencePiece."""
    piece: str = ""
    score: float = 0.0
    type: int = NORMAL


@dataclass(frozen=True)
class TrainerSpec:
    """The TrainerSpec fields that change how text is encoded or which ids are special. The others are training
    settings, or (unk_surface, how SentencePiece prints <unk>) unused by transformers' LlamaTokenizer."""
    model_type: int = UNIGRAM
    treat_whitespace_as_suffix: bool = False
    byte_fallback: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    unk_piece: str = "<unk>"
    bos_piece: str = "<s>"
    eos_piece: str = "</s>"
    pad_piece: str = "<pad>"


@dataclass(frozen=True)
class NormalizerSpec:
    """NormalizerSpec (also the type of ModelProto.denormalizer_spec)."""
    name: str = ""
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


# field number -> (attribute, value kind) of each message; fields not listed are skipped.
PIECE_FIELDS = {1: ("piece", "string"), 2: ("score", "float"), 3: ("type", "enum")}
TRAINER_SPEC_FIELDS = {3: ("model_type", "enum"), 24: ("treat_whitespace_as_suffix", "bool"),
                       35: ("byte_fallback", "bool"), 40: ("unk_id", "int32"), 41: ("bos_id", "int32"),
                       42: ("eos_id", "int32"), 43: ("pad_id", "int32"), 45: ("unk_piece", "string"),
                       46: ("bos_piece", "string"), 47: ("eos_piece", "string"), 48: ("pad_piece", "string")}
NORMALIZER_SPEC_FIELDS = {1: ("name", "string"), 2: ("precompiled_charsmap", "bytes"),
                          3: ("add_dummy_prefix", "bool"), 4: ("remove_extra_whitespaces", "bool"),
                          5: ("escape_whitespaces", "bool")}
KIND_WIRE_TYPES = {"string": LENGTH_DELIMITED, "bytes": LENGTH_DELIMITED, "float": FIXED32, "enum": VARINT,
                   "bool": VARINT, "int32": VARINT}
PIECES, TRAINER, NORMALIZER, DENORMALIZER = 1, 2, 3, 5  # ModelProto's fields


@dataclass(frozen=True)
class SentencePieceModel:
    """The parts of a ModelProto that decide tokenization: `pieces` (id = position) and the two specs."""
    path: Path
    pieces: tuple[Piece, ...]
    trainer_spec: TrainerSpec
    normalizer_spec: NormalizerSpec
    denormalizer_spec: NormalizerSpec


class _WireReader:
    """Splits one serialized message into its fields; errors name the file and the byte (`base`: where the
    message starts in the file)."""

    def __init__(self, data: bytes, path: Path, what: str, base: int = 0) -> None:
        self.data, self.path, self.what, self.base = data, path, what, base

    def error(self, pos: int, problem: str) -> SentencePieceError:
        return SentencePieceError(f"{self.path} is not a valid SentencePiece model: {self.what} at byte "
                                  f"{self.base + pos} {problem} (a truncated or foreign file: copy tokenizer.model "
                                  f"again)")

    def varint(self, pos: int) -> tuple[int, int]:
        value = 0
        for i in range(MAX_VARINT_BYTES):
            if pos + i >= len(self.data):
                raise self.error(pos, "ends inside a varint")
            byte = self.data[pos + i]
            value |= (byte & 0x7F) << (7 * i)
            if byte < 0x80:
                return value, pos + i + 1
        raise self.error(pos, f"has a varint longer than {MAX_VARINT_BYTES} bytes")

    def take(self, pos: int, n: int) -> tuple[bytes, int]:
        if pos + n > len(self.data):
            raise self.error(pos, f"needs {n} bytes, {len(self.data) - pos} are left")
        return self.data[pos:pos + n], pos + n

    def fields(self) -> list[tuple[int, int, int | bytes, int]]:
        """(number, wire type, value, offset of the value): ints for varints, bytes for the others."""
        out, pos = [], 0
        while pos < len(self.data):
            key, start = self.varint(pos)
            number, wire_type = key >> 3, key & 7
            if number == 0:
                raise self.error(pos, "has field number 0")
            if wire_type == VARINT:
                value, end = self.varint(start)
            elif wire_type in (FIXED64, FIXED32):
                value, end = self.take(start, 8 if wire_type == FIXED64 else 4)
            elif wire_type == LENGTH_DELIMITED:
                n, start = self.varint(start)
                value, end = self.take(start, n)
            else:  # 3 and 4 are proto2 groups, which sentencepiece_model.proto does not use
                raise self.error(pos, f"has wire type {wire_type} (field {number})")
            out.append((number, wire_type, value, start))
            pos = end
        return out


def _decode(data: bytes, path: Path, what: str, base: int, schema: dict[int, tuple[str, str]], cls: type) -> Any:
    """A `cls` from one message: the last occurrence of a field wins, absent fields keep their defaults."""
    reader = _WireReader(data, path, what, base)
    values: dict[str, Any] = {}
    for number, wire_type, raw, offset in reader.fields():
        if number not in schema:
            continue
        name, kind = schema[number]
        if wire_type != KIND_WIRE_TYPES[kind]:
            raise reader.error(offset, f"has field {name} ({number}) with wire type {wire_type}, not "
                                       f"{KIND_WIRE_TYPES[kind]}")
        values[name] = _value(kind, raw, reader, offset, name)
    return cls(**values)


def _value(kind: str, raw: int | bytes, reader: _WireReader, offset: int, name: str) -> Any:
    if kind == "string":
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise reader.error(offset, f"has field {name} that is not UTF-8") from None
    if kind == "bytes":
        return bytes(raw)
    if kind == "float":
        return struct.unpack("<f", raw)[0]
    if kind == "bool":
        return raw != 0
    value = raw & 0xFFFFFFFF  # int32 and enums: negative values are sign-extended to 64 bits on the wire
    return value - (1 << 32) if value >= 1 << 31 else value


def read_sentencepiece_model(path: str | Path) -> SentencePieceModel:
    """Parse `path` (a SentencePiece ModelProto) into a `SentencePieceModel`; a malformed file raises
    SentencePieceError naming it."""
    path = Path(path)
    data = path.read_bytes()
    reader = _WireReader(data, path, "ModelProto")
    pieces, specs, starts = [], {TRAINER: b"", NORMALIZER: b"", DENORMALIZER: b""}, {}
    for number, wire_type, raw, offset in reader.fields():
        if number in (PIECES, *specs) and wire_type != LENGTH_DELIMITED:
            raise reader.error(offset, f"has field {number} with wire type {wire_type}, not a message")
        if number == PIECES:
            pieces.append(_decode(raw, path, f"piece #{len(pieces)}", offset, PIECE_FIELDS, Piece))
        elif number in specs:
            specs[number] += raw  # a message field given twice is merged, as protobuf does by concatenation
            starts.setdefault(number, offset)
    if not pieces:
        raise SentencePieceError(f"{path} holds no vocabulary pieces: it is not a SentencePiece tokenizer.model")

    def spec(number: int, what: str, schema: dict[int, tuple[str, str]], cls: type) -> Any:
        return _decode(specs[number], path, what, starts.get(number, 0), schema, cls)

    model = SentencePieceModel(path, tuple(pieces), spec(TRAINER, "trainer_spec", TRAINER_SPEC_FIELDS, TrainerSpec),
                               spec(NORMALIZER, "normalizer_spec", NORMALIZER_SPEC_FIELDS, NormalizerSpec),
                               spec(DENORMALIZER, "denormalizer_spec", NORMALIZER_SPEC_FIELDS, NormalizerSpec))
    _check_pieces(model)
    return model


def _check_pieces(model: SentencePieceModel) -> None:
    """What SentencePiece's own loader (model_interface.cc) rejects: empty or repeated pieces, unknown types."""
    seen: dict[str, int] = {}
    for i, piece in enumerate(model.pieces):
        if not piece.piece:
            raise SentencePieceError(f"{model.path}: piece #{i} is empty; the file is damaged")
        if piece.piece in seen:
            raise SentencePieceError(f"{model.path}: piece {piece.piece!r} appears twice (#{seen[piece.piece]} "
                                     f"and #{i}); the file is damaged")
        if piece.type not in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE):
            raise SentencePieceError(f"{model.path}: piece #{i} {piece.piece!r} has unknown type {piece.type}")
        seen[piece.piece] = i


def check_llama_compatible(model: SentencePieceModel) -> None:
    """Raise SentencePieceError naming the first setting of `model` that transformers' LlamaTokenizer (and so
    `llama_tokenizer`) would not reproduce: there SentencePiece's own encoding and ours would differ."""
    trainer, normalizer = model.trainer_spec, model.normalizer_spec
    problem = ""
    if trainer.model_type != BPE_TYPE:
        name = MODEL_TYPES.get(trainer.model_type, str(trainer.model_type))
        problem = f"is a {name} model; only BPE models (LLaMA's kind) are rebuilt"
    elif normalizer.precompiled_charsmap or model.denormalizer_spec.precompiled_charsmap:
        which = "normalizer_spec" if normalizer.precompiled_charsmap else "denormalizer_spec"
        problem = (f"has a normalization rule ({which}.name = {getattr(model, which).name!r}, a precompiled "
                   f"charsmap); only the 'identity' normalizer is rebuilt")
    elif normalizer.remove_extra_whitespaces:
        problem = "sets normalizer_spec.remove_extra_whitespaces (collapse runs of spaces), which is not rebuilt"
    elif not normalizer.escape_whitespaces:
        problem = "clears normalizer_spec.escape_whitespaces (spaces not written as '▁'), which is not rebuilt"
    elif trainer.treat_whitespace_as_suffix:
        problem = "sets trainer_spec.treat_whitespace_as_suffix ('▁' after words), which is not rebuilt"
    elif not trainer.byte_fallback:
        problem = "has byte_fallback off (unknown characters become <unk>), which is not rebuilt"
    elif sum(p.type == UNKNOWN for p in model.pieces) != 1:
        problem = f"holds {sum(p.type == UNKNOWN for p in model.pieces)} pieces of type UNKNOWN, not one"
    elif {p.piece for p in model.pieces if p.type == BYTE} != {f"<0x{b:02X}>" for b in range(256)}:
        problem = "has byte_fallback on but not the 256 byte pieces <0x00>..<0xFF>"
    elif any(p.type == UNUSED for p in model.pieces):
        unused = next(p.piece for p in model.pieces if p.type == UNUSED)
        problem = f"has UNUSED pieces (e.g. {unused!r}), which SentencePiece never emits but a BPE would"
    if problem:
        raise SentencePieceError(f"{model.path} {problem}; use a model folder that ships a tokenizer.json")


def bpe_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """The BPE merges implied by a SentencePiece BPE vocabulary, as transformers' `generate_merges`: every split
    of a piece into two pieces, ranked by the id of the merged piece (SentencePiece orders pieces by merge
    priority: score 0, -1, -2, ...), then by the length of the left part."""
    merges = []
    for piece, piece_id in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((piece_id, len(left), len(right), left, right))
    return [(left, right) for *_, left, right in sorted(merges)]


def llama_tokenizer(model: SentencePieceModel, legacy: bool = False, add_prefix_space: bool | None = None,
                    special_tokens: Iterable[str] = (), bos_token: str | None = None, eos_token: str | None = None,
                    add_bos_token: bool = False, add_eos_token: bool = False) -> Tokenizer:
    """The `tokenizers.Tokenizer` transformers' LlamaTokenizer builds from `model` (tokenizer_config.json's
    `legacy`, `add_prefix_space`, `add_bos_token`, `add_eos_token`): a byte-fallback BPE, no normalizer, a
    Metaspace pre-tokenizer that writes spaces as "▁" and prepends one to the text ("first" piece of text only,
    or after every added token when `legacy`), and the decoder that undoes it.

    `special_tokens` are pieces to mark special besides the CONTROL ones and the unknown piece (the bos/eos/pad
    named by the config files); USER_DEFINED pieces are added tokens that are not special. `add_prefix_space`
    None takes the model's `add_dummy_prefix`. bos/eos default to the pieces trainer_spec names.
    """
    check_llama_compatible(model)
    add_prefix_space = model.normalizer_spec.add_dummy_prefix if add_prefix_space is None else add_prefix_space
    vocab = {p.piece: i for i, p in enumerate(model.pieces)}
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=bpe_merges(vocab), fuse_unk=True, byte_fallback=True,
                              dropout=None))
    prepend_scheme = ("always" if legacy else "first") if add_prefix_space else "never"
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme=prepend_scheme,
                                                       split=False)
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1))
    tokenizer.decoder = decoders.Sequence(steps)

    named = {token for token in (bos_token, eos_token) if token is not None}
    special = set(special_tokens) | named | {p.piece for p in model.pieces if p.type in (CONTROL, UNKNOWN)}
    for token in special:
        if token not in vocab:
            raise SentencePieceError(f"special token {token!r} is not a piece of {model.path}")
    added = sorted((vocab[p.piece], p.piece) for p in model.pieces if p.piece in special or p.type == USER_DEFINED)
    tokenizer.add_tokens([AddedToken(piece, special=piece in special, normalized=False) for _, piece in added])

    recorded = {name: model.pieces[i].piece for name, i in recorded_special_ids(model).items() if i is not None}
    bos = bos_token if bos_token is not None else recorded.get("bos")
    eos = eos_token if eos_token is not None else recorded.get("eos")
    tokenizer.post_processor = _post_processor(vocab, bos if add_bos_token else None, eos if add_eos_token else None)
    return tokenizer


def recorded_special_ids(model: SentencePieceModel) -> dict[str, int | None]:
    """bos/eos/unk/pad ids as trainer_spec records them (-1, "not used", and ids past the vocab become None)."""
    ids = {}
    for name in ("bos", "eos", "unk", "pad"):
        token_id = getattr(model.trainer_spec, f"{name}_id")
        ids[name] = token_id if 0 <= token_id < len(model.pieces) else None
    return ids


def _post_processor(vocab: dict[str, int], bos: str | None, eos: str | None) -> processors.TemplateProcessing:
    """transformers' `update_post_processor`: "[bos] $A [eos]" and "[bos] $A [bos] $B [eos]" (pair marks 1)."""
    single = " ".join(([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else []))
    pair = " ".join([single] + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else []))
    specials = [(token, vocab[token]) for token in (bos, eos) if token]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
