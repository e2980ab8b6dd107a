"""Chats whose token ids show how a tokenizer and its chat template render prompts (the template lock).

Fixed forever: adapters' manifests store their ids (finetune.prompting.template_fingerprint), and `client
bench --tokenizer` compares an endpoint's rendering of them with a local tokenizer's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

GOLDEN_CHATS: tuple[tuple[Mapping[str, Any], ...], ...] = (
    ({"role": "user", "content": "Hello! What can you do?"},),
    (
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And another one?"},
    ),
)
