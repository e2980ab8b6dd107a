"""Tests for the embedded tiny base model: deterministic cached build, transformers and vLLM loading."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest

from finetune.tiny_base import (
    DEFAULT_TOOLS_SYSTEM_PROMPT,
    MARKER_FILE,
    TOOL_TOKENS,
    TinyBaseSpec,
    build_tiny_base,
)

# A few steps are enough to exercise pre-training; the corpus is cut down to keep the build ~2 s.
FAST_SPEC = TinyBaseSpec(corpus_documents=400, pretrain_steps=4, warmup_steps=2)

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "List two colors."},
    {"role": "assistant", "content": "- red\n- blue"},
]
CHATML = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nList two colors.<|im_end|>\n"
    "<|im_start|>assistant\n- red\n- blue<|im_end|>\n"
)


@pytest.fixture(scope="module")
def quick_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fast build of the tiny base; the shared `tiny_base` fixture is the full default build."""
    return build_tiny_base(tmp_path_factory.mktemp("tiny") / "base", FAST_SPEC)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_is_deterministic_and_cached(tmp_path: Path) -> None:
    first = build_tiny_base(tmp_path / "first", FAST_SPEC)
    second = build_tiny_base(tmp_path / "second", FAST_SPEC)
    for name in ("model.safetensors", "tokenizer.json"):
        assert _sha256(first / name) == _sha256(second / name), name
    assert json.loads((first / MARKER_FILE).read_text())["spec"]["pretrain_steps"] == FAST_SPEC.pretrain_steps
    # Only the finished folder is left: no temporary sibling survives the build.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["first", "second"]

    mtimes = {path.name: path.stat().st_mtime_ns for path in first.iterdir()}
    started = time.perf_counter()
    assert build_tiny_base(first, FAST_SPEC) == first
    assert time.perf_counter() - started < 1.0
    assert {path.name: path.stat().st_mtime_ns for path in first.iterdir()} == mtimes


def test_stale_build_is_rebuilt_and_foreign_folder_needs_force(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out_dir = build_tiny_base(tmp_path / "base", FAST_SPEC)
    other_spec = TinyBaseSpec(corpus_documents=400, pretrain_steps=0)
    with caplog.at_level("INFO"):
        build_tiny_base(out_dir, other_spec)
    assert "pretrain_steps=4 (wanted 0)" in caplog.text
    assert json.loads((out_dir / MARKER_FILE).read_text())["spec"]["pretrain_steps"] == 0

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match="--force"):
        build_tiny_base(foreign, other_spec)
    assert (foreign / "notes.txt").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    assert (build_tiny_base(empty, other_spec) / "model.safetensors").is_file()


def test_invalid_spec_names_the_field() -> None:
    with pytest.raises(ValueError, match="num_key_value_heads"):
        TinyBaseSpec(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="vocab_size"):
        TinyBaseSpec(vocab_size=100)


