"""Telling a Hugging Face hub id from a local path, the same way everywhere a model or adapter is named."""

from __future__ import annotations

from pathlib import Path


def is_hub_id(value: str) -> bool:
    """`org/model` or `model`, not a path that exists here or is written as one (`/`, `./`, `../`, `~`)."""
    if not value or value.startswith(("/", "./", "../", "~")) or Path(value).exists():
        return False
    return value.count("/") <= 1 and "\\" not in value
