"""Telling a Hugging Face hub id from a local path, the same way everywhere a model, adapter or dataset is
named."""

from __future__ import annotations

import re
from pathlib import Path

# The hub's repo ids: an optional owner, then a name; letters, digits, `_`, `-` and `.`, starting with a
# letter or digit (so `./x`, `../x`, `~/x` and `/x` are never ids).
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def is_hub_id(value: str, *, owner_required: bool = False) -> bool:
    """`org/model` or `model` (`owner_required`: only `org/name`, as datasets are named), and not a path that
    exists here."""
    if owner_required and "/" not in value:
        return False
    return bool(_HUB_ID.match(value)) and not Path(value).exists()
