"""Prompt rendering through the base tokenizer's chat template: one code path for training and serving.

Training calls `encode_conversation` (ids + labels on assistant turns); the server calls `encode_prompt`.
Both take OpenAI-shaped chats, tools included (see `template_messages`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tuneserve.rendering import GOLDEN_CHATS, first_difference

IGNORE_INDEX = -100

Message = Mapping[str, Any]
"""An OpenAI chat message: {role, content}; an assistant's may carry `tool_calls`
([{id, type: "function", function: {name, arguments: JSON string}}], content then None or text), and a
`tool` message answers one with {role: "tool", tool_call_id, content}."""

Tool = Mapping[str, Any]
"""An OpenAI function tool, {"type": "function", "function": {name, description?, parameters?}}, passed to the
chat template as it is (the template decides how to show it, e.g. Qwen2.5's JSON in <tools></tools>)."""


class ChatTokenizer(Protocol):
    """The slice of a transformers fast tokenizer this module relies on."""

    eos_token_id: int | None
    chat_template: str | None

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...

    def __call__(self, text: str, **kwargs: Any) -> Any: ...


class PromptError(ValueError):
    """A conversation that the base model's chat template cannot render; `param` names the offending field
    (e.g. "messages[2].tool_calls[0].function.arguments") when one is to blame."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class EncodedSample:
    """One training sample: token ids and labels (IGNORE_INDEX where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def n_label_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def template_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """The messages as chat templates take them: the one place OpenAI's shape is adapted.

    OpenAI sends a tool call's `arguments` as a JSON string, while transformers' tool-use templates
    (Qwen2.5's, Llama 3.1's, Hermes') render them from a mapping (`arguments | tojson`); as vLLM does
    (vllm/renderers/chat_utils.py, _postprocess_messages), the string is parsed into a dict here, a dict is
    kept, and None or "" become {}. Unlike vLLM, which turns malformed arguments into {} with a warning, an
    argument string that is not a JSON object raises PromptError naming the field: training on a silently
    emptied call would teach the wrong call. An empty `tool_calls` list is dropped (vLLM too), so the turn
    renders as plain text. Other fields pass through unchanged; the input is not modified.
    """
    rendered: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        copy = dict(message)
        tool_calls = copy.get("tool_calls")
        if tool_calls is not None and copy.get("role") == "assistant":
            if not isinstance(tool_calls, list):
                raise PromptError(
                    f"messages[{index}].tool_calls must be a list, not {type(tool_calls).__name__}",
                    f"messages[{index}].tool_calls",
                )
            if tool_calls:
                copy["tool_calls"] = [
                    _template_tool_call(call, f"messages[{index}].tool_calls[{n}]")
                    for n, call in enumerate(tool_calls)
                ]
            else:
                del copy["tool_calls"]
        rendered.append(copy)
    return rendered


def _template_tool_call(call: Any, where: str) -> dict[str, Any]:
    if not isinstance(call, Mapping):
        raise PromptError(
            f"{where} must be an object {{id, type, function}}, not {type(call).__name__}", where
        )
    if call.get("type", "function") != "function" or not isinstance(call.get("function"), Mapping):
        raise PromptError(
            f'{where} must be a function call: {{type: "function", function: {{name, arguments}}}}', where
        )
    function = dict(call["function"])
    if not isinstance(function.get("name"), str) or not function["name"]:
        raise PromptError(f"{where}.function.name must be a non-empty string", f"{where}.function.name")
    arguments = function.get("arguments")
    if isinstance(arguments, str) and arguments:
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise PromptError(
                f"{where}.function.arguments is not valid JSON ({exc.msg} at column {exc.colno}); "
                'it must be a JSON object as a string, e.g. \'{"city": "Paris"}\'',
                f"{where}.function.arguments",
            ) from None
    elif arguments is None or arguments == "":
        arguments = {}
    if not isinstance(arguments, Mapping):
        raise PromptError(
            f"{where}.function.arguments must hold a JSON object, not {type(arguments).__name__}",
            f"{where}.function.arguments",
        )
    return {**call, "function": {**function, "arguments": dict(arguments)}}


def render_prompt(
    tokenizer: ChatTokenizer,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool,
    tools: Sequence[Tool] | None = None,
) -> str:
    """Render messages (and the tools the model may call, if any) with the tokenizer's own chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError(
            "the base model's tokenizer has no chat_template; use an instruction-tuned base "
            "(e.g. Qwen/Qwen2.5-7B-Instruct) or one whose tokenizer_config.json defines chat_template"
        )
    # An empty list is no tools: templates test `if tools`, and vLLM drops tools=[] the same way.
    extra: dict[str, Any] = {"tools": [dict(tool) for tool in tools]} if tools else {}
    text = tokenizer.apply_chat_template(
        template_messages(messages), tokenize=False, add_generation_prompt=add_generation_prompt, **extra
    )
    assert isinstance(text, str)
    return text


def encode_text(tokenizer: ChatTokenizer, text: str) -> list[int]:
    """Token ids of already rendered text: the template carries every special token, so none is added."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompt(
    tokenizer: ChatTokenizer, messages: Sequence[Message], tools: Sequence[Tool] | None = None
) -> list[int]:
    """Prompt ids for generation: the conversation (and the tools, if any), then the assistant header."""
    return encode_text(tokenizer, render_prompt(tokenizer, messages, add_generation_prompt=True, tools=tools))


def end_of_turn_ids(tokenizer: ChatTokenizer, generation_eos: int | Iterable[int] | None = None) -> set[int]:
    """Token ids that end an assistant turn: the tokenizer's EOS plus the generation config's EOS ids."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if isinstance(generation_eos, int):
        ids.add(generation_eos)
    elif generation_eos is not None:
        ids.update(int(i) for i in generation_eos)
    if not ids:
        raise PromptError("the tokenizer defines no eos_token; the model could not learn to stop")
    return ids


def encode_conversation(
    tokenizer: ChatTokenizer,
    messages: Sequence[Message],
    stop_ids: set[int],
    tools: Sequence[Tool] | None = None,
) -> EncodedSample:
    """Ids of the whole rendered conversation, with labels on every assistant turn and its end-of-turn token.

    An assistant turn's tool calls are part of its reply, so they are trained as its text is; `tool`
    messages (the results) are context, as user turns are.

    Each assistant turn's span is found by rendering the conversation up to the turn with the generation
    prompt (where the reply starts) and through the turn (where it ends), so it works for any chat template
    whose renderings extend each other. Labels cover the reply and the first end-of-turn token after it, so
    the model learns to stop; whatever the template puts after that token (a newline, say) is not trained.
    """
    full = render_prompt(tokenizer, messages, add_generation_prompt=False, tools=tools)
    for tool in tools or ():
        _require_rendered(full, str(tool["function"]["name"]), "the `tools` it is given")
    spans: list[tuple[int, int]] = []
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_prompt(tokenizer, messages[:turn], add_generation_prompt=True, tools=tools)
        through = render_prompt(tokenizer, messages[: turn + 1], add_generation_prompt=False, tools=tools)
        if not (through.startswith(before) and full.startswith(through)):
            raise PromptError(
                f"the chat template renders assistant turn {turn} differently depending on what follows it; "
                "per-turn label masking needs a template whose renderings are prefixes of each other"
            )
        for call in message.get("tool_calls") or ():
            _require_rendered(
                full[len(before) : len(through)], call["function"]["name"], "assistant `tool_calls`"
            )
        spans.append((len(before), len(through)))

    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = list(encoding["input_ids"])
    offsets: list[tuple[int, int]] = list(encoding["offset_mapping"])
    labels = [IGNORE_INDEX] * len(input_ids)
    for start, end in spans:
        stopped = False
        for index, (token_start, _) in enumerate(offsets):
            if token_start < start or token_start >= end:
                continue
            labels[index] = input_ids[index]
            if input_ids[index] in stop_ids:
                stopped = True
                break
        if not stopped:
            raise PromptError(
                "the chat template does not end assistant turns with an end-of-turn token "
                f"(looked for ids {sorted(stop_ids)}); the model would never learn to stop"
            )
    return EncodedSample(input_ids=input_ids, labels=labels)


def _require_rendered(text: str, expected: str, what: str) -> None:
    # A template without tool support drops what it does not know; training on that would teach replies
    # to questions the model never saw, so it is refused (the server has to decide for itself).
    if expected not in text:
        raise PromptError(
            f"the base model's chat template does not render {what} ({expected!r} is missing from the "
            "rendered conversation); train tool use on a base whose template supports tools, such as "
            "Qwen2.5-Instruct or the tiny base"
        )


def encode_raw(tokenizer: ChatTokenizer, prompt: str, completion: str, eos_id: int) -> EncodedSample:
    """Plain prompt/completion without a chat template: loss on the completion and a final EOS."""
    prompt_ids = encode_text(tokenizer, prompt)
    completion_ids = [*encode_text(tokenizer, completion), eos_id]
    return EncodedSample(
        input_ids=prompt_ids + completion_ids, labels=[IGNORE_INDEX] * len(prompt_ids) + completion_ids
    )


# --- the template lock: how a tokenizer renders prompts, recorded at training and checked when served -----

_FINGERPRINT_FIELDS = (
    "chat_template_sha256",
    "special_tokens_sha256",
    "tokenizer_sha256",
    "bos_token_id",
    "eos_token_id",
    "generation_prompt",
)


def _sha256(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def template_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """How `tokenizer` turns chats into tokens: hashes of its chat template, special tokens and vocabulary,
    its BOS/EOS ids, the generation prompt's text, and the ids of GOLDEN_CHATS rendered for generation (a
    chat the template refuses is recorded by its error). `finetune run` writes it into the manifest; the
    server compares it with its own (`fingerprint_difference`) before serving an adapter."""
    golden: list[dict[str, Any]] = []
    for chat in GOLDEN_CHATS:
        try:
            ids = encode_prompt(tokenizer, chat)
        except Exception as exc:  # a template that refuses a system turn, or no template at all
            golden.append({"error": f"{type(exc).__name__}: {exc}"})
            continue
        golden.append({"ids": ids, "tokens": [str(token) for token in tokenizer.convert_ids_to_tokens(ids)]})
    try:
        with_prompt = render_prompt(tokenizer, GOLDEN_CHATS[0], add_generation_prompt=True)
        without = render_prompt(tokenizer, GOLDEN_CHATS[0], add_generation_prompt=False)
        generation_prompt: str | None = with_prompt.removeprefix(without)
    except Exception:
        generation_prompt = None
    special = {name: str(value) for name, value in tokenizer.special_tokens_map.items()}
    return {
        "chat_template_sha256": _sha256(getattr(tokenizer, "chat_template", None) or ""),
        "special_tokens_sha256": _sha256(json.dumps(special, sort_keys=True)),
        "tokenizer_sha256": _sha256(json.dumps(sorted(tokenizer.get_vocab().items()))),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "generation_prompt": generation_prompt,
        "golden": golden,
    }


def fingerprint_difference(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """None when two fingerprints agree; else what differs first, as a sentence: the first differing token
    of the first golden chat that differs (by its text and id on each side), or else the differing field."""
    for index, (old, new) in enumerate(zip(recorded.get("golden") or [], current["golden"], strict=False)):
        if old == new:
            continue
        where = f"golden conversation {index + 1} of {len(GOLDEN_CHATS)}"
        if "ids" not in old or "ids" not in new:
            trained, served = old.get("error") or "rendered", new.get("error") or "rendered"
            return f"{where}: trained {trained}, served {served}"
        position = first_difference(old["ids"], new["ids"])
        trained, served = _token_at(old, position), _token_at(new, position)
        return f"{where} differs at token {position}: trained {trained}, served {served}"
    for field in _FINGERPRINT_FIELDS:
        if field in recorded and recorded[field] != current.get(field):
            return f"{field} differs: trained {recorded[field]!r}, served {current.get(field)!r}"
    return None


def _token_at(rendered: Mapping[str, Any], position: int) -> str:
    ids = rendered["ids"]
    if position >= len(ids):
        return f"the end of the prompt ({len(ids)} tokens)"
    return f"{rendered['tokens'][position]!r} (id {ids[position]})"
