"""The Dockerfile's entrypoint and healthcheck work outside a container (no Docker engine runs here)."""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO_ROOT / "Dockerfile").read_text()


def instruction(name: str) -> str:
    """The (continuation-joined) argument of the last `name` instruction."""
    joined = DOCKERFILE.replace("\\\n", " ")
    matches = re.findall(rf"^{name}\s+(.*)$", joined, flags=re.M)
    assert matches, f"no {name} in the Dockerfile"
    return str(matches[-1]).strip()


def image_env() -> dict[str, str]:
    pairs = re.findall(r"(\w+)=(\S+)", instruction("ENV"))
    return {**os.environ, **dict(pairs)}


def local(command: list[str]) -> list[str]:
    """The image's command with its python3 replaced by this interpreter."""
    assert command[0] == "python3"
    return [sys.executable, *command[1:]]


def test_entrypoint_is_the_server_cli() -> None:
    entrypoint = json.loads(instruction("ENTRYPOINT"))
    assert entrypoint == ["python3", "-m", "serve"]
    shown = subprocess.run(local([*entrypoint, "--help"]), env=image_env(), capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert "--base-model" in shown.stdout and "--adapters-dir" in shown.stdout
    missing = subprocess.run(local(entrypoint), env=image_env(), capture_output=True, text=True)
    assert missing.returncode == 2
    assert "error: --base-model: Field required" in missing.stderr


def test_runs_as_non_root_and_exposes_the_served_port() -> None:
    user = instruction("USER").split(":")[0]
    assert user.isdigit() and int(user) != 0
    env = image_env()
    assert instruction("EXPOSE") == env["SERVE_PORT"]
    assert env["SERVE_HOST"] == "0.0.0.0"
    for source in re.findall(r"^COPY\s+(.*)\s+\S+$", DOCKERFILE, flags=re.M):
        for path in source.split():
            assert (REPO_ROOT / path).exists(), path


@pytest.fixture
def health_server() -> Iterator[tuple[int, list[int]]]:
    """A stand-in /health on a free port whose status the test sets."""
    status = [200]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status[0] if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], status
    finally:
        server.shutdown()


def test_healthcheck_follows_health(health_server: tuple[int, list[int]]) -> None:
    port, status = health_server
    command = json.loads(instruction("HEALTHCHECK").split("CMD", 1)[1])
    env = {**image_env(), "SERVE_PORT": str(port)}
    assert subprocess.run(local(command), env=env, capture_output=True).returncode == 0
    status[0] = 503
    assert subprocess.run(local(command), env=env, capture_output=True).returncode != 0


@pytest.mark.skipif(
    shutil.which("hadolint", path=str(Path(sys.executable).parent)) is None, reason="no hadolint"
)
def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint is not None
    result = subprocess.run([hadolint, str(REPO_ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
