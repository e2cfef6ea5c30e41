"""Templates rendered against hand-written (id, label) sequences; prompts, truncation, no-supervision, errors.

With the byte tokenizer (one token per UTF-8 byte) the expected ids of any text are its bytes, so every
expectation below is written from the template's text alone.
"""

from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from test_tokenizer import byte_ids, byte_tokenizer_folder, special_id

from mllm_cl.config import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
from mllm_cl.conversation import (SMOLLM_SYSTEM, VICUNA_SYSTEM, ConversationError, Template, render_conversation,
                                  render_inquiry, render_prompt)
from mllm_cl.tokenizer import Tokenizer, load_tokenizer

N_IMG = 3
IMG = [IMAGE_PLACEHOLDER_ID] * N_IMG
CHAT = [("user", "<image>\nWhat is it?"), ("assistant", "A cat."), ("user", "Colour?"), ("assistant", "Red.")]


@pytest.fixture
def tok(tmp_path: Path) -> Tokenizer:
    return load_tokenizer(byte_tokenizer_folder(tmp_path, tokenizer_config={"bos_token": "<s>", "eos_token": "</s>"}))


def expected(*parts: tuple[list[int] | str, bool]) -> tuple[list[int], list[int]]:
    """Concatenate (ids or text, supervised) parts into the expected ids and labels."""
    ids: list[int] = []
    labels: list[int] = []
    for part, supervised in parts:
        piece = byte_ids(part) if isinstance(part, str) else part
        ids += piece
        labels += piece if supervised else [IGNORE_INDEX] * len(piece)
    return ids, labels


def S(token: str) -> list[int]:
    return [special_id(token)]


def test_vicuna_v1(tok: Tokenizer) -> None:
    out = render_conversation(tok, CHAT, "vicuna_v1", N_IMG)
    assert (out.input_ids, out.labels) == expected(
        (S("<s>"), False), (VICUNA_SYSTEM + " USER: ", False), (IMG, False), ("\nWhat is it? ASSISTANT:", False),
        (" A cat.", True), (S("</s>"), True),
        ("USER: Colour? ASSISTANT:", False), (" Red.", True), (S("</s>"), True))
    assert not out.truncated and out.num_supervised == len(" A cat.") + len(" Red.") + 2
    text = tok.decode([i for i in out.input_ids if i >= 0], skip_special=False)
    assert text == f"<s>{VICUNA_SYSTEM} USER: \nWhat is it? ASSISTANT: A cat.</s>USER: Colour? ASSISTANT: Red.</s>"


def test_pythia(tok: Tokenizer) -> None:
    out = render_conversation(tok, CHAT[:2], "pythia", N_IMG)
    assert (out.input_ids, out.labels) == expected(
        (S("<|endoftext|>"), False), (VICUNA_SYSTEM + " USER: ", False), (IMG, False),
        ("\nWhat is it? ASSISTANT:", False), (" A cat.", True), (S("<|endoftext|>"), True))


def test_chatml(tok: Tokenizer) -> None:
    out = render_conversation(tok, CHAT, "chatml", N_IMG)
    start, end = S("<|im_start|>"), S("<|im_end|>")
    assert (out.input_ids, out.labels) == expected(
        (start, False), ("system\n" + SMOLLM_SYSTEM, False), (end, False), ("\n", False),
        (start, False), ("user\n", False), (IMG, False), ("\nWhat is it?", False), (end, False), ("\n", False),
        (start, False), ("assistant\n", False), ("A cat.", True), (end, True), ("\n", False),
        (start, False), ("user\nColour?", False), (end, False), ("\n", False),
        (start, False), ("assistant\n", False), ("Red.", True), (end, True), ("\n", False))


def test_plain_keeps_only_image_and_caption(tok: Tokenizer) -> None:
    out = render_conversation(tok, [("user", "<image>\nDescribe it."), ("assistant", "A cat.")], "plain", N_IMG)
    assert (out.input_ids, out.labels) == expected((IMG, False), ("A cat.", True), (S("</s>"), True))