def test_transformers_loads_model_and_chatml_tokenizer(quick_base: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(quick_base)
    model = AutoModelForCausalLM.from_pretrained(quick_base)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.tie_word_embeddings
    assert model.config.head_dim == 64
    assert model.dtype == torch.float32

    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert (model.config.eos_token_id, model.config.pad_token_id) == (eos_id, pad_id)
    generation_config = GenerationConfig.from_pretrained(quick_base)
    assert (generation_config.eos_token_id, generation_config.pad_token_id) == (eos_id, pad_id)
    assert generation_config.bos_token_id is None

    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == CHATML
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == CHATML.split("- red")[0]

    text = 'Ünïcödé 日本 🙂 {"a": 1}\n\ttabs and  spaces'
    ids = tokenizer(text)["input_ids"]  # default add_special_tokens=True must add no BOS
    assert tokenizer.unk_token_id is None
    assert tokenizer.decode(ids) == text
    special_ids = tokenizer("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert special_ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert special_ids[-1] == eos_id

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits  # (1, T, vocab)
    assert logits.shape == (1, len(ids), len(tokenizer))


def test_chat_template_marks_assistant_tokens(quick_base: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(quick_base)
    encoded: Any = tokenizer.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    trained = tokenizer.decode([token for token, keep in zip(ids, mask, strict=True) if keep])
    assert trained == "- red\n- blue<|im_end|>"


# Build version 1's template (plain ChatML, before tools), kept to prove chats without tools render as before.
CHATML_V1_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('Unsupported role ' + message['role'] + '; use system, user or assistant.') }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{ message['content'] + '<|im_end|>' }}{%- endgeneration -%}{{ '\\n' }}"
    "{%- else -%}"
    "{{ message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# Qwen2.5-Instruct's chat template (tokenizer_config.json of Qwen/Qwen2.5-7B-Instruct), the reference for
# how the tiny base renders tools; only its default system prompt differs from ours.
QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # noqa: E501

PLAIN_CHATS = [
    CONVERSATION,
    CONVERSATION[1:],
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "Reply in JSON only."},
        {"role": "user", "content": 'Give {"a": 1} back, ünïcödé 日本 🙂'},
        {"role": "assistant", "content": '{"a": 1}'},
        {"role": "user", "content": "Again,\n\twith tabs  and  <tool_call> text?"},
        {"role": "assistant", "content": "  </tool_call> <|endoftext|>\n"},
    ],
]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city, e.g. Paris"}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}},
    },
}
TOOL_CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris and the time in Tokyo?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            },
            {
                "id": "c2",
                "type": "function",
                "function": {"name": "get_time", "arguments": {"zone": "Asia/Tokyo"}},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": '{"temperature": 21}'},
    {"role": "tool", "tool_call_id": "c2", "content": "09:30"},
    {"role": "assistant", "content": "21 degrees in Paris; 09:30 in Tokyo."},
    {"role": "user", "content": "And Oslo?"},
    {
        "role": "assistant",
        "content": "Let me check.",
        "tool_calls": [
            {
                "id": "c3",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Oslo"}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "c3", "content": '{"temperature": 3}'},
    {"role": "assistant", "content": "3 degrees."},
]


def test_chats_without_tools_render_as_build_version_1(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Adding tools to the template changed nothing for chats without them: same text, ids and masks."""
    for chat in PLAIN_CHATS:
        for generation_prompt in (False, True):
            messages = chat[:-1] if generation_prompt and chat[-1]["role"] == "assistant" else chat
            for tools in (None, []):
                kwargs: dict[str, Any] = {"add_generation_prompt": generation_prompt, "tools": tools}
                new = tiny_tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
                old = tiny_tokenizer.apply_chat_template(
                    messages, tokenize=False, chat_template=CHATML_V1_TEMPLATE, **kwargs
                )
                assert new == old
        encoded = [
            tiny_tokenizer.apply_chat_template(
                chat, return_dict=True, return_assistant_tokens_mask=True, chat_template=template
            )
            for template in (None, CHATML_V1_TEMPLATE)
        ]
        assert encoded[0]["input_ids"] == encoded[1]["input_ids"]
        assert encoded[0]["assistant_masks"] == encoded[1]["assistant_masks"]


def test_tools_render_as_qwen25_renders_them(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    tools = [WEATHER_TOOL, TIME_TOOL]
    for end in range(2, len(TOOL_CHAT) + 1):
        for generation_prompt in (False, True):
            kwargs: dict[str, Any] = {"tools": tools, "add_generation_prompt": generation_prompt}
            ours = tiny_tokenizer.apply_chat_template(TOOL_CHAT[:end], tokenize=False, **kwargs)
            qwen = tiny_tokenizer.apply_chat_template(
                TOOL_CHAT[:end], tokenize=False, chat_template=QWEN25_TEMPLATE, **kwargs
            )
            assert ours == qwen, end
    # Without a system message, the tools' system turn opens with our default prompt instead of Qwen's.
    ours = tiny_tokenizer.apply_chat_template(TOOL_CHAT[1:3], tokenize=False, tools=tools)
    qwen = tiny_tokenizer.apply_chat_template(
        TOOL_CHAT[1:3], tokenize=False, tools=tools, chat_template=QWEN25_TEMPLATE
    )
    assert ours == qwen.replace(
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", DEFAULT_TOOLS_SYSTEM_PROMPT
    )
    assert ours.startswith(f"<|im_start|>system\n{DEFAULT_TOOLS_SYSTEM_PROMPT}\n\n# Tools\n")
    assert '\n<tools>\n{"type": "function", "function": {"name": "get_weather", ' in ours
    assert ours.endswith(
        "<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"zone": "Asia/Tokyo"}}\n</tool_call><|im_end|>\n'
    )


def test_tool_call_tags_are_single_non_special_tokens(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """vLLM's hermes parser finds <tool_call>...</tool_call> in the decoded text: the tags are whole tokens
    (so a model emits each in one step, as Qwen2.5 does) and not special, so decoding keeps them."""
    vocab = tiny_tokenizer.get_vocab()
    ids = [vocab[token] for token in TOOL_TOKENS]
    assert ids == [len(tiny_tokenizer) - 2, len(tiny_tokenizer) - 1]
    text = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    encoded = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert (encoded[0], encoded[-1]) == tuple(ids)
    assert tiny_tokenizer.decode(encoded, skip_special_tokens=True) == text
    assert not set(TOOL_TOKENS) & set(tiny_tokenizer.all_special_tokens)


def test_tool_calls_are_assistant_tokens(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    encoded: Any = tiny_tokenizer.apply_chat_template(
        TOOL_CHAT, tools=[WEATHER_TOOL, TIME_TOOL], return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    trained = tiny_tokenizer.decode([token for token, keep in zip(ids, mask, strict=True) if keep])
    assert trained == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"zone": "Asia/Tokyo"}}\n</tool_call><|im_end|>'
        "21 degrees in Paris; 09:30 in Tokyo.<|im_end|>"
        "Let me check.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>'
        "3 degrees.<|im_end|>"
    )


def test_tool_token_embeddings_look_like_trained_ones(quick_base: Path) -> None:
    """The tool-call rows, appended after pre-training, look like trained tokens: not the mean, whose logit
    is the average logit and could never be the largest, so no adapter could learn to call a tool."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(quick_base / "model.safetensors"))
    embeddings = tensors["model.embed_tokens.weight"]  # (V + 2, C)
    old, new = embeddings[: -len(TOOL_TOKENS)], embeddings[-len(TOOL_TOKENS) :]
    assert embeddings.shape[0] == json.loads((quick_base / "config.json").read_text())["vocab_size"]
    norms = old.norm(dim=1)
    assert ((new.norm(dim=1) > norms.quantile(0.01)) & (new.norm(dim=1) < norms.quantile(0.99))).all()
    assert not torch.allclose(new, old.mean(dim=0).expand_as(new), atol=1e-3)
    assert not torch.equal(new[0], new[1])
