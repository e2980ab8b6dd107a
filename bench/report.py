"""How benchmark results become markdown: a section's header lines, tables, and the section of BENCHMARKS.md.

Each benchmark owns one section of BENCHMARKS.md, between `<!-- BEGIN bench: NAME -->` and
`<!-- END bench: NAME -->`, and rewrites only that section, so benchmarks can run separately; the prose after
a section, on what its figures mean, is written by hand.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT

BENCHMARKS_MD = REPO_ROOT / "BENCHMARKS.md"


def header_markdown(header: dict[str, Any]) -> list[str]:
    machine = header["machine"]
    gpu = machine["gpu"] or "no GPU"
    return [
        f"- command: `{header['command']}`",
        f"- machine: {machine['cpus']} CPUs ({machine['processor']}), {gpu}; {machine['platform']}",
        f"- software: torch {machine['torch']}, vLLM {machine['vllm']}, tuneserve {machine['tuneserve']}",
        f"- date: {header['date']}",
    ]


def update_section(name: str, markdown: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace the section of benchmark `name` in BENCHMARKS.md (appended if it is not there yet)."""
    begin, end = f"<!-- BEGIN bench: {name} -->", f"<!-- END bench: {name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), flags=re.DOTALL)
    match = pattern.search(text)
    if match:
        text = text[: match.start()] + block + text[match.end() :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


def publish_section(section: str, markdown: str, *, write: bool) -> None:
    """Print a benchmark's section and (with `write`) put it in BENCHMARKS.md."""
    print(markdown)
    if write:
        update_section(section, markdown)
