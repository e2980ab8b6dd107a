"""The demo's report: OUT/report.md, OUT/demo.json and OUT/tasks.png, from what each stage wrote.

Everything is read back from the stages' own outputs (each adapter's metrics.json, each bench's
results.json, load.json), so the report shows exactly what the commands measured.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.report import markdown_table, plot_headline, side_by_side
from client.suite import SuiteResult
from client.tasks import families_of

if TYPE_CHECKING:
    from client.demo import Demo

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
        families = list(results[demo.served_base]["breakdown"]) if split == "suite" else families_of(split)
        per_family[split] = {
            family: {model: results[model]["breakdown"][family]["accuracy"] for model in demo.models}
            for family in families
        }
    return accuracy, per_family


def _ifeval(demo: Demo) -> dict[str, dict[str, float]] | None:
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


def _headline(demo: Demo, tasks: dict[str, dict[str, float]]) -> str:
    lines = []
    for task in demo.config.tasks:
        base, tuned = tasks[task][demo.served_base], tasks[task][task]
        lines.append(
            f"adapter `{task}`: {tuned:.1%} of held-out {task} prompts followed, base {base:.1%} "
            f"({100 * (tuned - base):+.1f} points)"
        )
    return "\n".join(lines)


def _rel(demo: Demo, path: Path) -> str:
    return str(path.resolve().relative_to(demo.out.resolve()))


def write_demo_report(demo: Demo, machine: dict[str, Any], started: datetime) -> dict[str, Any]:
    from client.demo import config_dict

    out, models = demo.out, demo.models
    training = {name: _training(path) for name, path in demo.adapters.items()}
    tasks, per_family = _tasks(demo)
    ifeval = _ifeval(demo)
    load = _load(demo)
    summary: dict[str, Any] = {
        "started": started.isoformat(),
        "finished": datetime.now(UTC).isoformat(),
        "machine": machine,
        "config": config_dict(demo.config),
        "base_model": demo.base_model,
        "models": models,
        "training": training,
        "tasks": tasks,
        "tasks_per_family": per_family,
        "ifeval": ifeval,
        "load": load,
        "skipped": demo.skipped,
        "timings_s": dict(demo.timings),
        "commands": demo.commands,
        "headline": _headline(demo, tasks),
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if tasks:
        chart = {
            model: SuiteResult(
                suite="tasks",
                metrics={split: scores[model] for split, scores in tasks.items()},
                breakdown={},
                items=[],
            )
            for model in models
        }
        plot_headline(chart, out / "tasks.png", title="Held-out tasks: prompt-level accuracy")
    (out / "report.md").write_text(_markdown(demo, summary), encoding="utf-8")
    return summary


def _markdown(demo: Demo, summary: dict[str, Any]) -> str:
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
            right_aligned_from=1,
        ),
        "",
        "Loss curves: "
        + ", ".join(f"[{name}]({_rel(demo, path / 'loss.png')})" for name, path in demo.adapters.items()),
        "",
    ]
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
        limit = demo.config.ifeval_limit
        tiny = demo.config.base_model is None
        lines += [
            f"The first {limit} IFEval prompts, scored as the reference implementation scores them"
            + (
                " (the tiny base is far too small for IFEval: this shows the benchmark end to end)."
                if tiny
                else "."
            ),
            "",
            *side_by_side("metric", summary["ifeval"], models),
            "",
            "Full report: [bench/ifeval/report.md](bench/ifeval/report.md)",
            "",
        ]
    lines += [
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
            right_aligned_from=0,
        ),
        "",
        "![load](load/load.png) Full report: [load/load.md](load/load.md)",
        "",
        "## Stages",
        "",
        *markdown_table(
            ["stage", "seconds"], [[stage, f"{s:.0f}"] for stage, s in summary["timings_s"].items()], 1
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
