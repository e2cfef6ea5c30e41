"""Chat templates, and the rendering of a conversation into token ids and labels built together.

Following nanochat's `render_conversation`, every piece of a conversation is appended to `ids` and to
`labels` at the same time, so the two can never drift apart (LLaVA builds its mask afterwards by offset
arithmetic and, when that goes wrong, silently trains on nothing). Labels are aligned with the ids
(label[i] = ids[i] where supervised, else IGNORE_INDEX); the loss shifts them, as Hugging Face does.

Pieces are tokenized separately and concatenated: a BPE merge never crosses a piece boundary (template
text / image block / answer / special token). Adjacent ignored text is joined into one piece first, and the
answer always starts a new piece, so a generation prompt ends exactly where a training answer begins and
both are tokenized the same way. The cost: "ASSISTANT: yes" tokenizes as "ASSISTANT:" + " yes", which is
what a decoder prompted with "ASSISTANT:" has to produce anyway. (SentencePiece-style tokenizers that
prepend a word-start marker to every encoded text put one at the start of each piece.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mllm_cl.config import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
from mllm_cl.errors import UserError
from mllm_cl.tokenizer import Tokenizer

IMAGE_TOKEN = "<image>"
USER, ASSISTANT = "user", "assistant"
EOS = "{eos}"  # in a template: the tokenizer's own end-of-sequence token

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


class ConversationError(UserError, ValueError):
    """A conversation that cannot be rendered (bad roles, an image block that does not fit, a missing token)."""


@dataclass(frozen=True)
class Template:
    """A chat format as data. In each part, "{text}" is the message, "{system}" the system prompt, and every
    string in `specials` is a special token placed by id (never tokenized from text)."""

    name: str
    specials: tuple[str, ...]
    system: str = ""
    begin: str = ""  # once, before the first turn
    user: str = "{text}"  # one human turn
    assistant: str = ""  # header before every answer; a generation prompt ends with it
    answer: str = "{text}"  # supervised
    answer_end: str = EOS  # supervised: the end-of-turn token
    after_answer: str = ""  # ignored, after the end-of-turn token
    user_text: bool = True  # False: the human text is dropped and only its images kept (`plain`)


TEMPLATES: dict[str, Template] = {
    # LLaVA's alignment stage: <image> caption <eos>, the caption supervised.
    "plain": Template("plain", specials=(EOS,), user_text=False),
    # <s>{system} USER: <image>\n{q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT: {a2}</s>
    "vicuna_v1": Template("vicuna_v1", specials=("<s>", "</s>"), system=VICUNA_SYSTEM, begin="<s>{system} ",
                          user="USER: {text} ", assistant="ASSISTANT:", answer=" {text}", answer_end="</s>"),
    # Paper 1's Pythia format: the same layout with GPT-NeoX's one special token.
    "pythia": Template("pythia", specials=("<|endoftext|>",), system=VICUNA_SYSTEM, begin="<|endoftext|>{system} ",
                       user="USER: {text} ", assistant="ASSISTANT:", answer=" {text}", answer_end="<|endoftext|>"),
    # SmolLM2-Instruct's ChatML.
    "chatml": Template("chatml", specials=("<|im_start|>", "<|im_end|>"), system=SMOLLM_SYSTEM,
                       begin="<|im_start|>system\n{system}<|im_end|>\n", user="<|im_start|>user\n{text}<|im_end|>\n",
                       assistant="<|im_start|>assistant\n", answer="{text}", answer_end="<|im_end|>",
                       after_answer="\n"),
}


def get_template(name: str | Template) -> Template:
    if isinstance(name, Template):
        return name
    if name not in TEMPLATES:
        raise ConversationError(f"unknown chat template {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


@dataclass
class Rendered:
    """One rendered sample: `input_ids` holds IMAGE_PLACEHOLDER_ID where image tokens go."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def num_supervised(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE_INDEX)


# A segment before tokenization: ("text", str, supervised) | ("token", id, supervised) | ("image", None, False).
Segment = tuple[str, object, bool]


def render_conversation(tokenizer: Tokenizer, messages: list[tuple[str, str]], template: str | Template,
                        num_image_tokens: int, max_len: int | None = None) -> Rendered:
    """Render alternating ("user", text), ("assistant", text) turns for training.

    Only the answers and their end-of-turn tokens are supervised. Each `<image>` in a user turn becomes
    `num_image_tokens` image positions. With `max_len`, text is cut from the end; an image block that does
    not fit whole is an error.
    """
    _check_roles(messages, must_end_with=ASSISTANT)
    segments = _segments(get_template(template), messages, tokenizer)
    ids, labels = _tokenize(segments, tokenizer, num_image_tokens)
    if max_len is None or len(ids) <= max_len:
        return Rendered(ids, labels)
    if IMAGE_PLACEHOLDER_ID in ids[max_len:]:
        raise ConversationError(f"the image block ends at position {_last_image_end(ids)} but max_len is "
                                f"{max_len}: raise max_len or use fewer image tokens")
    return Rendered(ids[:max_len], labels[:max_len], truncated=True)


