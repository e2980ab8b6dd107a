"""Schemathesis against the real server: every operation of the published OpenAPI schema with valid and
invalid input, under every check it has (no 5xx; status codes, content types, headers and bodies as the
schema says; invalid data refused and valid data accepted; no endpoint open without its key).

Runs the `st` CLI, as a user would against their deployment. The case count per operation is bounded for
`make test`; `make soak` runs many more (TUNESERVE_FUZZ_EXAMPLES).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import ADAPTERS, ADMIN_KEY, API_KEY, Server, start_server, stop_server, wait_healthy
from tests.finetune.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("TUNESERVE_FUZZ_EXAMPLES", "30"))


@pytest.fixture(scope="module")
def fuzzed_server(
    tiny_base: Path, adapters_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """Its own server over a copy of the adapters, since the fuzzer loads and unloads adapters as admin."""
    root = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(adapters_dir, root / "adapters")
    keys = ["--api-key", API_KEY, "--admin-api-key", ADMIN_KEY]
    running = start_server(tiny_base, root / "adapters", root / "server.log", *keys, "--max-model-len", "512")
    try:
        wait_healthy(running)
        yield running
    finally:
        stop_server(running)


def test_the_server_keeps_to_its_published_schema(fuzzed_server: Server, tmp_path: Path) -> None:
    # Half the generated model and adapter names are served ones, or nearly every generation, unload and
    # load case would stop at a 404 before reaching the engine.
    names = json.dumps([fuzzed_server.base_model, *ADAPTERS])
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        f"[dictionaries.served]\nvalues = {names}\n\n[parameters]\n"
        '"body.model" = { dictionary = "served", probability = 0.5 }\n'
        '"body.lora_name" = { dictionary = "served", probability = 0.5 }\n'
        '"body.lora_path" = { dictionary = "served", probability = 0.5 }\n'
    )
    command = [
        str(Path(sys.executable).with_name("st")),
        "--config-file",
        str(config),
        "run",
        f"{fuzzed_server.url}/openapi.json",
        "--header",
        f"Authorization: Bearer {ADMIN_KEY}",
        "--checks",
        "all",
        "--max-examples",
        str(EXAMPLES),
        "--seed",
        "0",  # the same cases every run: a failure in CI reproduces here
        "--generation-database",
        "none",
        "--request-timeout",
        "60",
        "--workers",
        "1",
        "--continue-on-failure",
        "--no-color",
        "--report-dir",
        str(tmp_path),
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.serve.fuzz_hooks", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    report = result.stdout + result.stderr
    print(report[-3000:])
    assert result.returncode == 0, report[-12000:]
    cases = re.search(r"Test cases:\s*(\d+) generated", report)
    assert cases and int(cases.group(1)) >= 100, report[-3000:]
    assert "Traceback" not in fuzzed_server.log_text(), fuzzed_server.log_text()[-4000:]
