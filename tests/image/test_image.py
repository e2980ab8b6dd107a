"""The CPU image, built (or its cached layers reused) and run the way the README tells users to run it.

Runs under `make image-test` only (TUNESERVE_IMAGE_TEST=1): a first build takes several minutes and the
image several gigabytes, too much for `make test`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.image import ImageError, build_image, container_engine, resource_flags
from pipeline.launch import free_port
from tests.e2e import QUESTIONS, engine_flags, start_server, stop_server, train_adapter, wait_healthy

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("TUNESERVE_IMAGE_TEST") != "1", reason="builds a container image: make image-test"
    ),
]
ADAPTER = "caps"
HEALTHY_WITHIN_S = 600
STOP_WITHIN_S = 10


@dataclass(frozen=True)
class Image:
    engine: str
    tag: str


@pytest.fixture(scope="module")
def image() -> Image:
    try:
        engine = container_engine()
    except ImageError as error:
        pytest.fail(str(error))
    return Image(engine, build_image(engine).tag)


@pytest.fixture(scope="module")
def mounts(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The base and an adapters folder holding one adapter, readable by the image's user (uid 1000)."""
    root = tmp_path_factory.mktemp("image")
    base = Path(shutil.copytree(tiny_base, root / "base"))
    adapters = root / "adapters"
    train_adapter(tiny_base, ["uppercase", "bullet_list"], root / "data", adapters / ADAPTER)
    for path in [base, adapters, *base.rglob("*"), *adapters.rglob("*")]:
        readable = 0o555 if path.is_dir() else 0o444
        path.chmod(path.stat().st_mode | readable)
    return base, adapters


def replies(base_url: str, models: list[str]) -> dict[str, str]:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    return {
        model: client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTIONS[1]}], max_tokens=24, temperature=0
        )
        .choices[0]
        .message.content
        or ""
        for model in models
    }


def inspect(image: Image, name: str, field: str) -> str:
    shown = subprocess.run(
        [image.engine, "inspect", "--format", field, name], capture_output=True, text=True, check=True
    )
    return shown.stdout.strip()


def wait_for_healthcheck(image: Image, name: str) -> float:
    """Seconds until the container's HEALTHCHECK reports healthy.

    podman runs healthchecks from systemd timers, which a machine without systemd lacks, so the check is
    triggered here as the timer would; docker's daemon runs them itself.
    """
    started = time.monotonic()
    while time.monotonic() - started < HEALTHY_WITHIN_S:
        if inspect(image, name, "{{.State.Running}}") != "true":
            pytest.fail(f"the container exited:\n{logs(image, name)}")
        if image.engine == "podman":
            subprocess.run([image.engine, "healthcheck", "run", name], capture_output=True)
        if inspect(image, name, "{{.State.Health.Status}}") == "healthy":
            return time.monotonic() - started
        time.sleep(2)
    pytest.fail(f"not healthy within {HEALTHY_WITHIN_S} s:\n{logs(image, name)}")


def logs(image: Image, name: str) -> str:
    shown = subprocess.run([image.engine, "logs", "--tail", "60", name], capture_output=True, text=True)
    return shown.stdout + shown.stderr


@pytest.fixture
def container(image: Image, mounts: tuple[Path, Path]) -> Iterator[tuple[str, str]]:
    """The README's `run` (plus this small machine's engine flags), detached; removed afterwards."""
    base, adapters = mounts
    port = free_port()
    name = f"tuneserve-test-{port}"
    command = [image.engine, "run", "-d", "--name", name, "--shm-size", "1g", *resource_flags(image.engine)]
    command += ["-p", f"{port}:8000", "-v", f"{adapters}:/adapters", "-v", f"{base}:/models/base", image.tag]
    command += ["--base-model", "/models/base", "--adapters-dir", "/adapters", *engine_flags()]
    subprocess.run(command, check=True, capture_output=True)
    try:
        yield name, f"http://127.0.0.1:{port}"
    finally:
        subprocess.run([image.engine, "rm", "-f", name], capture_output=True)


def test_image_serves_the_base_and_an_adapter_and_stops_on_sigterm(
    image: Image, mounts: tuple[Path, Path], container: tuple[str, str], tmp_path: Path
) -> None:
    name, url = container
    healthy_in = wait_for_healthcheck(image, name)
    assert (
        subprocess.run(
            [image.engine, "exec", name, "id", "-u"], capture_output=True, text=True, check=True
        ).stdout.strip()
        == "1000"
    )
    served = replies(url, ["/models/base", ADAPTER])
    assert served[ADAPTER] != served["/models/base"], "the adapter changed nothing"

    started = time.monotonic()
    subprocess.run([image.engine, "stop", "-t", "60", name], check=True, capture_output=True)
    stopped_in = time.monotonic() - started
    exit_code = int(inspect(image, name, "{{.State.ExitCode}}"))
    assert stopped_in < STOP_WITHIN_S, f"SIGTERM took {stopped_in:.1f} s:\n{logs(image, name)}"
    assert exit_code == 0, f"exit code {exit_code} after SIGTERM:\n{logs(image, name)}"
    print(f"{image.tag}: healthy {healthy_in:.0f} s after run, stopped {stopped_in:.1f} s after SIGTERM")

    # The same server and flags outside the container answer the same (greedy) text.
    base, adapters = mounts
    local = start_server(base, adapters, tmp_path / "local.log")
    try:
        wait_healthy(local)
        expected = replies(local.url, [str(base), ADAPTER])
    finally:
        stop_server(local)
    assert [served["/models/base"], served[ADAPTER]] == [expected[str(base)], expected[ADAPTER]]
