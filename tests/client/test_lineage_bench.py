"""`client bench --lineage`: a version x task matrix over adapters continued from one another, each version
tested against its parent; planned from the manifests `finetune run` writes, run against the real server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from client.__main__ import main as client_main
from client.bench import BenchConfig
from client.lineage_bench import plan_lineage
from pipeline.launch import free_port
from tests.e2e import start_server, stop_server, wait_healthy
from tests.finetune.conftest import REPO_ROOT

EXAMPLE = REPO_ROOT / "examples" / "forgetting.sh"
LIMIT = 24


@pytest.fixture(scope="module")
def example(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/forgetting.sh on the tiny base: lowercase, then uppercase continued from it without replay
    (`uppercase`) and with (`uppercase-replay`), tasks whose replies contradict each other; served and
    benchmarked as a lineage."""
    out = tmp_path_factory.mktemp("forgetting")
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "BASE": str(tiny_base),
        "CONFIG": str(REPO_ROOT / "configs" / "tiny-demo.yaml"),
        "STEPS": "40",
        "N_TEST": str(LIMIT),
        "LIMIT": str(LIMIT),
        "PORT": str(free_port()),
        "SERVE_ARGS": "--enforce-eager --dtype float32 --max-model-len 512 --kv-cache-memory-bytes 268435456",
    }
    done = subprocess.run(
        ["bash", str(EXAMPLE), str(out)], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1500
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "# Forgetting across a lineage" in done.stdout  # it prints the report
    return out


@pytest.mark.slow
def test_the_plan_reads_the_versions_and_their_data_from_the_manifests(example: Path) -> None:
    adapters = example / "adapters"
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
    assert Path(columns["uppercase"].data or "") == example / "data" / "uppercase" / "test.jsonl"


@pytest.mark.slow
def test_the_matrix_holds_each_columns_scores_and_pairs_each_version_with_its_parent(
    example: Path, tiny_base: Path
) -> None:
    out = example / "bench"
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
            assert row[model]["n"] == LIMIT
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


@pytest.mark.slow
def test_a_rerun_against_another_server_comes_from_the_cache(
    example: Path, tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapters = example / "adapters"
    server = start_server(tiny_base, adapters, tmp_path / "server.log")
    try:
        wait_healthy(server)
        args = ["bench", "--base-url", f"{server.url}/v1", "--out", str(example / "bench"), "--no-progress"]
        lineage = ["--lineage", f"{adapters / 'uppercase'},{adapters / 'uppercase-replay'}"]
        scope = ["--cache-scope", f"forgetting:{tiny_base}", "--limit", str(LIMIT)]  # as the example's
        assert client_main([*args, *lineage, *scope]) == 0
        assert "lineage: 4 model(s) on 3 column(s)" in (printed := capsys.readouterr().out)
        assert " 0 request(s) sent" in printed
        # A version the server does not serve is named before any work.
        (tmp_path / "unserved").mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors", "manifest.json"):
            shutil.copy(adapters / "lowercase" / name, tmp_path / "unserved" / name)
        assert client_main([*args, "--lineage", str(tmp_path / "unserved")]) == 2
        assert "--lineage: unserved not served" in capsys.readouterr().err
    finally:
        stop_server(server)


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
