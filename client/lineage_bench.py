"""`python -m client bench --lineage DIR[,DIR...]`: forgetting, measured across an adapter's versions.

Each adapter folder made by `finetune run` records the data it was trained on and the adapter it was continued
from (`init_from`); this reads those records back (tuneserve.manifest), and asks the endpoint's base and every
version in the lineages the held-out prompts of every data set in them (the `test.jsonl` that `client tasks`
and `client distill` write beside `train.jsonl`) and IFEval. The result is a version x task matrix in which
each version is tested against its parent, item by item (exact McNemar, Holm across the matrix): what a
continued run learnt, and what it forgot, with or without replay.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.bench import BenchError, ChatRunner, run_bench
from client.endpoint import served_models
from client.suite import SuiteResult
from tuneserve.manifest import LineageError, lineage
from tuneserve.stats import PairedTest, format_p, holm, paired_tests
from tuneserve.tables import format_value, markdown_table

if TYPE_CHECKING:
    from client.bench import BenchConfig

HELD_OUT = "test.jsonl"  # beside a train.jsonl, as `client tasks` and `client distill` write them
HEADLINE = {"tasks": "accuracy", "ifeval": "prompt_strict"}  # the metric a column shows and tests
SIGNIFICANT = 0.05


@dataclass(frozen=True)
class Version:
    """One adapter version of the lineages: served under its folder's name, tested against its parent."""

    name: str
    path: str
    version: str
    parent: str | None  # the parent version's name; None: continued from nothing (its parent is the base)
    data: tuple[str, ...]  # the data sets it was trained on, as its manifest records them


@dataclass(frozen=True)
class Column:
    """A task of the matrix: the held-out items of one data set of the lineage, or IFEval."""

    name: str
    suite: str
    data: str | None  # None: the IFEval prompts shipped in the package
    trained_by: tuple[str, ...] = ()  # the versions trained on its data set


@dataclass
class LineagePlan:
    versions: list[Version]
    columns: list[Column]
    skipped: list[str] = field(default_factory=list)  # data sets without held-out items, and why


def _suite_of(path: Path) -> str:
    """`tasks` for items with checks (`client tasks`), `ifeval` for IFEval's format (`client distill`)."""
    with path.open(encoding="utf-8") as lines:
        first = next((line for line in lines if line.strip()), None)
    if first is None:
        raise BenchError(f"{path}: no held-out items in it")
    try:
        record = json.loads(first)
    except ValueError as err:
        raise BenchError(f"{path}: the first item is not valid JSON ({err})") from err
    if isinstance(record, dict) and "checks" in record:
        return "tasks"
    if isinstance(record, dict) and "instruction_id_list" in record:
        return "ifeval"
    raise BenchError(
        f"{path}: held-out items need `checks` (as `python -m client tasks` writes them) or IFEval's "
        "`instruction_id_list` (as `python -m client distill` writes them)"
    )


def plan_lineage(adapters: Sequence[Path], ifeval_data: str | None) -> LineagePlan:
    """Every version of the lineages of `adapters`, oldest first (an ancestor shared by several appears once),
    and the matrix's columns: each data set's held-out items, then IFEval."""
    versions: dict[str, Version] = {}
    for adapter in adapters:
        try:
            chain = lineage(Path(adapter))
        except LineageError as err:
            raise BenchError(f"--lineage {adapter}: {err}") from err
        for entry in chain:
            if entry["status"] != "present":
                raise BenchError(
                    f"--lineage {adapter}: its ancestor {entry['path']} is {entry['status']}, so it cannot "
                    "be served; put the version its manifest records back, or benchmark from a newer version"
                )
        names = [Path(entry["path"]).name for entry in chain]
        for index, entry in reversed(list(enumerate(chain))):
            name = names[index]
            earlier = versions.get(name)
            if earlier is not None and earlier.version != entry["version"]:
                raise BenchError(
                    f"--lineage: two different adapters are both named {name!r} ({earlier.path} and "
                    f"{entry['path']}); each version is served under its folder's name, so rename one"
                )
            data = entry.get("data") or {}
            paths = data.get("paths") or ([data["source"]] if data.get("source") else [])
            versions[name] = Version(
                name=name,
                path=str(entry["path"]),
                version=str(entry["version"]),
                parent=names[index + 1] if index + 1 < len(chain) else None,
                data=tuple(str(path) for path in paths),
            )
    ordered = list(versions.values())

    columns: dict[str, Column] = {}
    skipped: list[str] = []
    by_file: dict[Path, str] = {}
    for version in ordered:
        for data_path in version.data:
            held_out = Path(data_path).parent / HELD_OUT
            if not held_out.is_file():
                note = f"{data_path}: no {HELD_OUT} beside it"
                if note not in skipped:
                    skipped.append(note)
                continue
            resolved = held_out.resolve()
            if resolved in by_file:
                name = by_file[resolved]
            else:
                name = held_out.parent.name or "data"
                while name in columns or name == "ifeval":
                    name += "'"
                by_file[resolved] = name
                columns[name] = Column(name=name, suite=_suite_of(held_out), data=str(held_out))
            column = columns[name]
            if version.name not in column.trained_by:
                columns[name] = replace(column, trained_by=(*column.trained_by, version.name))
    columns["ifeval"] = Column(name="ifeval", suite="ifeval", data=ifeval_data)
    return LineagePlan(versions=ordered, columns=list(columns.values()), skipped=skipped)


