"""Markdown tables of reports: `markdown_table`, and `side_by_side` (models as columns, the first the
baseline).

Used by the `bench` report and the pipeline's report.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

ALIGN = {"l": "---", "r": "---:"}


def format_value(value: float | None) -> str:
    """A score with three decimals; "–" for none."""
    return "–" if value is None or math.isnan(value) else f"{value:.3f}"


def _cell(value: float | None, baseline: float | None, is_baseline: bool) -> str:
    if is_baseline or value is None or baseline is None:
        return format_value(value)
    return f"{format_value(value)} ({value - baseline:+.3f})"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str) -> list[str]:
    """A table's lines: `header`, the alignment row and `rows`. `align` has a letter a column, l or r; when
    it is shorter than the header its last letter stands for the remaining columns ("lr": the first column
    left, the others right)."""
    letters = align + align[-1] * (len(header) - len(align))

    def line(cells: Sequence[str]) -> str:
        return "|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|"

    return [line(header), "|" + "|".join(ALIGN[letter] for letter in letters) + "|", *map(line, rows)]


def side_by_side(label: str, rows: Mapping[str, Mapping[str, float | None]], models: list[str]) -> list[str]:
    """A table with one row per key of `rows` (row -> model -> value); the first model is the baseline."""
    body = []
    for row, values in rows.items():
        baseline = values.get(models[0])
        cells = [_cell(values.get(model), baseline, i == 0) for i, model in enumerate(models)]
        body.append([row, *cells])
    return markdown_table([label, *[f"`{model}`" for model in models]], body, "lr")
