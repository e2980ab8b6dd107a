"""Data mixing (`data.sources`): counts and weights, repeats, duplicates across sources, a split per source,
every count in the report; config errors; and replay of a parent's data (@parent) in a real continued run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from finetune.cli import main
from finetune.config import ConfigError, DataConfig, DataSource, load_config
from finetune.data import DataError, load_data
from tests.finetune.conftest import REPO_ROOT, overrides


def chats(prefix: str, n: int) -> list[dict[str, Any]]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"{prefix} {i}?"},
                {"role": "assistant", "content": f"{i}."},
            ]
        }
        for i in range(n)
    ]


def write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_sources_mix_by_count_and_weight_with_every_count_reported(tmp_path: Path) -> None:
    a = write(tmp_path / "a.jsonl", chats("a", 20))
    b = write(tmp_path / "b.jsonl", chats("b", 10)[:8] + chats("a", 2))  # 2 records a also has
    c = write(tmp_path / "c.jsonl", chats("c", 10))
    cfg = DataConfig(
        sources=[
            DataSource(path=str(a)),
            DataSource(path=str(b), count=20),  # more than it holds: each record twice or more
            DataSource(path=str(c), weight=0.5),
        ],
        eval_fraction=0.2,
    )
    train, evaluation, report = load_data(cfg, seed=3)
    assert report.sources is not None
    a_counts, b_counts, c_counts = report.sources
    assert (a_counts["n_read"], a_counts["n_available"], a_counts["n_eval"], a_counts["n_sampled"]) == (
        20,
        16,
        4,
        16,
    )
    assert (b_counts["n_read"], b_counts["n_duplicates_across_sources"]) == (10, 2)
    assert (b_counts["n_available"], b_counts["n_eval"], b_counts["n_sampled"]) == (6, 2, 20)
    assert (c_counts["n_available"], c_counts["n_eval"], c_counts["n_sampled"]) == (8, 2, 4)
    assert len(train) == 16 + 20 + 4 == report.n_train and len(evaluation) == 8 == report.n_eval
    assert report.n_duplicates == 2 and report.n_read == 40
    b_train = [r for r in train if r.messages[0][1].startswith("b ")]
    assert len(b_train) == 20 and len({r.content_key() for r in b_train}) == 6  # 6 records, repeated
    assert not {r.content_key() for r in train} & {r.content_key() for r in evaluation}
    # The same input and seed give the same mix; another seed another one.
    assert load_data(cfg, seed=3)[2].data_hash == report.data_hash != load_data(cfg, seed=4)[2].data_hash


def test_a_bad_record_in_any_source_is_named_by_file_and_line(tmp_path: Path) -> None:
    a = write(tmp_path / "a.jsonl", chats("a", 5))
    b = write(tmp_path / "b.jsonl", [*chats("b", 2), {"messages": [{"role": "user", "content": ""}]}])
    cfg = DataConfig(sources=[DataSource(path=str(a)), DataSource(path=str(b), weight=2)])
    with pytest.raises(DataError, match=r"b\.jsonl:3: "):
        load_data(cfg, seed=0)


@pytest.mark.parametrize(
    ("overrides_", "message"),
    [
        (["data.path=x.jsonl", "data.sources=[{path: y.jsonl}]"], "data: .*either path .* or sources"),
        (
            ["data.sources=[{path: y.jsonl, weight: 1, count: 3}]"],
            r"data.sources.0: .*weight or count, not both",
        ),
        (["data.sources=[{path: y.jsonl}]", "data.limit=3"], "with sources, give each source a count"),
        (["data.sources=[{path: y.jsonl, weight: 0}]"], r"data.sources.0.weight: .*greater than 0"),
        (
            ["data.sources=[{path: '@parent', count: 3}]"],
            "@parent replays init_from's training data; set init_from",
        ),
    ],
)
def test_mix_config_errors_name_the_field(overrides_: list[str], message: str) -> None:
    import re

    with pytest.raises(ConfigError) as caught:
        load_config(None, ["base_model=b", "output_dir=o", *overrides_])
    assert re.search(message, str(caught.value)), str(caught.value)


def test_a_continued_run_replays_its_parents_data(tiny_base: Path, task_data: Path, tmp_path: Path) -> None:
    config = str(REPO_ROOT / "configs" / "tiny-demo.yaml")
    parent = tmp_path / "parent"
    assert (
        main(["run", "--config", config, *overrides(tiny_base, task_data, parent, "training.max_steps=2")])
        == 0
    )
    new = write(tmp_path / "new.jsonl", chats("new", 30))
    child = tmp_path / "child"
    mix = f"data.sources=[{{path: {new}}}, {{path: '@parent', count: 40}}]"
    extra = [f"init_from={parent}", mix, "training.max_steps=2"]
    # overrides() sets data.path; the mix replaces it.
    args = [a for a in overrides(tiny_base, new, child, *extra) if not a.startswith("data.path=")]
    assert main(["run", "--config", config, "data.path=null", *args]) == 0
    metrics = json.loads((child / "metrics.json").read_text())
    new_counts, replay = metrics["data"]["sources"]
    assert replay["path"] == "@parent" and replay["read_from"] == [str(task_data.resolve())]
    assert replay["n_sampled"] == 40 and new_counts["n_sampled"] == new_counts["n_available"]
    assert metrics["data"]["n_train"] == 40 + new_counts["n_available"]
    manifest = json.loads((child / "manifest.json").read_text())
    assert manifest["data"]["paths"] == [str(new.resolve()), str(task_data.resolve())]