@dataclass
class Cell:
    """One version's score on one column, and its paired test against its parent (None for the base)."""

    score: float
    n: int
    test: PairedTest | None = None
    p_holm: float | None = None


def matrix(
    plan: LineagePlan, base: str, results: Mapping[str, Mapping[str, SuiteResult]]
) -> dict[str, dict[str, Cell]]:
    """Column -> model -> cell, with each version tested against its parent on the column's headline metric
    (paired by item) and the p-values Holm-adjusted over every test of the matrix."""
    cells: dict[str, dict[str, Cell]] = {}
    tested: list[Cell] = []
    for column in plan.columns:
        metric = HEADLINE[column.suite]
        by_model = results[column.name]
        row = cells[column.name] = {}
        for model, result in by_model.items():
            row[model] = Cell(score=result.metrics[metric], n=len(result.items))
        for version in plan.versions:
            parent = version.parent or base
            tests = paired_tests(by_model[parent].items, by_model[version.name].items, column.suite)
            row[version.name].test = tests[metric]  # the same prompts went to every model
            tested.append(row[version.name])
    adjusted = holm([cell.test.p_value for cell in tested if cell.test is not None])
    for cell, p_holm in zip(tested, adjusted, strict=True):
        cell.p_holm = p_holm
    return cells


def render_markdown(
    plan: LineagePlan, base: str, cells: Mapping[str, Mapping[str, Cell]], meta: Mapping[str, Any]
) -> str:
    models = [base, *(version.name for version in plan.versions)]
    parent_of = {version.name: version.parent or base for version in plan.versions}
    header = ["version", "parent", *(f"{column.name} ({column.suite})" for column in plan.columns)]
    body = []
    for model in models:
        row = [f"`{model}`", f"`{parent_of[model]}`" if model in parent_of else "–"]
        for column in plan.columns:
            cell = cells[column.name][model]
            text = format_value(cell.score)
            if cell.test is not None and cell.p_holm is not None:
                mark = "*" if cell.p_holm < SIGNIFICANT else ""
                text += f" ({cell.test.difference:+.3f}, {format_p(cell.p_holm)}{mark})"
            if model in column.trained_by:
                text = f"**{text}**"
            row.append(text)
        body.append(row)
    lines = [
        "# Forgetting across a lineage",
        "",
        f"Endpoint {meta.get('base_url')}; sampling {meta.get('sampling')}; items per column "
        f"{meta.get('limit') or 'all'}. Rows: the base and each adapter version, oldest first; columns: the "
        "held-out items of each data set of the lineage, then IFEval. A cell is the share of items passed "
        "(tasks: every check; IFEval: prompt-level strict); in brackets, the difference from the row's "
        "parent and the exact McNemar p-value, paired by item and Holm-adjusted over the whole matrix "
        f"(* below {SIGNIFICANT}). Bold: the version was trained on that column's data set.",
        "",
        *markdown_table(header, body, "llr"),
        "",
        "Held-out data per column:",
        "",
        *(f"- `{column.name}`: {column.data or 'IFEval (packaged, 541 prompts)'}" for column in plan.columns),
    ]
    if plan.skipped:
        lines += ["", "Data sets without a column:", "", *(f"- {note}" for note in plan.skipped)]
    lines += ["", "Each column's full report (per family or instruction type): `columns/NAME/report.md`.", ""]
    return "\n".join(lines)


