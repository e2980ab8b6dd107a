"""What `bench` writes: results.json (all of it, scoreable again), report.md (side by side), report.png.

The first model is the baseline: every other model's column shows its score and its difference from it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from client.suite import SuiteResult
from client.suites import paired_bleu
from tuneserve.stats import PairedInterval, PairedTest, format_p, holm, paired_intervals, paired_tests
from tuneserve.tables import format_value, markdown_table, side_by_side

# What a suite's breakdown groups are, for table headings.
GROUP_LABELS = {"tasks": "family", "ifeval": "instruction type", "mtbench": "category"}
COUNT = "count"  # a breakdown entry that counts items rather than scores them


def _ordered_keys(dicts: Sequence[Mapping[str, Any]]) -> list[str]:
    """Keys in order of first appearance across `dicts`."""
    return list(dict.fromkeys(key for each in dicts for key in each))


def paired_comparison(results: Mapping[str, SuiteResult]) -> dict[str, dict[str, PairedTest]]:
    """Model -> metric -> exact McNemar test against the first model (the baseline), on shared items.

    Models or suites without per-item pass/fail (or no items in common) are left out.
    """
    models = list(results)
    baseline = results[models[0]]
    comparison: dict[str, dict[str, PairedTest]] = {}
    for model in models[1:]:
        tests = paired_tests(baseline.items, results[model].items, baseline.suite)
        if tests:
            comparison[model] = tests
    return comparison


Intervals = dict[str, dict[str, PairedInterval]]


def interval_comparison(results: Mapping[str, SuiteResult]) -> Intervals:
    """Model -> metric -> paired bootstrap interval of its difference from the first model (the baseline),
    for the continuous scores (ROUGE-L, corpus BLEU, judge ratings); models without them are left out."""
    models = list(results)
    baseline = results[models[0]]
    comparison: Intervals = {}
    for model in models[1:]:
        intervals = paired_intervals(baseline.items, results[model].items, baseline.suite)
        if baseline.suite == "reference" and (bleu := paired_bleu(baseline.items, results[model].items)):
            intervals["bleu"] = bleu
        if intervals:
            comparison[model] = intervals
    return comparison


def interval_section(intervals: Intervals, baseline: str) -> list[str]:
    """report.md's "Paired bootstrap intervals" section; [] when no metric has one."""
    rows = [(model, metric, ci) for model, by_metric in intervals.items() for metric, ci in by_metric.items()]
    if not rows:
        return []
    confidence, resamples = rows[0][2].confidence, rows[0][2].resamples
    body = [
        [
            f"`{model}`",
            metric,
            str(ci.n),
            format_value(ci.baseline_mean),
            f"{format_value(ci.model_mean)} ({ci.difference:+.3f})",
            f"[{ci.low:+.3f}, {ci.high:+.3f}]",
        ]
        for model, metric, ci in rows
    ]
    header = ["model", "metric", "n", "baseline mean", "model mean", f"{confidence:.0%} CI of the difference"]
    return [
        "## Paired bootstrap intervals",
        "",
        f"Each model against `{baseline}` on the same items (per turn for ratings): items resampled with "
        f"both scores together, {resamples:,} resamples, seeded, BCa interval of the difference of means. An "
        "interval that excludes 0 is a difference at that confidence; the intervals are not adjusted for the "
        "number of comparisons.",
        "",
        *markdown_table(header, body, "llr"),
        "",
    ]


def paired_section(results: Mapping[str, SuiteResult]) -> list[str]:
    """report.md's "Paired comparison with the baseline" section; [] when there is nothing to pair."""
    comparison = paired_comparison(results)
    rows = [(model, metric, test) for model, tests in comparison.items() for metric, test in tests.items()]
    if not rows:
        return []
    adjusted = holm([test.p_value for _, _, test in rows])
    body = [
        [
            f"`{model}`",
            metric,
            str(test.n),
            format_value(test.baseline_rate),
            f"{format_value(test.model_rate)} ({test.difference:+.3f})",
            str(test.gained),
            str(test.lost),
            format_p(test.p_value),
            format_p(p_holm),
        ]
        for (model, metric, test), p_holm in zip(rows, adjusted, strict=True)
    ]
    header = ["model", "metric", "n", "baseline rate", "model rate", "gained", "lost", "p", "p (Holm)"]
    return [
        "## Paired comparison with the baseline",
        "",
        f"Each model against `{next(iter(results))}`: exact McNemar test on the same prompts; p adjusted "
        "for the number of comparisons with Holm's method (last column). n: items both models answered "
        "(instructions for instruction_strict); gained: the baseline failed and the model passed; lost: "
        "the baseline passed and the model failed.",
        "",
        *markdown_table(header, body, "llr"),
        "",
    ]


