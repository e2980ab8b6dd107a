"""The Dockerfiles' entrypoint and healthcheck work outside a container; the CPU and GPU images keep one
contract. (tests/image builds and runs the CPU image: make image-test.)"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.image import (
    CPU_DOCKERFILE,
    GPU_DOCKERFILE,
    REQUIREMENTS,
    WHEELS,
    ImageError,
    container_engine,
    resource_flags,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
# Keyed by file name: a parameter id "gpu" would mark the test as needing one (tests/conftest.py).
DOCKERFILES = {path.name: path.read_text() for path in (GPU_DOCKERFILE, CPU_DOCKERFILE)}
DOCKERFILE = DOCKERFILES["Dockerfile"]
# What the server's users rely on, whichever image they run.
CONTRACT = ["ENTRYPOINT", "USER", "EXPOSE", "HEALTHCHECK", "WORKDIR"]


def instruction(name: str, dockerfile: str = DOCKERFILE) -> str:
    """The (continuation-joined) argument of the last `name` instruction."""
    joined = dockerfile.replace("\\\n", " ")
    matches = re.findall(rf"^{name}\s+(.*)$", joined, flags=re.M)
    assert matches, f"no {name} in the Dockerfile"
    return str(matches[-1]).strip()


def image_env(dockerfile: str = DOCKERFILE) -> dict[str, str]:
    pairs = re.findall(r"(\w+)=(\S+)", instruction("ENV", dockerfile))
    return {**os.environ, **dict(pairs)}


def local(command: list[str]) -> list[str]:
    """The image's command with its python3 replaced by this interpreter."""
    assert command[0] == "python3"
    return [sys.executable, *command[1:]]


def build_sources(dockerfile: str) -> list[str]:
    """Paths of the build context that COPY instructions copy and RUN --mount instructions mount."""
    copied = [
        path
        for source in re.findall(r"^COPY\s+(?!--from)(.*)\s+\S+$", dockerfile, flags=re.M)
        for path in source.split()
    ]
    return copied + re.findall(r"--mount=type=bind,source=([^,\s]+)", dockerfile)


def test_entrypoint_is_the_server_cli() -> None:
    entrypoint = json.loads(instruction("ENTRYPOINT"))
    assert entrypoint == ["python3", "-m", "serve"]
    shown = subprocess.run(local([*entrypoint, "--help"]), env=image_env(), capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert "--base-model" in shown.stdout and "--adapters-dir" in shown.stdout
    missing = subprocess.run(local(entrypoint), env=image_env(), capture_output=True, text=True)
    assert missing.returncode == 2
    assert "error: --base-model: Field required" in missing.stderr


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_runs_as_non_root_and_exposes_the_served_port(kind: str) -> None:
    dockerfile = DOCKERFILES[kind]
    user = instruction("USER", dockerfile).split(":")[0]
    assert user.isdigit() and int(user) != 0
    env = image_env(dockerfile)
    assert instruction("EXPOSE", dockerfile) == env["SERVE_PORT"]
    assert env["SERVE_HOST"] == "0.0.0.0"


def test_cpu_and_gpu_images_keep_one_contract() -> None:
    for name in CONTRACT:
        assert instruction(name, DOCKERFILES["Dockerfile.cpu"]) == instruction(name, DOCKERFILE), name
    cpu, gpu = image_env(DOCKERFILES["Dockerfile.cpu"]), image_env(DOCKERFILE)
    for name in ("SERVE_HOST", "SERVE_PORT", "HF_HOME", "PYTHONUNBUFFERED"):
        assert cpu[name] == gpu[name], name


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_build_context_holds_what_the_dockerfile_uses(kind: str) -> None:
    """Every COPY and mount source exists (or is what `python -m pipeline image` writes) and .dockerignore,
    which keeps the multi-gigabyte venv and caches out of the context, lets it in."""
    made_by_pipeline = {str(path.relative_to(REPO_ROOT)) for path in (REQUIREMENTS, WHEELS)}
    allowed = {
        line[1:] for line in (REPO_ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")
    }
    sources = build_sources(DOCKERFILES[kind])
    assert sources
    for path in sources:
        assert path in made_by_pipeline or (REPO_ROOT / path).exists(), path
        assert path in allowed, f"{path} is not let into the build context by .dockerignore"


def test_no_container_engine_is_an_actionable_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ImageError, match="apt-get install podman"):
        container_engine()
    with pytest.raises(ImageError, match="no docker on PATH"):
        container_engine("docker")


def test_podman_gets_this_hosts_resource_limits() -> None:
    import resource

    flags = resource_flags("podman")
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if nofile != resource.RLIM_INFINITY:
        assert f"nofile={nofile}:{nofile}" in flags
    assert resource_flags("docker") == []


def readme_section(heading: str) -> str:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(heading)
    return text[start : text.index("\n## ", start)]


def test_readme_docker_run_commands_parse_as_server_flags() -> None:
    """What the README tells users to run: the image's flags as the server parses them, and the shm size."""
    from serve.settings import ServeSettings

    section = readme_section("### Container images")
    commands = [
        shlex.split(command)
        for command in re.findall(r"^docker run .*?(?<!\\)$", section.replace("\\\n", " "), flags=re.M)
    ]
    assert len(commands) == 2
    for words in commands:
        assert "--shm-size" in words
        image = next(i for i, word in enumerate(words) if "tuneserve:" in word)
        settings = ServeSettings(_cli_parse_args=words[image + 1 :])
        mounted = {words[i + 1].split(":")[1] for i, word in enumerate(words[:image]) if word == "-v"}
        assert str(settings.adapters_dir) in mounted


def test_readme_kubernetes_deployment_matches_the_image() -> None:
    import yaml

    from serve.settings import ServeSettings

    blocks = re.findall(r"```yaml\n(.*?)```", readme_section("### Container images"), flags=re.S)
    (deployment,) = [doc for doc in map(yaml.safe_load, blocks) if doc.get("kind") == "Deployment"]
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    port = int(instruction("EXPOSE"))
    assert container["ports"] == [{"containerPort": port}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": port}
    assert pod["spec"]["securityContext"]["runAsUser"] == int(instruction("USER").split(":")[0])
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    settings = ServeSettings(_cli_parse_args=container["args"])
    assert {str(settings.adapters_dir), image_env()["HF_HOME"], "/dev/shm"} <= mounts.keys()
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    assert set(mounts.values()) == volumes.keys()
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


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
@pytest.mark.parametrize("kind", DOCKERFILES)
def test_hadolint_passes(kind: str) -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint is not None
    result = subprocess.run([hadolint, str(REPO_ROOT / kind)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
