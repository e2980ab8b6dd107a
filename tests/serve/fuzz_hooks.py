"""Schemathesis hooks for tests/serve/test_fuzz.py (loaded by the `st` CLI through SCHEMATHESIS_HOOKS).

A fuzzed generation request may ask for 128 choices of the whole context each, seconds of engine time per
case on CPU. Valid token counts and choice counts are capped; invalid ones are left for the server to refuse,
so the cases still cover every bound the schema publishes.
"""

from __future__ import annotations

from typing import Any

import schemathesis

from serve.protocol import SEED_RANGE

# The fields that set how many tokens a generation request may produce, per path.
TOKEN_FIELDS = {
    "/v1/chat/completions": ("max_tokens", "max_completion_tokens"),
    "/v1/completions": ("max_tokens",),
    "/v1/responses": ("max_output_tokens",),
}
MAX_FUZZ_TOKENS, MAX_FUZZ_N = 8, 2


def _int(value: object) -> bool:
    """An integer as JSON Schema counts them (the fuzzer sends 8.0 too)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return isinstance(value, int) or value.is_integer()


@schemathesis.hook
def map_body(context: schemathesis.HookContext, body: Any) -> Any:
    if not (isinstance(body, dict) and context.operation is not None):
        return body
    fields = TOKEN_FIELDS.get(context.operation.path)
    if fields is None:
        return body
    body = dict(body)
    for name in fields:
        value = body.get(name)
        if name not in body or (_int(value) and value > MAX_FUZZ_TOKENS):
            body[name] = MAX_FUZZ_TOKENS
    if _int(body.get("n")) and body["n"] > MAX_FUZZ_N:
        body["n"] = MAX_FUZZ_N
    # min_tokens may not pass max_tokens, a rule between two fields that the schema cannot state.
    budget = min((int(body[name]) for name in fields if _int(body.get(name)) and body[name] >= 0), default=0)
    if _int(body.get("min_tokens")) and budget < body["min_tokens"]:
        body["min_tokens"] = budget
    # The fuzzer checks integer bounds in floating point: near 2**63 or 2**64 it takes a seed past the
    # published bound for a valid one (-9223372036854775999 rounds to -2**63); such seeds get the bound.
    low, high = SEED_RANGE
    seed = body.get("seed")
    if _int(seed) and not low <= int(seed) <= high and float(low) <= float(seed) <= float(high):
        body["seed"] = min(max(int(seed), low), high)
    if context.operation.path == "/v1/chat/completions":
        _fit_tools(body)
    return body


# With tools, the tiny base's template adds its tool-use instructions (about 220 tokens) and each tool's
# JSON, so a chat with tools fits the fuzzed server's 512 tokens only when it is small: beyond one tool and
# this many characters of fuzzed text (at most 4 tokens each), the tools are left out, which keeps the request
# valid (the fuzzed server has no tool parser: its tool_choice is "none", which needs no tools).
MAX_FUZZ_TOOL_TEXT = 36


def _fit_tools(body: dict[str, Any]) -> None:
    tools, messages = body.get("tools"), body.get("messages")
    if not (isinstance(tools, list) and tools and isinstance(messages, list)):
        return
    # The fuzzed strings only: the JSON around them is a few tokens (counted in the 220).
    function = tools[0].get("function") if isinstance(tools[0], dict) else None
    function = function if isinstance(function, dict) else {}
    fields = (function.get("name"), function.get("description"), function.get("parameters"))
    text = "".join(text for field in fields for text in _strings(field))
    for message in messages:
        if isinstance(message, dict):
            text += "".join(_strings(message.get("content"))) + "".join(_strings(message.get("tool_calls")))
    if len(tools) > 1 or len(text) > MAX_FUZZ_TOOL_TEXT:
        del body["tools"]


def _strings(value: Any) -> list[str]:
    """Every string in a JSON value, keys included."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [text for key, item in value.items() for text in (str(key), *_strings(item))]
    if isinstance(value, list):
        return [text for item in value for text in _strings(item)]
    return []


# A chat's rendered prompt must fit the fuzzed server's context, another rule the schema cannot state (a
# prompt that fills it is a 400, as in vLLM): long conversations are not generated. A message renders to about
# 12 tokens plus its text's (at most 4 a character): 8 messages of 100 characters in all stay under 512.
MAX_FUZZ_MESSAGES, MAX_FUZZ_CHAT_CHARACTERS = 8, 100


@schemathesis.hook
def filter_body(context: schemathesis.HookContext, body: Any) -> bool:
    if context.operation is None or not isinstance(body, dict):
        return True
    if context.operation.path == "/v1/responses":
        # A response is a chat: `instructions`, then `input` (a string or messages).
        messages = body.get("input")
        if isinstance(messages, str):
            messages = [{"content": messages}]
        if isinstance(messages, list):
            messages = [*messages, {"content": body.get("instructions")}]
    elif context.operation.path == "/v1/chat/completions":
        messages = body.get("messages")
    else:
        return True
    if not isinstance(messages, list):
        return True
    texts = [str(message.get("content") or "") for message in messages if isinstance(message, dict)]
    return len(messages) <= MAX_FUZZ_MESSAGES and sum(map(len, texts)) <= MAX_FUZZ_CHAT_CHARACTERS
