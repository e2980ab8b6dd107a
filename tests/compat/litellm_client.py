"""LiteLLM against the server, in its own process so that any connection LiteLLM tries beyond the server (its
model cost map, telemetry, a tokenizer download) is seen and refused: plain and streamed completion and the
typed error for an unknown model. Prints one JSON object for tests/compat to check.

usage: python litellm_client.py BASE_URL API_KEY MODEL QUESTION MAX_TOKENS
"""

from __future__ import annotations

import json
import sys
from typing import Any

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def refuse_the_network(outside: list[str]) -> None:
    """Record, then refuse, every name lookup or connection that is not to this machine."""

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "socket.getaddrinfo" and args[0] not in LOOPBACK:
            target = str(args[0])
        elif event == "socket.connect" and isinstance(args[1], tuple) and args[1][0] not in LOOPBACK:
            target = str(args[1][0])
        else:
            return
        outside.append(f"{event} {target}")
        raise OSError(f"tests/compat: no network beyond the server ({target})")

    sys.addaudithook(hook)


def main(argv: list[str]) -> int:
    base_url, api_key, model, question, max_tokens = argv
    outside: list[str] = []
    refuse_the_network(outside)
    import litellm  # after the hook: its import is what would fetch the cost map

    request: dict[str, Any] = {
        "model": f"openai/{model}",
        "api_base": base_url,
        "api_key": api_key,
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": int(max_tokens),
    }
    plain = litellm.completion(**request)
    parts, chunks, finish = [], 0, None
    for chunk in litellm.completion(**request, stream=True, stream_options={"include_usage": True}):
        chunks += 1
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    try:
        litellm.completion(**{**request, "model": "openai/no-such-model"})
        not_found: dict[str, Any] = {}
    except litellm.NotFoundError as error:
        not_found = {"class": type(error).__name__, "status": error.status_code, "message": error.message}
    result = {
        "plain": {
            "text": plain.choices[0].message.content,
            "finish_reason": plain.choices[0].finish_reason,
            "completion_tokens": plain.usage.completion_tokens,
        },
        "stream": {"text": "".join(parts), "chunks": chunks, "finish_reason": finish},
        "not_found": not_found,
        "outside": outside,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
