"""`bench --tokenizer PATH`: before any prompt is sent, check that the endpoint renders chats into the same
tokens as a local tokenizer (the one an adapter was trained with), so scores are not trusted from a server
whose chat template differs (another `--chat-template`, an export that lost it).

The endpoint's rendering comes from vLLM's `/tokenize` route (this server has it too); the local one is the
tokenizer's own chat template, rendered and then tokenized without adding special tokens, as vLLM and this
server render chats.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from client.bench import BenchError
from tuneserve.rendering import GOLDEN_CHATS, first_difference


def local_ids(tokenizer: Any, chat: Sequence[Mapping[str, Any]]) -> list[int]:
    text = tokenizer.apply_chat_template([dict(m) for m in chat], tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


async def check_rendering(base_url: str, api_key: str, models: Sequence[str], tokenizer_path: str) -> None:
    """BenchError naming the first token where the endpoint's rendering of a golden chat differs from the
    local tokenizer's, for any of `models`."""
    import httpx
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    except (OSError, ValueError) as err:
        raise BenchError(f"--tokenizer {tokenizer_path}: cannot load a tokenizer from it ({err})") from err
    root = base_url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(timeout=60) as http:
        for model in models:
            for index, chat in enumerate(GOLDEN_CHATS, start=1):
                try:
                    expected = local_ids(tokenizer, chat)
                except Exception:  # the template refuses this chat (e.g. a system turn): nothing to compare
                    continue
                body = {"model": model, "messages": [dict(m) for m in chat], "add_generation_prompt": True}
                try:
                    response = await http.post(f"{root}/tokenize", json=body, headers=headers)
                except httpx.HTTPError as err:
                    raise BenchError(f"--tokenizer: POST {root}/tokenize failed ({err})") from err
                if response.status_code == 404:
                    raise BenchError(
                        f"--tokenizer: {root}/tokenize is not there (vLLM's route), so the endpoint's "
                        "rendering cannot be compared; leave --tokenizer out to benchmark without the check"
                    )
                if response.status_code != 200:
                    raise BenchError(
                        f"--tokenizer: POST {root}/tokenize for {model!r} answered HTTP "
                        f"{response.status_code}: {response.text[:300]}"
                    )
                served = list(response.json()["tokens"])
                if served != expected:
                    raise BenchError(_difference(tokenizer, tokenizer_path, model, index, expected, served))


def _difference(
    tokenizer: Any, path: str, model: str, index: int, expected: list[int], served: list[int]
) -> str:
    position = first_difference(expected, served)

    def token(ids: list[int]) -> str:
        if position >= len(ids):
            return f"the end of the prompt ({len(ids)} tokens)"
        return f"{tokenizer.convert_ids_to_tokens(ids[position])!r} (id {ids[position]})"

    return (
        f"--tokenizer: the endpoint renders {model!r}'s prompts otherwise than the tokenizer at {path}: "
        f"golden conversation {index} of {len(GOLDEN_CHATS)} differs at token {position}: local "
        f"{token(expected)}, endpoint {token(served)}; serve the model with the chat template it was "
        "trained with before trusting its scores"
    )