def plot_matrix(plan: LineagePlan, base: str, cells: Mapping[str, Mapping[str, Cell]], path: Path) -> None:
    """forgetting.png: the matrix as a heat map, each cell's score and its change from the parent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [base, *(version.name for version in plan.versions)]
    columns = [column.name for column in plan.columns]
    values = [[cells[column][model].score for column in columns] for model in models]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(columns) + 2.5), max(2.5, 0.6 * len(models) + 1.5)))
    ax.imshow(values, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for i, model in enumerate(models):
        for j, column in enumerate(columns):
            cell = cells[column][model]
            label = f"{cell.score:.2f}"
            if cell.test is not None and cell.p_holm is not None:
                label += f"\n{cell.test.difference:+.2f}{'*' if cell.p_holm < SIGNIFICANT else ''}"
            ax.text(j, i, label, ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(models)), models)
    ax.set_title("share passed; change from parent (* Holm p < 0.05)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass
class LineageReport:
    paths: dict[str, Path]
    requests: int = 0
    cache_hits: int = 0
    cells: dict[str, dict[str, Cell]] = field(default_factory=dict)


async def run_lineage_bench(config: BenchConfig) -> LineageReport:
    """Plan the matrix, check the endpoint serves every version, run one bench per column, then test."""
    plan = plan_lineage(config.lineage, config.data)
    assert config.base_url is not None  # BenchConfig checks this
    versions = [version.name for version in plan.versions]
    probe = ChatRunner(config.base_url, config.api_key, max_attempts=1)
    try:
        listing = await served_models(probe.client, [*config.models, *versions], option="--lineage")
    finally:
        await probe.close()
    base = config.models[0] if config.models else _base_of(listing, versions[0])
    models = [base, *versions]
    results: dict[str, dict[str, SuiteResult]] = {}
    requests = cache_hits = 0
    cache_dir = config.cache_dir if config.cache_dir is not None else config.out / "cache"
    for column in plan.columns:
        column_config = config.model_copy(
            update={
                "suite": column.suite,
                "data": column.data,
                "lineage": [],
                "models": models,
                "out": config.out / "columns" / column.name,
                "cache_dir": cache_dir,
            }
        )
        report = await run_bench(column_config)
        results[column.name] = report.results
        requests += report.requests
        cache_hits += report.cache_hits
    cells = matrix(plan, base, results)
    meta = {
        "base_url": config.base_url,
        "sampling": asdict(config.sampling),
        "limit": config.limit,
        "base": base,
    }
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "lineage.json", "report": out / "lineage.md", "chart": out / "forgetting.png"}
    document = {
        "meta": meta,
        "versions": [asdict(version) for version in plan.versions],
        "columns": [asdict(column) for column in plan.columns],
        "skipped": plan.skipped,
        "matrix": {
            column: {
                model: {
                    "score": cell.score,
                    "n": cell.n,
                    "vs_parent": cell.test.as_dict() | {"p_holm": cell.p_holm} if cell.test else None,
                }
                for model, cell in row.items()
            }
            for column, row in cells.items()
        },
    }
    paths["results"].write_text(json.dumps(document, indent=2, allow_nan=False), encoding="utf-8")
    paths["report"].write_text(render_markdown(plan, base, cells, meta), encoding="utf-8")
    plot_matrix(plan, base, cells, paths["chart"])
    return LineageReport(paths=paths, requests=requests, cache_hits=cache_hits, cells=cells)


def _base_of(listing: Sequence[Mapping[str, Any]], adapter: str) -> str:
    """The base an adapter is served on, as the endpoint's model listing says (`parent`)."""
    entry = next(entry for entry in listing if entry.get("id") == adapter)
    parent = entry.get("parent")
    if not isinstance(parent, str) or not parent:
        raise BenchError(
            f"the endpoint does not say which base {adapter!r} runs on (no `parent` in its model listing); "
            "name the base with --models BASE"
        )
    return parent