def render_prompt(tokenizer: Tokenizer, messages: list[tuple[str, str]], template: str | Template,
                  num_image_tokens: int) -> list[int]:
    """Ids of a generation prompt: earlier rounds in full, then the last user turn and the assistant header."""
    _check_roles(messages, must_end_with=USER)
    segments = _segments(get_template(template), messages, tokenizer)
    return _tokenize(segments, tokenizer, num_image_tokens)[0]


def render_inquiry(tokenizer: Tokenizer, question: str, template: str | Template) -> list[int]:
    """A text-only question with no answer, as UIR's inquiries are fed to the model (ids only)."""
    if IMAGE_TOKEN in question:
        raise ConversationError(f"an inquiry is text-only but contains {IMAGE_TOKEN!r}: {question[:80]!r}")
    return render_prompt(tokenizer, [(USER, question)], template, num_image_tokens=0)


def _check_roles(messages: list[tuple[str, str]], must_end_with: str) -> None:
    if not messages:
        raise ConversationError("a conversation needs at least one message")
    for i, (role, _) in enumerate(messages):
        expected = USER if i % 2 == 0 else ASSISTANT
        if role != expected:
            raise ConversationError(f"message {i} has role {role!r}, expected {expected!r}: turns alternate "
                                    f"{USER!r}, {ASSISTANT!r}, ... starting with {USER!r}")
    if messages[-1][0] != must_end_with:
        raise ConversationError(f"the last message must be a {must_end_with!r} turn, got {messages[-1][0]!r}")


def _segments(template: Template, messages: list[tuple[str, str]], tokenizer: Tokenizer) -> list[Segment]:
    """The template filled in, as text, special-token and image segments, each marked supervised or not."""
    special_ids = {token: _special_id(token, template, tokenizer) for token in template.specials}
    pattern = re.compile("(" + "|".join(re.escape(s) for s in (*template.specials, "{text}", "{system}")) + ")")

    def fill(part: str, text: str, supervised: bool) -> list[Segment]:
        out: list[Segment] = []
        for piece in pattern.split(part):
            if piece in special_ids:
                out.append(("token", special_ids[piece], supervised))
            elif piece == "{system}":
                out.append(("text", template.system, supervised))
            elif piece == "{text}":
                out += _with_images(text, supervised, keep_text=template.user_text or supervised)
            elif piece:
                out.append(("text", piece, supervised))
        return out

    segments = fill(template.begin, "", False)
    for i, (role, text) in enumerate(messages):
        if role == USER:
            segments += fill(template.user, text, False)
            segments += fill(template.assistant, "", False)
        else:
            if IMAGE_TOKEN in text:
                raise ConversationError(f"message {i} ({ASSISTANT!r}) contains {IMAGE_TOKEN!r}; images go in "
                                        f"{USER!r} turns")
            segments += fill(template.answer, text, True)
            segments += fill(template.answer_end, "", True)
            segments += fill(template.after_answer, "", False)
    return segments


def _with_images(text: str, supervised: bool, keep_text: bool) -> list[Segment]:
    out: list[Segment] = []
    for i, piece in enumerate(text.split(IMAGE_TOKEN)):
        if i > 0:
            out.append(("image", None, False))
        if piece and keep_text:
            out.append(("text", piece, supervised))
    return out


def _tokenize(segments: list[Segment], tokenizer: Tokenizer, num_image_tokens: int) -> tuple[list[int], list[int]]:
    merged: list[Segment] = []  # adjacent text of the same supervision becomes one piece
    for kind, value, supervised in segments:
        if kind == "text" and merged and merged[-1][0] == "text" and merged[-1][2] == supervised:
            merged[-1] = ("text", merged[-1][1] + value, supervised)
        else:
            merged.append((kind, value, supervised))
    ids: list[int] = []
    labels: list[int] = []
    for kind, value, supervised in merged:
        if kind == "text":
            piece = tokenizer.encode(value)
        elif kind == "token":
            piece = [value]
        else:
            piece = [IMAGE_PLACEHOLDER_ID] * num_image_tokens
        ids += piece
        labels += piece if supervised else [IGNORE_INDEX] * len(piece)
    return ids, labels


def _special_id(token: str, template: Template, tokenizer: Tokenizer) -> int:
    token_id = tokenizer.eos_id if token == EOS else tokenizer.token_to_id(token)
    if token_id is None:
        raise ConversationError(f"template {template.name!r} needs the special token {token!r}, which the tokenizer "
                                f"{tokenizer.source!r} lacks: pick the template that matches the LLM")
    return token_id


def _last_image_end(ids: list[int]) -> int:
    return max(i for i, t in enumerate(ids) if t == IMAGE_PLACEHOLDER_ID) + 1
