"""Prompt rendering and label masking through the base tokenizer's chat template."""

from __future__ import annotations

import json
from typing import Any

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
    template_messages,
)


def _call(name: str, arguments: Any) -> dict[str, Any]:
    return {"id": f"call_{name}", "type": "function", "function": {"name": name, "arguments": arguments}}


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


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
# OpenAI's shape, as a client sends it and as training rows hold it: arguments are a JSON string.
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "clear"}'},
    {"role": "assistant", "content": "21 degrees and clear."},
]


def test_openai_tool_calls_render_with_arguments_as_a_mapping(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = render_prompt(tiny_tokenizer, TOOL_CHAT, add_generation_prompt=False, tools=[WEATHER_TOOL])
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        in text
    )
    assert (
        '<|im_start|>user\n<tool_response>\n{"temperature": 21, "sky": "clear"}\n</tool_response><|im_end|>\n'
        in text
    )
    assert json.dumps(WEATHER_TOOL) in text
    # The caller's messages are left as they were (the server keeps them for its reply).
    assert TOOL_CHAT[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'
    # A mapping, None and "" are taken too, as vLLM takes them; an empty tool_calls list is plain text.
    converted = template_messages(
        [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [_call("f", {"x": 1}), _call("g", None), _call("h", "")],
            },
            {"role": "assistant", "content": "plain", "tool_calls": []},
        ]
    )
    assert [call["function"]["arguments"] for call in converted[0]["tool_calls"]] == [{"x": 1}, {}, {}]
    assert converted[1] == {"role": "assistant", "content": "plain"}


def test_tools_absent_or_empty_render_as_no_tools(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    plain = render_prompt(tiny_tokenizer, CHAT, add_generation_prompt=True)
    assert render_prompt(tiny_tokenizer, CHAT, add_generation_prompt=True, tools=[]) == plain
    assert encode_prompt(tiny_tokenizer, CHAT, tools=None) == encode_prompt(tiny_tokenizer, CHAT)
    with_tools = render_prompt(tiny_tokenizer, CHAT, add_generation_prompt=True, tools=[WEATHER_TOOL])
    assert with_tools != plain and "<tools>" in with_tools


def test_tool_calls_are_trained_and_tool_results_are_not(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    stop = end_of_turn_ids(tiny_tokenizer)
    sample = encode_conversation(tiny_tokenizer, TOOL_CHAT, stop, tools=[WEATHER_TOOL])
    trained = [t for t, label in zip(sample.input_ids, sample.labels, strict=True) if label != IGNORE_INDEX]
    assert tiny_tokenizer.decode(trained) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
        "21 degrees and clear.<|im_end|>"
    )
    # The tool-call tags are trained as the single tokens vLLM's hermes parser looks for.
    assert trained[0] == tiny_tokenizer.convert_tokens_to_ids("<tool_call>")
    # What the server sends the engine before the tool call is exactly what training saw.
    prompt = encode_prompt(tiny_tokenizer, TOOL_CHAT[:1], tools=[WEATHER_TOOL])
    assert sample.input_ids[: len(prompt)] == prompt
    assert sample.labels[len(prompt) - 1] == IGNORE_INDEX and sample.labels[len(prompt)] == trained[0]
    after_result = encode_prompt(tiny_tokenizer, TOOL_CHAT[:3], tools=[WEATHER_TOOL])
    assert sample.input_ids[: len(after_result)] == after_result
    # Same labels as transformers' own assistant mask from the template's generation markers.
    encoded = tiny_tokenizer.apply_chat_template(
        template_messages(TOOL_CHAT),
        tools=[WEATHER_TOOL],
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    assert encoded["input_ids"] == sample.input_ids
    assert [bool(m) for m in encoded["assistant_masks"]] == [label != IGNORE_INDEX for label in sample.labels]


@pytest.mark.parametrize(
    ("messages", "param", "message"),
    [
        (
            [{"role": "assistant", "content": None, "tool_calls": [_call("f", '{"city": "Par')]}],
            "messages[0].tool_calls[0].function.arguments",
            "is not valid JSON",
        ),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [_call("f", "[1, 2]")]}],
            "messages[1].tool_calls[0].function.arguments",
            "must hold a JSON object, not list",
        ),
        (
            [
                {
                    "role": "assistant",
                    "tool_calls": [_call("f", "{}"), {"type": "function", "function": {"arguments": "{}"}}],
                }
            ],
            "messages[0].tool_calls[1].function.name",
            "must be a non-empty string",
        ),
        (
            [{"role": "assistant", "tool_calls": [{"type": "custom", "custom": {"name": "f"}}]}],
            "messages[0].tool_calls[0]",
            "must be a function call",
        ),
        ([{"role": "assistant", "tool_calls": {"id": "x"}}], "messages[0].tool_calls", "must be a list"),
    ],
)
def test_bad_tool_calls_name_the_field(tiny_tokenizer, messages, param, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PromptError, match=message) as caught:
        render_prompt(tiny_tokenizer, messages, add_generation_prompt=False, tools=[WEATHER_TOOL])
    assert caught.value.param == param
    assert str(caught.value).startswith(param)


def test_training_tools_on_a_template_without_tool_support_is_refused(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    tokenizer = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    stop = end_of_turn_ids(tokenizer)
    # A plain ChatML template (SmolLM2's kind): tools and tool calls are silently dropped.
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] or '' }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(
        PromptError, match=r"does not render the `tools` it is given \('get_weather' is missing"
    ):
        encode_conversation(tokenizer, TOOL_CHAT, stop, tools=[WEATHER_TOOL])
    # Tools shown in the system turn, but an assistant's tool calls still dropped.
    tokenizer.chat_template = "{% if tools %}{{ tools | tojson }}{% endif %}" + tokenizer.chat_template
    with pytest.raises(PromptError, match="does not render assistant `tool_calls`"):
        encode_conversation(tokenizer, TOOL_CHAT, stop, tools=[WEATHER_TOOL])
    # The same chat without tool use trains as before on such a template.
    assert encode_conversation(tokenizer, CHAT, stop, tools=None).n_label_tokens > 0
