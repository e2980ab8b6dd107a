"""Rule-based checks of a reply's form (JSON keys, bullet count, case, length, start and end words, keywords).

The checks of `python -m client tasks` items: the client's benchmarks and fine-tuning's task evaluation score
replies with them. Each takes the stripped reply and its argument from an item's `checks` mapping.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def check_json_object(text: str, _: Any) -> bool:
    """The whole reply parses as a JSON object (no code fences, no text around it)."""
    return isinstance(_parse_json(text), dict)


def check_json_keys(text: str, keys: Sequence[str]) -> bool:
    """The reply is a JSON object whose keys are exactly `keys` (in any order)."""
    obj = _parse_json(text)
    return isinstance(obj, dict) and set(obj) == set(keys)


def check_bullet_count(text: str, n: int) -> bool:
    """Exactly `n` lines start with "- " (leading spaces allowed), each with text after the dash."""
    bullets = [line.lstrip() for line in text.splitlines() if line.lstrip().startswith("- ")]
    return len(bullets) == n and all(bullet[2:].strip() for bullet in bullets)


def check_all_uppercase(text: str, _: Any) -> bool:
    """The reply has letters and none of them is lowercase."""
    return any(ch.isalpha() for ch in text) and text == text.upper()


def check_all_lowercase(text: str, _: Any) -> bool:
    """The reply has letters and none of them is uppercase."""
    return any(ch.isalpha() for ch in text) and text == text.lower()


def check_wrapped_in_quotes(text: str, _: Any) -> bool:
    """The reply starts and ends with a double quote and has text between them."""
    return len(text) >= 2 and text[0] == '"' and text[-1] == '"' and bool(text[1:-1].strip())


def check_max_words(text: str, n: int) -> bool:
    """The reply has at least one and at most `n` whitespace-separated words."""
    return 1 <= len(text.split()) <= n


def check_ends_with(text: str, phrase: str) -> bool:
    """The reply ends with `phrase`, exactly (case and punctuation included)."""
    return text.endswith(phrase)


def check_starts_with_word(text: str, word: str) -> bool:
    """The reply's first word is `word`, ignoring case and punctuation attached to it ("Indeed," counts)."""
    words = text.split()
    return bool(words) and words[0].strip(string.punctuation).casefold() == word.casefold()


def check_includes_keywords(text: str, keywords: Sequence[str]) -> bool:
    """Every keyword occurs as a whole word, ignoring case."""
    return all(re.search(rf"\b{re.escape(word)}\b", text, flags=re.IGNORECASE) for word in keywords)


CHECKS: dict[str, Callable[[str, Any], bool]] = {
    "json_object": check_json_object,
    "json_keys": check_json_keys,
    "bullet_count": check_bullet_count,
    "all_uppercase": check_all_uppercase,
    "all_lowercase": check_all_lowercase,
    "wrapped_in_quotes": check_wrapped_in_quotes,
    "max_words": check_max_words,
    "ends_with": check_ends_with,
    "starts_with_word": check_starts_with_word,
    "includes_keywords": check_includes_keywords,
}


def check_reply(checks: Mapping[str, Any], response: str) -> tuple[bool, dict[str, bool]]:
    """Score `response` (surrounding whitespace ignored): overall pass, and each check's outcome."""
    text = response.strip()
    outcomes: dict[str, bool] = {}
    for name, argument in checks.items():
        check = CHECKS.get(name)
        if check is None:
            raise ValueError(f"unknown check {name!r}; known checks: {', '.join(CHECKS)}")
        outcomes[name] = check(text, argument)
    return bool(outcomes) and all(outcomes.values()), outcomes