def test_prompt_is_the_training_sequence_up_to_the_answer(tok: Tokenizer) -> None:
    for template in ("vicuna_v1", "pythia", "chatml", "plain"):
        full = render_conversation(tok, CHAT, template, N_IMG)
        answer_starts = [i for i, label in enumerate(full.labels)
                         if label != IGNORE_INDEX and (i == 0 or full.labels[i - 1] == IGNORE_INDEX)]
        assert render_prompt(tok, CHAT[:1], template, N_IMG) == full.input_ids[:answer_starts[0]]
        if template != "plain":  # plain drops the human text, so its two answers touch
            assert render_prompt(tok, CHAT[:3], template, N_IMG) == full.input_ids[:answer_starts[1]]
    assert render_prompt(tok, CHAT[:1], "chatml", N_IMG)[-len("assistant\n") - 1:] == \
        S("<|im_start|>") + byte_ids("assistant\n")


def test_inquiry_is_a_text_only_prompt(tok: Tokenizer) -> None:
    ids = render_inquiry(tok, "Why is the sky blue?", "vicuna_v1")
    assert ids == S("<s>") + byte_ids(f"{VICUNA_SYSTEM} USER: Why is the sky blue? ASSISTANT:")
    with pytest.raises(ConversationError, match="text-only"):
        render_inquiry(tok, "<image>\nWhat?", "vicuna_v1")


def test_truncation_keeps_the_image_block(tok: Tokenizer) -> None:
    full = render_conversation(tok, CHAT, "vicuna_v1", N_IMG)
    cut = render_conversation(tok, CHAT, "vicuna_v1", N_IMG, max_len=len(full.input_ids) - 5)
    assert cut.truncated and cut.input_ids == full.input_ids[:-5] and cut.labels == full.labels[:-5]
    assert not render_conversation(tok, CHAT, "vicuna_v1", N_IMG, max_len=len(full.input_ids)).truncated
    image_end = full.input_ids.index(IMAGE_PLACEHOLDER_ID) + N_IMG
    assert render_conversation(tok, CHAT, "vicuna_v1", N_IMG, max_len=image_end).input_ids[-1] == IMAGE_PLACEHOLDER_ID
    with pytest.raises(ConversationError, match=f"image block ends at position {image_end} but max_len is"):
        render_conversation(tok, CHAT, "vicuna_v1", N_IMG, max_len=image_end - 1)


def test_no_supervised_token_is_visible(tok: Tokenizer) -> None:
    full = render_conversation(tok, CHAT, "vicuna_v1", N_IMG)
    first_answer = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    out = render_conversation(tok, CHAT, "vicuna_v1", N_IMG, max_len=first_answer)
    assert out.truncated and out.num_supervised == 0


def test_bad_conversations(tok: Tokenizer) -> None:
    with pytest.raises(ConversationError, match="message 1 has role 'user', expected 'assistant'"):
        render_conversation(tok, [("user", "a"), ("user", "b")], "vicuna_v1", N_IMG)
    with pytest.raises(ConversationError, match="last message must be a 'assistant' turn"):
        render_conversation(tok, CHAT[:3], "vicuna_v1", N_IMG)
    with pytest.raises(ConversationError, match="last message must be a 'user' turn"):
        render_prompt(tok, CHAT[:2], "vicuna_v1", N_IMG)
    with pytest.raises(ConversationError, match="images go in 'user' turns"):
        render_conversation(tok, [("user", "a"), ("assistant", "<image>")], "vicuna_v1", N_IMG)
    with pytest.raises(ConversationError, match="unknown chat template 'vicuna'"):
        render_conversation(tok, CHAT, "vicuna", N_IMG)
    odd = Template("odd", specials=("<bos>",), begin="<bos>")
    with pytest.raises(ConversationError, match="template 'odd' needs the special token '<bos>'"):
        render_conversation(tok, CHAT, odd, N_IMG)


def test_adjacent_ignored_text_is_one_piece_and_merges_stop_at_the_answer() -> None:
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([f"{VICUNA_SYSTEM} USER: What is it? ASSISTANT: A cat."] * 20, trainer)
    tok = Tokenizer(backend, bos_id=0, eos_id=0, pad_id=0)
    out = render_conversation(tok, [("user", "What is it?"), ("assistant", "A cat.")], "pythia", 0)
    prompt = tok.encode(f"{VICUNA_SYSTEM} USER: What is it? ASSISTANT:")
    assert len(prompt) < len(f"{VICUNA_SYSTEM} USER: What is it? ASSISTANT:")  # merges did happen
    assert out.input_ids == [0] + prompt + tok.encode(" A cat.") + [0]
    assert out.labels == [IGNORE_INDEX] * (1 + len(prompt)) + tok.encode(" A cat.") + [0]
