"""The README's configuration reference is generated from the typed configs and must stay current."""

from __future__ import annotations

import os
import re
from collections.abc import Callable

from tests.conftest import REPO_ROOT
from tests.readme_reference import finetune_reference, serve_reference

README = REPO_ROOT / "README.md"
BLOCKS: dict[str, Callable[[], str]] = {
    "finetune config": finetune_reference,
    "serve settings": serve_reference,
}


def _render(text: str) -> str:
    for name, generate in BLOCKS.items():
        pattern = re.compile(
            rf"(<!-- BEGIN GENERATED: {re.escape(name)} -->\n).*?(<!-- END GENERATED: {re.escape(name)} -->)",
            flags=re.DOTALL,
        )
        match = pattern.search(text)
        assert match, f"README.md lacks the generated block {name!r}"
        text = text[: match.start()] + f"{match[1]}{generate()}\n{match[2]}" + text[match.end() :]
    return text


def test_configuration_reference_is_current() -> None:
    text = README.read_text(encoding="utf-8")
    expected = _render(text)
    if os.environ.get("UPDATE_README") == "1":
        README.write_text(expected, encoding="utf-8")
        return
    assert text == expected, (
        "README.md's configuration reference is stale: "
        "UPDATE_README=1 .venv/bin/python -m pytest tests/test_readme.py rewrites it"
    )


def test_every_config_field_is_documented() -> None:
    for name, generate in BLOCKS.items():
        undocumented = [row for row in generate().splitlines()[2:] if row.endswith("|  |")]
        assert not undocumented, f"{name}: fields without a description: {undocumented}"
