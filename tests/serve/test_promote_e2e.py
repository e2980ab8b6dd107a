"""Promotion through the gate, end to end on the real server: `client bench --gate` judges the adapters the
server lists (by version), and `POST /v1/lora_adapters/promote` moves an alias only on a passing report that
judged the version it serves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
import yaml

from client.__main__ import main as client_main
from client.tasks import write_task_data
from tests.e2e import ADMIN_KEY, start_server, stop_server, wait_healthy


def _gate(path: Path, min_change: float) -> Path:
    path.write_text(yaml.safe_dump({"rules": [{"metric": "accuracy", "min_change": min_change}]}))
    return path


@pytest.mark.slow
def test_an_alias_moves_only_on_a_passing_gate_for_the_served_version(
    adapters_dir: Path, tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    served = tmp_path / "adapters"
    served.mkdir()
    for name in ("fmt", "caps"):
        shutil.copytree(adapters_dir / name, served / name)
    tasks = write_task_data(tmp_path / "tasks", ["json_object", "uppercase"], n_train=0, n_test=4)["test"]
    server = start_server(tiny_base, served, tmp_path / "server.log", "--admin-api-key", ADMIN_KEY)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    try:
        wait_healthy(server)
        bench = ["bench", "--base-url", f"{server.url}/v1", "--models", f"{tiny_base},fmt,caps"]
        bench += [
            "--suite",
            "tasks",
            "--data",
            str(tasks),
            "--max-tokens",
            "16",
            "--out",
            str(tmp_path / "b"),
        ]
        # Any change passes this gate, none passes the other: accuracy cannot rise by 2.
        assert client_main([*bench, "--no-progress", "--gate", str(_gate(tmp_path / "ok.yaml", -1.0))]) == 0
        passing = json.loads((tmp_path / "b" / "gate.json").read_text())
        listing = httpx.get(f"{server.url}/v1/models").json()["data"]
        versions = {card["id"]: card["version"] for card in listing}
        assert passing["passed"] is True
        assert passing["versions"] == {str(tiny_base): None, "fmt": versions["fmt"], "caps": versions["caps"]}
        assert versions["fmt"].startswith("sha256:")  # the manifest's weights hash
        results = str(tmp_path / "b" / "results.json")
        fail = ["gate", "--results", results, "--gate", str(_gate(tmp_path / "no.yaml", 2.0))]
        assert client_main([*fail, "--out", str(tmp_path / "failing.json")]) == 1
        failing = json.loads((tmp_path / "failing.json").read_text())
        capsys.readouterr()

        def promote(model: str, gate: dict[str, object]) -> httpx.Response:
            body = {"alias": "prod", "model": model, "gate": gate}
            return httpx.post(f"{server.url}/v1/lora_adapters/promote", json=body, headers=admin, timeout=60)

        moved = promote("fmt", passing)
        assert moved.status_code == 200, moved.text
        assert moved.json() == {
            "alias": "prod",
            "model": "fmt",
            "version": versions["fmt"],
            "previous": None,
            "results_sha256": passing["results_sha256"],
        }
        refused = promote("caps", failing)
        assert refused.status_code == 409
        assert "failing rules: accuracy changes by at least +2.000" in refused.json()["error"]["message"]
        other_version = promote("caps", {**passing, "versions": {**passing["versions"], "caps": "sha256:0"}})
        assert (
            other_version.status_code == 409 and "judged 'caps' at version 'sha256:0'" in other_version.text
        )
        assert promote("nobody", passing).status_code == 404
        assert httpx.post(f"{server.url}/v1/lora_adapters/promote", json={}, timeout=30).status_code == 401
        status = httpx.get(f"{server.url}/v1/lora_adapters", headers=admin).json()
        assert status["aliases"] == {"prod": "fmt"}  # the refusals moved nothing

        assert promote("caps", passing).json()["previous"] == "fmt"
        answer = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"model": "prod", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            timeout=60,
        )
        assert answer.status_code == 200 and answer.json()["model"] == "prod"
    finally:
        stop_server(server)
