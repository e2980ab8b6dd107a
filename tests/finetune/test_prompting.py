"""Prompt rendering and label masking through the base tokenizer's chat template."""

from __future__ import annotations

import pytest

from finetune.prompting import (
    IGNORE_INDEX,
    PromptError,
    encode_conversation,
    encode_prompt,
    encode_raw,
    encode_text,
    end_of_turn_ids,
    render_prompt,
)

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "And another, in capitals?"},
    {"role": "assistant", "content": "RED."},
]


def test_multi_turn_labels_token_by_token(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    stop = end_of_turn_ids(tiny_tokenizer)
    sample = encode_conversation(tiny_tokenizer, CHAT, stop)

    # Build the expectation piece by piece from the ChatML layout: prompt pieces are masked, each
    # assistant reply plus its <|im_end|> is trained, the newline after <|im_end|> is not.
    pieces = [
        ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False),
        ("Blue.<|im_end|>", True),
        ("\n<|im_start|>user\nAnd another, in capitals?<|im_end|>\n<|im_start|>assistant\n", False),
        ("RED.<|im_end|>", True),
        ("\n", False),
    ]
    expected_ids: list[int] = []
    expected_labels: list[int] = []
    for text, trained in pieces:
        ids = encode_text(tiny_tokenizer, text)
        expected_ids += ids
        expected_labels += ids if trained else [IGNORE_INDEX] * len(ids)

    assert sample.input_ids == expected_ids
    assert sample.labels == expected_labels
    trained = [t for t, label in zip(sample.input_ids, sample.labels, strict=True) if label != IGNORE_INDEX]
    assert tiny_tokenizer.decode(trained) == "Blue.<|im_end|>RED.<|im_end|>"
    # EOS is trained: the last target of each turn is the end-of-turn token.
    assert trained.count(tiny_tokenizer.eos_token_id) == 2
    assert trained[-1] == tiny_tokenizer.eos_token_id


def test_generation_prompt_is_the_training_prefix(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """The ids a server sends the engine for a conversation are exactly what training saw before the reply."""
    sample = encode_conversation(tiny_tokenizer, CHAT, end_of_turn_ids(tiny_tokenizer))
    prompt = encode_prompt(tiny_tokenizer, CHAT[:-1])
    assert sample.input_ids[: len(prompt)] == prompt
    # The prompt ends with the (untrained) assistant header; the next token is the first trained one.
    assert sample.labels[len(prompt) - 1] == IGNORE_INDEX
    assert sample.labels[len(prompt)] != IGNORE_INDEX
    assert render_prompt(tiny_tokenizer, CHAT[:1], add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n"
    )


def test_raw_prompt_completion_trains_completion_and_eos(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    eos = tiny_tokenizer.eos_token_id
    sample = encode_raw(tiny_tokenizer, "Translate: cat ->", " chat", eos)
    n_prompt = len(encode_text(tiny_tokenizer, "Translate: cat ->"))
    assert sample.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert sample.labels[n_prompt:] == sample.input_ids[n_prompt:]
    assert sample.input_ids[-1] == eos


def test_template_without_end_of_turn_is_refused(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    tokenizer = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(PromptError, match="does not end assistant turns with an end-of-turn token"):
        encode_conversation(tokenizer, CHAT, end_of_turn_ids(tokenizer))


def test_template_that_rewrites_history_is_refused(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    tokenizer = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    # Earlier assistant turns are shortened once the conversation goes on (as some reasoning templates do).
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}<|im_start|>assistant\n"
        "...<|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(PromptError, match="renders assistant turn 2 differently"):
        encode_conversation(tokenizer, CHAT, end_of_turn_ids(tokenizer))


def test_missing_chat_template_is_refused(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    tokenizer = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tokenizer.chat_template = None
    with pytest.raises(PromptError, match="has no chat_template"):
        encode_prompt(tokenizer, CHAT[:2])
