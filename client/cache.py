"""On-disk cache of chat completions, so an interrupted benchmark re-asks only what is missing.

One JSONL file; each line is one answered request, keyed by the sha256 of (endpoint, model, messages,
sampling parameters), where the endpoint is its base URL or a scope name that stands for it. Lines are
appended and flushed as answers arrive.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)

CACHE_FILE = "responses.jsonl"


def request_key(base_url: str, model: str, messages: list[dict[str, str]], params: dict[str, Any]) -> str:
    """The cache key of one chat request: equal requests to the same endpoint share it.

    `base_url` may instead be a scope name (`bench --cache-scope`): servers of the same models on other
    addresses then share answers.
    """
    request = {"base_url": base_url.rstrip("/"), "model": model, "messages": messages, "params": params}
    return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass(frozen=True)
class Reply:
    """An assistant reply and why generation stopped ("stop", "length", ...; None when not recorded)."""

    text: str
    finish_reason: str | None = None


class ResponseCache:
    """Answers by request key, read from `<directory>/responses.jsonl` and appended to it.

    A line cut short by an interrupted run is skipped (with a warning) and its request asked again.
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / CACHE_FILE
        self._answers: dict[str, Reply] = {}
        self._file: IO[str] | None = None
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        skipped = 0
        with self.path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                    self._answers[record["key"]] = Reply(record["response"], record.get("finish_reason"))
                except (ValueError, KeyError, TypeError):
                    skipped += 1
        if skipped:
            logger.warning(
                "%s: skipped %d unreadable line(s); those requests will be asked again", self.path, skipped
            )

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, key: str) -> Reply | None:
        return self._answers.get(key)

    def put(self, key: str, reply: Reply, request: dict[str, Any]) -> None:
        """Store one answer; `request` (model, messages, params) is written beside it, for readers."""
        self._answers[key] = reply
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            ends_mid_line = (
                self.path.exists() and self.path.stat().st_size > 0 and not self._ends_with_newline()
            )
            self._file = self.path.open("a", encoding="utf-8")
            if ends_mid_line:  # an interrupted write: start a fresh line rather than extend the broken one
                self._file.write("\n")
        record = {"key": key, **request, "response": reply.text, "finish_reason": reply.finish_reason}
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def _ends_with_newline(self) -> bool:
        with self.path.open("rb") as f:
            f.seek(-1, 2)
            return f.read(1) == b"\n"

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
