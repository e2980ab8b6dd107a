"""`client bench --lineage`: a version x task matrix over adapters continued from one another, each version
tested against its parent; planned from the manifests `finetune run` writes, run against the real server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.__main__ import main as client_main
from client.bench import BenchConfig
from client.lineage_bench import plan_lineage
from finetune.cli import main as finetune_main
from tests.e2e import start_server, stop_server, wait_healthy
from tests.finetune.conftest import REPO_ROOT, overrides

CONFIG = str(REPO_ROOT / "configs" / "tiny-demo.yaml")


def _train(tiny_base: Path, data: Path, out: Path, *extra: str) -> Path:
    args = overrides(tiny_base, data, out, "training.max_steps=40", "training.eval_every=40", *extra)
    assert finetune_main(["run", "--config", CONFIG, *args]) == 0
    return out


@pytest.fixture(scope="module")
def lineages(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """lowercase, then uppercase continued from it without replay (`uppercase`) and with (`uppercase-replay`):
    tasks whose replies contradict each other, so a continued run forgets unless the data keeps the old."""
    from client.tasks import write_task_data

    root = tmp_path_factory.mktemp("lineage-bench")
    lower = write_task_data(root / "data" / "lowercase", ["lowercase"], n_train=200, n_test=24, seed=0)
    upper = write_task_data(root / "data" / "uppercase", ["uppercase"], n_train=200, n_test=24, seed=1)
    adapters = root / "adapters"
    first = _train(tiny_base, lower["train"], adapters / "lowercase")
    _train(tiny_base, upper["train"], adapters / "uppercase", f"init_from={first}")
    _train(
        tiny_base,
        upper["train"],
        adapters / "uppercase-replay",
        f"init_from={first}",
        "data.path=",
        f"data.sources=[{{path: {upper['train']}}}, {{path: '@parent', count: 200}}]",
    )
    return {"root": root, "adapters": adapters}


@pytest.mark.slow
def test_the_plan_reads_the_versions_and_their_data_from_the_manifests(lineages: dict[str, Path]) -> None:
    adapters = lineages["adapters"]
    plan = plan_lineage([adapters / "uppercase", adapters / "uppercase-replay"], None)
    assert [(v.name, v.parent) for v in plan.versions] == [
        ("lowercase", None),
        ("uppercase", "lowercase"),
        ("uppercase-replay", "lowercase"),
    ]
    columns = {column.name: column for column in plan.columns}
    assert list(columns) == ["lowercase", "uppercase", "ifeval"]
    assert columns["lowercase"].trained_by == ("lowercase", "uppercase-replay")  # replay trained on it again
    assert columns["uppercase"].trained_by == ("uppercase", "uppercase-replay")
    assert columns["uppercase"].suite == "tasks" and columns["ifeval"].data is None
    assert Path(columns["uppercase"].data or "") == lineages["root"] / "data" / "uppercase" / "test.jsonl"


@pytest.mark.slow
def test_a_lineage_matrix_against_the_real_server(
    tiny_base: Path, lineages: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapters = lineages["adapters"]
    server = start_server(tiny_base, adapters, tmp_path / "server.log")
    try:
        wait_healthy(server)
        out = tmp_path / "bench"
        args = ["bench", "--base-url", f"{server.url}/v1", "--out", str(out), "--limit", "24"]
        lineage_flag = ["--lineage", f"{adapters / 'uppercase'},{adapters / 'uppercase-replay'}"]
        assert client_main([*args, *lineage_flag, "--no-progress"]) == 0
        printed = capsys.readouterr().out
        # Again: every answer comes from the cache.
        assert client_main([*args, *lineage_flag, "--no-progress"]) == 0
        assert " 0 request(s) sent" in capsys.readouterr().out
        # A version the server does not serve is named before any work.
        code = client_main([*args, "--lineage", str(tmp_path / "nowhere"), "--no-progress"])
        assert code == 2 and "nowhere" in capsys.readouterr().err
    finally:
        stop_server(server)

    assert "lineage: 4 model(s) on 3 column(s)" in printed
    document = json.loads((out / "lineage.json").read_text())
    base = document["meta"]["base"]
    assert base == str(tiny_base)  # from the endpoint's listing: the adapters' parent
    models = [base, "lowercase", "uppercase", "uppercase-replay"]
    parents = {"lowercase": base, "uppercase": "lowercase", "uppercase-replay": "lowercase"}
    for column, row in document["matrix"].items():
        assert list(row) == models
        column_results = json.loads((out / "columns" / column / "results.json").read_text())["models"]
        metric = "prompt_strict" if column == "ifeval" else "accuracy"
        assert row[base]["vs_parent"] is None
        for model in models:
            # The cell is the column's own benchmark's score ...
            assert row[model]["score"] == column_results[model]["metrics"][metric]
            assert row[model]["n"] == 24
        for model, parent in parents.items():
            # ... and the test pairs the version with its parent item by item.
            test = row[model]["vs_parent"]
            key = "prompt_strict" if column == "ifeval" else "passed"
            outcomes = {
                m: {item["id"]: item[key] for item in column_results[m]["items"]} for m in (model, parent)
            }
            gained = sum(outcomes[model][i] and not outcomes[parent][i] for i in outcomes[model])
            lost = sum(outcomes[parent][i] and not outcomes[model][i] for i in outcomes[model])
            assert (test["gained"], test["lost"]) == (gained, lost)
            assert test["p_value"] <= test["p_holm"] <= 1
    # The versions learnt their tasks: each beats its parent on its own new data set.
    scores = {
        column: {m: cell["score"] for m, cell in row.items()} for column, row in document["matrix"].items()
    }
    assert scores["lowercase"]["lowercase"] > scores["lowercase"][base]
    assert scores["uppercase"]["uppercase"] > scores["uppercase"]["lowercase"]
    report = (out / "lineage.md").read_text()
    assert "| `uppercase-replay` | `lowercase` |" in report
    assert (out / "forgetting.png").read_bytes()[:4] == b"\x89PNG"


def test_lineage_and_suite_are_one_or_the_other(tmp_path: Path) -> None:
    url = "http://127.0.0.1:1/v1"
    with pytest.raises(ValueError, match=r"give --suite .* or --lineage"):
        BenchConfig(base_url=url, models=["m"])
    with pytest.raises(ValueError, match=r"give --suite .* or --lineage"):
        BenchConfig(base_url=url, models=["m"], suite="tasks", lineage=[tmp_path])
    with pytest.raises(ValueError, match="--models names only the base"):
        BenchConfig(base_url=url, models=["base", "other"], lineage=[tmp_path])
    assert BenchConfig(base_url=url, lineage=[tmp_path]).models == []


def test_a_folder_without_a_manifest_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "plain").mkdir()
    args = ["bench", "--base-url", "http://127.0.0.1:1/v1", "--lineage", str(tmp_path / "plain")]
    assert client_main([*args, "--out", str(tmp_path / "o")]) == 2
    assert "has no manifest.json" in capsys.readouterr().err