def render_markdown(
    meta: Mapping[str, Any], results: Mapping[str, SuiteResult], intervals: Intervals | None = None
) -> str:
    """report.md: run details, headline metrics side by side, then one table per breakdown metric.

    Between them, for suites with per-item pass/fail, the paired comparison with the baseline.
    """
    models = list(results)
    suite = str(meta.get("suite", next(iter(results.values())).suite))
    sampling = ", ".join(f"{key} {value}" for key, value in (meta.get("sampling") or {}).items())
    lines = [
        f"# Benchmark: {suite}",
        "",
        *markdown_table(
            ["run", ""],
            [
                ["endpoint", str(meta.get("base_url"))],
                ["models", ", ".join(f"`{model}`" for model in models) + " (first: baseline)"],
                [
                    "data",
                    f"{meta.get('data') or 'default'}"
                    + (f", first {meta['limit']}" if meta.get("limit") else ""),
                ],
                ["sampling", sampling],
                *(
                    [["judge", f"`{meta['judge']['model']}` at {meta['judge']['base_url']}"]]
                    if meta.get("judge")
                    else []
                ),
                ["started", str(meta.get("started"))],
                ["finished", str(meta.get("finished"))],
                ["tuneserve", str(meta.get("tuneserve_version"))],
            ],
            "llr",
        ),
        "",
        f"`{models[0]}` is the baseline; other columns show the score and, in brackets, its difference "
        "from the baseline.",
        "",
        "## Headline metrics",
        "",
    ]
    metric_names = _ordered_keys([result.metrics for result in results.values()])
    headline = {name: {model: results[model].metrics.get(name) for model in models} for name in metric_names}
    lines += [*side_by_side("metric", headline, models), ""]
    lines += paired_section(results)
    lines += interval_section(interval_comparison(results) if intervals is None else intervals, models[0])

    groups = _ordered_keys([result.breakdown for result in results.values()])
    if groups:
        label = GROUP_LABELS.get(suite, "group")
        per_group = [result.breakdown.get(group, {}) for result in results.values() for group in groups]
        for name in [key for key in _ordered_keys(per_group) if key != COUNT]:
            rows: dict[str, dict[str, float | None]] = {}
            for group in sorted(groups):
                count = next(
                    (r.breakdown[group].get(COUNT) for r in results.values() if group in r.breakdown), None
                )
                row = f"{group} (n={count:g})" if count is not None else group
                rows[row] = {model: results[model].breakdown.get(group, {}).get(name) for model in models}
            lines += [f"## Per {label}: {name}", "", *side_by_side(label, rows, models), ""]
    return "\n".join(lines)


def plot_headline(
    results: Mapping[str, SuiteResult],
    path: Path,
    title: str | None = None,
    intervals: Intervals | None = None,
) -> None:
    """report.png: a grouped bar chart, one group per headline metric, one bar per model; a model's bar has
    error bars where its difference from the baseline has a paired interval (drawn around its score)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results)
    metric_names = _ordered_keys([result.metrics for result in results.values()])
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(metric_names) * max(1, len(models)) / 2), 4.5))
    for index, model in enumerate(models):
        values = [results[model].metrics.get(name, math.nan) for name in metric_names]
        positions = [i + (index - (len(models) - 1) / 2) * width for i in range(len(metric_names))]
        errors = [[0.0] * len(metric_names), [0.0] * len(metric_names)]
        for i, name in enumerate(metric_names):
            ci = (intervals or {}).get(model, {}).get(name)
            if ci is not None:
                errors[0][i], errors[1][i] = ci.difference - ci.low, ci.high - ci.difference
        label = model if len(model) <= 40 else "…" + model[-39:]
        has_errors = any(errors[0]) or any(errors[1])
        bars = ax.bar(positions, values, width, label=label, yerr=errors if has_errors else None, capsize=4)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(metric_names)), metric_names)
    suite = next(iter(results.values())).suite
    ax.set_title(title or f"{suite}: headline metrics per model")
    ax.legend(fontsize=8)
    # Fractions (accuracies) on a 0-1 axis even when all are zero; other scales (MT-Bench 1-10) to fit.
    highest = max(
        (value for r in results.values() for value in r.metrics.values() if not math.isnan(value)), default=0
    )
    ax.set_ylim(0, 1.1 if highest <= 1 else highest * 1.15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path, meta: Mapping[str, Any], results: Mapping[str, SuiteResult]) -> dict[str, Path]:
    """Write results.json, report.md and report.png into `out`; returns their paths by kind."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.json", "report": out / "report.md", "chart": out / "report.png"}
    paired = {
        model: {metric: test.as_dict() for metric, test in tests.items()}
        for model, tests in paired_comparison(results).items()
    }
    intervals = interval_comparison(results)
    document = {
        "meta": dict(meta),
        "models": {model: asdict(result) for model, result in results.items()},
        "paired": paired,
        "intervals": {
            model: {metric: ci.as_dict() for metric, ci in by_metric.items()}
            for model, by_metric in intervals.items()
        },
    }
    paths["results"].write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["report"].write_text(render_markdown(meta, results, intervals) + "\n", encoding="utf-8")
    plot_headline(results, paths["chart"], intervals=intervals)
    return paths
