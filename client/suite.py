"""What a benchmark suite is: the prompts to send to a model, and how its responses are scored.

`bench` sends every prompt of a suite to each model (through any OpenAI-compatible endpoint), then scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class BenchPrompt:
    """One benchmark item: the user turns to send in order (later turns follow the earlier replies)."""

    id: str
    turns: tuple[str, ...]
    system: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class SuiteResult:
    """Scores of one model on one suite.

    metrics: headline numbers (accuracies as fractions in [0, 1]); breakdown: the same per group
    (IFEval instruction type, task family, MT-Bench category); items: one dict per prompt with at least
    `id`, `responses` and the item's outcome.
    """

    suite: str
    metrics: dict[str, float]
    breakdown: dict[str, dict[str, float]]
    items: list[dict[str, Any]]


class Suite(Protocol):
    name: str

    def prompts(self) -> list[BenchPrompt]: ...

    def score(self, responses: dict[str, list[str]]) -> SuiteResult:
        """Score responses: prompt id -> one response per turn."""
        ...
