"""Chats whose token ids show how a tokenizer and its chat template render prompts (the template lock).

Fixed forever: adapters' manifests store their ids (finetune.prompting.template_fingerprint), and `client
bench --tokenizer` compares an endpoint's rendering of them with a local tokenizer's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    """The position of the first token where two renderings differ (the shorter's length if one is the
    other's prefix); call it only on renderings that differ."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


GOLDEN_CHATS: tuple[tuple[Mapping[str, Any], ...], ...] = (
    ({"role": "user", "content": "Hello! What can you do?"},),
    (
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And another one?"},
    ),
)
