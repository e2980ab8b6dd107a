"""The demo's report: OUT/report.md, OUT/demo.json and charts, from what each stage wrote.

Everything is read back from the stages' own outputs (each adapter's metrics.json, each bench's
results.json, the training data's stats.json, load.json), so the report shows exactly what the commands
measured. Every comparison with the base is paired: the same prompts, an exact McNemar test.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneserve.stats import format_p, holm, per_type_tests
from tuneserve.tables import markdown_table, side_by_side

if TYPE_CHECKING:
    from collections.abc import Callable

    from pipeline.demo import Demo

IFEVAL_METRICS = ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _training(adapter: Path) -> dict[str, Any]:
    metrics = _read_json(adapter / "metrics.json")
    keys = ("steps", "initial_eval_loss", "final_eval_loss", "best_eval_loss", "tokens_per_s", "wall_seconds")
    return {key: metrics.get(key) for key in keys} | {"n_train": metrics["data"]["n_train"]}


def _tasks(demo: Demo) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, dict[str, float]]]]:
    """Per held-out split (each task's, and `suite`): model -> accuracy, and family -> model -> accuracy."""
    accuracy: dict[str, dict[str, float]] = {}
    per_family: dict[str, dict[str, dict[str, float]]] = {}
    for split in demo.task_tests:
        results = _read_json(demo.out / "bench" / f"tasks-{split}" / "results.json")["models"]
        accuracy[split] = {model: results[model]["metrics"]["accuracy"] for model in demo.models}
        families = (
            list(results[demo.served_base]["breakdown"])
            if split == "suite"
            else demo.catalog.task_names[split]
        )
        per_family[split] = {
            family: {model: results[model]["breakdown"][family]["accuracy"] for model in demo.models}
            for family in families
        }
    return accuracy, per_family


def _tiny_ifeval(demo: Demo) -> dict[str, dict[str, float]] | None:
    path = demo.out / "bench" / "ifeval" / "results.json"
    if "ifeval" in demo.skipped or not path.exists():
        return None
    results = _read_json(path)["models"]
    return {
        metric: {model: results[model]["metrics"][metric] for model in demo.models}
        for metric in IFEVAL_METRICS
    }


def _load(demo: Demo) -> list[dict[str, Any]]:
    levels = _read_json(demo.out / "load" / "load.json")["levels"]
    keys = (
        "max_concurrency",
        "completed",
        "failed",
        "request_throughput",
        "output_throughput",
        "median_ttft_ms",
        "p99_ttft_ms",
        "median_tpot_ms",
        "p99_tpot_ms",
        "median_e2el_ms",
    )
    return [{key: level[key] for key in keys} for level in levels]


def _tiny_headline(demo: Demo, tasks: dict[str, dict[str, float]]) -> str:
    lines = []
    for task in demo.config.task_names:
        base, tuned = tasks[task][demo.served_base], tasks[task][task]
        lines.append(
            f"adapter `{task}`: {tuned:.1%} of held-out {task} prompts followed, base {base:.1%} "
            f"({100 * (tuned - base):+.1f} points)"
        )
    return "\n".join(lines)


def _rel(demo: Demo, path: Path) -> str:
    return str(path.resolve().relative_to(demo.out.resolve()))


def write_demo_report(demo: Demo, machine: dict[str, Any], started: datetime) -> dict[str, Any]:
    """Write OUT/demo.json, OUT/report.md and the charts; returns the summary (demo.json's content)."""
    from pipeline.demo import config_dict

    summary: dict[str, Any] = {
        "flow": "tiny" if demo.config.tiny else "real",
        "started": started.isoformat(),
        "finished": datetime.now(UTC).isoformat(),
        "machine": machine,
        "config": config_dict(demo.config),
        "base_model": demo.base_model,
        "served_base": demo.served_base,
        "models": demo.models,
        "training": {name: _training(path) for name, path in demo.adapters.items()},
    }
    if demo.config.tiny:
        summary |= _tiny_results(demo)
    else:
        summary |= _real_results(demo)
    summary |= {
        "load": _load(demo),
        "skipped": demo.skipped,
        "timings_s": dict(demo.timings),
        "commands": demo.commands,
    }
    (demo.out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    sections = _tiny_sections(demo, summary) if demo.config.tiny else _real_sections(demo, summary)
    (demo.out / "report.md").write_text(_markdown(demo, summary, sections), encoding="utf-8")
    return summary


# --- the tiny base -------------------------------------------------------------------------------


def _tiny_results(demo: Demo) -> dict[str, Any]:
    tasks, per_family = _tasks(demo)
    if tasks:
        _plot_bars(
            demo.out / "tasks.png",
            list(tasks),
            demo.models,
            lambda model, split: tasks[split][model],
            ylabel="prompt-level accuracy",
            title="Held-out tasks: prompt-level accuracy",
        )
    return {
        "tasks": tasks,
        "tasks_per_family": per_family,
        "ifeval": _tiny_ifeval(demo),
        "headline": _tiny_headline(demo, tasks),
    }


def _tiny_sections(demo: Demo, summary: dict[str, Any]) -> list[str]:
    models = summary["models"]
    lines: list[str] = []
    if summary["tasks"]:
        lines += [
            "## Held-out tasks: prompt-level accuracy",
            "",
            "Rows are held-out splits: each adapter's own task, and `suite`, every family of `client tasks` "
            f"({demo.config.suite_per_family} prompts each). Test prompts use topic words that never occur "
            f"in training prompts. `{demo.served_base}` is the baseline; brackets: difference from it.",
            "",
            *side_by_side("held-out split", summary["tasks"], models),
            "",
            "![held-out accuracy](tasks.png)",
            "",
        ]
        for split, families in summary["tasks_per_family"].items():
            if len(families) > 1:
                lines += [f"Per family, `{split}` split:", "", *side_by_side("family", families, models), ""]
        lines += [
            "Full reports: "
            + ", ".join(f"[{split}](bench/tasks-{split}/report.md)" for split in summary["tasks"]),
            "",
        ]
    lines += ["## IFEval", ""]
    if summary["ifeval"] is None:
        lines += [f"Skipped: {demo.skipped.get('ifeval', 'no results')}.", ""]
    else:
        lines += [
            f"The first {demo.config.ifeval_limit} IFEval prompts, scored as the reference implementation "
            "scores them (the tiny base is far too small for IFEval: this shows the benchmark end to end).",
            "",
            *side_by_side("metric", summary["ifeval"], models),
            "",
            "Full report: [bench/ifeval/report.md](bench/ifeval/report.md)",
            "",
        ]
    return lines


# --- a real base ---------------------------------------------------------------------------------

ALPHA = 0.05


def _per_type_paired(results: dict[str, Any], base: str, models: list[str]) -> dict[str, Any]:
    """model -> instruction type -> paired test against the base, on one bench's results.json models."""
    return {
        model: {
            kind: test.as_dict()
            for kind, test in per_type_tests(results[base]["items"], results[model]["items"]).items()
        }
        for model in models
    }


def _real_results(demo: Demo) -> dict[str, Any]:
    config, base = demo.config, demo.served_base
    adapters = list(demo.adapters)
    focus = [demo.catalog.distill_families[task] for task in config.task_names]
    ifeval_document = _read_json(demo.out / "bench" / "ifeval" / "results.json")
    ifeval = ifeval_document["models"]
    heldout = _read_json(demo.out / "bench" / "heldout" / "results.json")["models"]
    per_type_paired = _per_type_paired(ifeval, base, adapters)
    types = sorted(ifeval[base]["breakdown"])
    summary = {
        "focus_types": focus,
        "data": _read_json(demo.out / "data" / "distill" / "stats.json"),
        "ifeval": {
            "prompts": len(ifeval[base]["items"]),
            "metrics": {
                metric: {model: ifeval[model]["metrics"][metric] for model in demo.models}
                for metric in IFEVAL_METRICS
            },
            "per_type": {
                kind: {
                    "count": int(ifeval[base]["breakdown"][kind]["count"]),
                    **{model: ifeval[model]["breakdown"][kind]["strict"] for model in demo.models},
                }
                for kind in types
            },
            "paired": ifeval_document["paired"],  # written by bench (client.report)
            "per_type_paired": per_type_paired,
        },
        "heldout": {
            "per_family": {
                task: {model: heldout[model]["breakdown"][kind]["strict"] for model in demo.models}
                for task, kind in zip(config.task_names, focus, strict=True)
            },
            "paired": _per_type_paired(heldout, base, adapters),
        },
        "significant_losses": [
            {"model": model, "type": kind, **test}
            for model, tests in per_type_paired.items()
            for kind, test in tests.items()
            if test["lost"] > test["gained"] and test["p_value"] < ALPHA
        ],
    }
    _plot_types(demo, summary)
    summary["headline"] = _real_headline(demo, summary)
    return summary


def _share(test: dict[str, Any]) -> str:
    """ "9/12": how many the model followed, of those compared."""
    return f"{round(test['model_rate'] * test['n'])}/{test['n']}"


def _real_headline(demo: Demo, summary: dict[str, Any]) -> str:
    base = demo.served_base
    ifeval = summary["ifeval"]
    lines = []
    for name in demo.adapters:
        tasks = demo.config.task_names if name not in demo.config.task_names else (name,)
        parts = []
        for task in tasks:
            kind = demo.catalog.distill_families[task]
            test = ifeval["per_type_paired"][name].get(kind)
            if test is not None:
                base_share = f"{round(test['baseline_rate'] * test['n'])}/{test['n']}"
                parts.append(
                    f"IFEval `{kind}` {base_share} -> {_share(test)} "
                    f"(+{test['gained']} -{test['lost']}, {format_p(test['p_value'])})"
                )
        overall = ifeval["paired"][name]["prompt_strict"]
        parts.append(
            f"IFEval subset prompt-level strict {overall['baseline_rate']:.1%} -> "
            f"{overall['model_rate']:.1%} ({format_p(overall['p_value'])})"
        )
        lines.append(f"adapter `{name}` vs `{base}`: " + "; ".join(parts))
    losses = summary["significant_losses"]
    if losses:
        lines += [
            f"significant loss: `{loss['model']}` on `{loss['type']}` (+{loss['gained']} -{loss['lost']}, "
            f"{format_p(loss['p_value'])})"
            for loss in losses
        ]
    else:
        lines.append(f"no adapter lost significantly (p < {ALPHA}) on any IFEval instruction type")
    return "\n".join(lines)


def _plot_types(demo: Demo, summary: dict[str, Any]) -> None:
    """Instruction-level strict accuracy per targeted type (and all other types together), per model."""
    per_type = summary["ifeval"]["per_type"]
    focus = [kind for kind in summary["focus_types"] if kind in per_type]
    rest = [kind for kind in per_type if kind not in focus]

    def value(model: str, group: str) -> float:
        if group != "other types":
            return float(per_type[group][model])
        count = sum(per_type[kind]["count"] for kind in rest)
        return sum(per_type[kind][model] * per_type[kind]["count"] for kind in rest) / max(count, 1)

    _plot_bars(
        demo.out / "ifeval-types.png",
        [*focus, "other types"],
        demo.models,
        value,
        ylabel="instructions followed (strict)",
        title=f"IFEval subset ({summary['ifeval']['prompts']} prompts), per instruction type",
    )


def _plot_bars(
    path: Path,
    groups: list[str],
    models: list[str],
    value: Callable[[str, str], float],
    ylabel: str,
    title: str,
) -> None:
    """A grouped bar chart of fractions: one group per entry of `groups`, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / len(models)
    figure, axis = plt.subplots(figsize=(max(7, 2.2 * len(groups)), 4), dpi=120)
    for i, model in enumerate(models):
        axis.bar(
            [g + (i - (len(models) - 1) / 2) * width for g in range(len(groups))],
            [value(model, group) for group in groups],
            width,
            label=model,
        )
    axis.set_xticks(range(len(groups)), [group.split(":")[-1] for group in groups])
    axis.set_ylabel(ylabel)
    axis.set_ylim(0, 1)
    axis.set_title(title)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _paired_table(rows: list[tuple[str, str, dict[str, Any]]]) -> list[str]:
    """model, what, base, model, gained, lost, p, p (Holm) — Holm over the rows of this table."""
    adjusted = holm([test["p_value"] for _, _, test in rows]) if rows else []
    return markdown_table(
        ["model", "compared on", "base", "model", "gained", "lost", "p", "p (Holm)"],
        [
            [
                f"`{model}`",
                what,
                f"{round(test['baseline_rate'] * test['n'])}/{test['n']}",
                _share(test),
                str(test["gained"]),
                str(test["lost"]),
                format_p(test["p_value"]),
                format_p(p),
            ]
            for (model, what, test), p in zip(rows, adjusted, strict=True)
        ],
        "llr",
    )


def _real_sections(demo: Demo, summary: dict[str, Any]) -> list[str]:
    config, base, models = demo.config, demo.served_base, summary["models"]
    ifeval, data, focus = summary["ifeval"], summary["data"], summary["focus_types"]
    instruction_types = demo.catalog.distill_families
    overlap = data["ifeval_overlap"]["train"]
    base_column = {kind: row[base] for kind, row in ifeval["per_type"].items()}
    failing = [kind for kind in focus if base_column.get(kind) == 0.0]
    focus_rows = [
        (model, f"`{kind}` instructions", tests[kind])
        for model, tests in ifeval["per_type_paired"].items()
        for kind in focus
        if kind in tests
    ]
    overall_rows = [
        (model, f"{metric} ({tests[metric]['n']})", tests[metric])
        for model, tests in ifeval["paired"].items()
        for metric in ("prompt_strict", "instruction_strict")
    ]
    heldout_rows = [
        (model, f"`{task}` prompts", tests[instruction_types[task]])
        for model, tests in summary["heldout"]["paired"].items()
        for task in config.task_names
        if instruction_types[task] in tests
    ]
    lines = [
        "## The base, measured first",
        "",
        f"`{base}` on the demo's IFEval subset: {ifeval['prompts']} of IFEval's 541 prompts, fixed for every "
        f"run: {config.ifeval_per_type} carrying each targeted instruction type and {config.ifeval_others} "
        f"of every other type (seed {config.seed}; the list is `data/ifeval-subset.jsonl`). Greedy, "
        f"max_tokens {config.max_tokens}. Its answers are cached in `cache/` and reused by later runs.",
        "",
        f"Prompt-level strict {ifeval['metrics']['prompt_strict'][base]:.1%}, instruction-level strict "
        f"{ifeval['metrics']['instruction_strict'][base]:.1%}. Targeted types it never follows here: "
        + (", ".join(f"`{kind}`" for kind in failing) or "none")
        + ".",
        "",
        "## Training data: the base's own answers, rewritten to follow each constraint",
        "",
        f"`client distill` asked the base {data['questions_asked']} plain questions; "
        f"{data['complete_answers']} answers ended by themselves within {config.distill_max_tokens} tokens "
        "and were kept. Each family rewrites them to follow its constraint (upper-cased, lower-cased, "
        "wrapped in quotes, ...), adds the constraint to the question in one of several phrasings, and "
        "keeps the pair only if IFEval's own checker passes it. Held-out prompts use other topics and "
        "other phrasings.",
        "",
        *markdown_table(
            ["family", "IFEval type", "train items", "held-out prompts", "dropped (checker)"],
            [
                [
                    f"`{task}`",
                    f"`{instruction_types[task]}`",
                    str(counts["train"]),
                    str(counts["test"]),
                    str(counts["failed_check"] + counts["not_applicable"]),
                ]
                for task, counts in data["families"].items()
            ],
            "llr",
        ),
        "",
        f"No IFEval prompt in the training data: {overlap['sharing']} of {overlap['prompts']} training "
        f"prompts share a word {overlap['n']}-gram with any of IFEval's 541 prompts; the longest word n-gram "
        f'shared with IFEval has {overlap["longest"]} words ("{overlap["longest_example"]}").',
        "",
        "## IFEval subset: base vs adapters",
        "",
        *side_by_side("metric", ifeval["metrics"], models),
        "",
        "![IFEval per type](ifeval-types.png)",
        "",
        "Paired on the same prompts (exact McNemar test; gained: the base failed and the adapter followed; "
        "lost: the reverse; p adjusted with Holm's method over each table's rows):",
        "",
        *_paired_table(focus_rows),
        "",
        *_paired_table(overall_rows),
        "",
        "Per instruction type (instruction-level strict):",
        "",
        *side_by_side(
            "instruction type",
            {
                f"{kind} (n={row['count']})": {model: row[model] for model in models}
                for kind, row in ifeval["per_type"].items()
            },
            models,
        ),
        "",
    ]
    losses = summary["significant_losses"]
    lines += (
        [
            f"Significant losses (p < {ALPHA}, unadjusted): "
            + "; ".join(
                f"`{loss['model']}` on `{loss['type']}` (+{loss['gained']} -{loss['lost']}, "
                f"{format_p(loss['p_value'])})"
                for loss in losses
            ),
            "",
        ]
        if losses
        else [f"No adapter lost significantly (p < {ALPHA}, unadjusted) on any instruction type.", ""]
    )
    lines += [
        "Full report: [bench/ifeval/report.md](bench/ifeval/report.md)",
        "",
        "## Held-out prompts of each family",
        "",
        f"{config.n_test} prompts per family on topics and in phrasings absent from the training data, "
        "scored by IFEval's checkers:",
        "",
        *side_by_side("family", summary["heldout"]["per_family"], models),
        "",
        *_paired_table(heldout_rows),
        "",
        "Full report: [bench/heldout/report.md](bench/heldout/report.md)",
        "",
    ]
    return lines


# --- shared sections -----------------------------------------------------------------------------


def _markdown(demo: Demo, summary: dict[str, Any], sections: list[str]) -> str:
    models, machine = summary["models"], summary["machine"]
    lines = [
        "# Demo: fine-tune, serve, benchmark",
        "",
        f"Base `{summary['base_model']}` served as `{demo.served_base}`, with {len(demo.adapters)} LoRA "
        f"adapter(s): {', '.join(f'`{name}`' for name in demo.adapters)}. Run {summary['started']} on "
        f"{machine['platform']}, {machine['cpus']} CPUs, GPU: {machine['gpu'] or 'none'}; torch "
        f"{machine['torch']}, vLLM {machine['vllm']}, tuneserve {machine['tuneserve']}.",
        "",
        "## Headline",
        "",
        *[f"- {line}" for line in summary["headline"].splitlines()],
        "",
        *sections,
        "## Fine-tuning",
        "",
        *markdown_table(
            [
                "adapter",
                "train samples",
                "steps",
                "eval loss before",
                "eval loss after",
                "tokens/s",
                "wall (s)",
            ],
            [
                [
                    f"`{name}`",
                    str(t["n_train"]),
                    str(t["steps"]),
                    f"{t['initial_eval_loss']:.3f}",
                    f"{t['final_eval_loss']:.3f}",
                    f"{t['tokens_per_s']:.0f}",
                    f"{t['wall_seconds']:.0f}",
                ]
                for name, t in summary["training"].items()
            ],
            "lr",
        ),
        "",
        "Loss curves: "
        + ", ".join(f"[{name}]({_rel(demo, path / 'loss.png')})" for name, path in demo.adapters.items()),
        "",
        "## Load",
        "",
        f"`client load` over {', '.join(f'`{m}`' for m in models)} (round-robin), "
        f"{demo.config.load_input_len} input / {demo.config.load_output_len} output tokens, ignore_eos.",
        "",
        *markdown_table(
            [
                "concurrency",
                "ok",
                "failed",
                "req/s",
                "output tok/s",
                "TTFT p50 (ms)",
                "TTFT p99",
                "TPOT p50",
                "TPOT p99",
            ],
            [
                [
                    str(level["max_concurrency"]),
                    str(level["completed"]),
                    str(level["failed"]),
                    f"{level['request_throughput']:.2f}",
                    f"{level['output_throughput']:.1f}",
                    f"{level['median_ttft_ms']:.1f}",
                    f"{level['p99_ttft_ms']:.1f}",
                    f"{level['median_tpot_ms']:.1f}",
                    f"{level['p99_tpot_ms']:.1f}",
                ]
                for level in summary["load"]
            ],
            "r",
        ),
        "",
        "![load](load/load.png) Full report: [load/load.md](load/load.md)",
        "",
        "## Stages",
        "",
        *markdown_table(
            ["stage", "seconds"], [[stage, f"{s:.0f}"] for stage, s in summary["timings_s"].items()], "lr"
        ),
        "",
        "## Commands run",
        "",
        "```sh",
        *summary["commands"],
        "```",
        "",
    ]
    return "\n".join(lines)
