"""An adapter folder's record: its files' hashes (its version), the manifest `finetune run` writes beside
them, and the lineage those manifests chain together (`init_from`).

Shared: finetune writes and checks these, serve checks an adapter against its manifest, and the client
reads a lineage to benchmark every version of an adapter. Only file reading and hashing; nothing heavy.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


MANIFEST = "manifest.json"


class LineageError(ValueError):
    """A parent adapter that a run cannot start from, or a lineage that cannot be read."""


def file_sha256(path: Path, chunk: int = 1 << 23) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def folder_sha256(folder: Path, only: Callable[[Path], bool] | None = None) -> str:
    """One hash over every non-hidden file's relative path and content (a model folder's identity), or over
    the files `only` accepts (by relative path)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or (only is not None and not only(relative)):
            continue
        digest.update(f"{relative.as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def is_model_file(relative: Path) -> bool:
    """The files that make a model compute what it computes: its config and weights (not its tokenizer)."""
    name = relative.name
    return name == "config.json" or name.endswith(".index.json") or name.endswith(WEIGHT_SUFFIXES)


def weights_sha256(folder: Path) -> str:
    """A model folder's config and weights, hashed: the same network whatever its tokenizer files hold. How
    prompts are rendered is the template fingerprint's to check (finetune.prompting.template_fingerprint)."""
    return folder_sha256(folder, only=is_model_file)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest `finetune run` wrote into an adapter folder (None if there is none)."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    return manifest if isinstance(manifest, dict) else None


def adapter_files(folder: Path) -> dict[str, str]:
    """The adapter's own files (its config and weights) and their sha256: what a manifest records."""
    return {
        path.name: file_sha256(path)
        for path in sorted(folder.iterdir())
        if path.name.startswith("adapter_") and path.is_file()
    }


def adapter_version(files: Mapping[str, str]) -> str:
    """An adapter's identity from its files' hashes: the same weights and config, the same version."""
    return "sha256:" + hashlib.sha256(json.dumps(dict(files), sort_keys=True).encode()).hexdigest()[:12]


def lineage(path: Path) -> list[dict[str, Any]]:
    """The adapter at `path` and its ancestors, child first: what each manifest recorded, and whether each
    ancestor's folder is still there with the same files (`present`, `changed`, `missing`)."""
    manifest = _manifest(path)
    if manifest is None:
        raise LineageError(f"{path} has no {MANIFEST}: only adapters made by `finetune run` have a lineage")
    chain = [
        {
            "path": str(path.resolve()),
            "version": adapter_version(adapter_files(path)),
            "data": manifest.get("data"),
            "base_model": manifest.get("base_model"),
            "steps": manifest.get("steps"),
            "status": "present",
        }
    ]
    seen = {chain[0]["version"]}
    parent = manifest.get("parent")
    while parent is not None:
        folder = Path(parent["path"])
        entry = {key: parent.get(key) for key in ("path", "version", "data", "base_model", "steps")}
        found = _manifest(folder) if folder.is_dir() else None
        if not (folder / ADAPTER_CONFIG).is_file():
            entry["status"] = "missing"
        elif adapter_version(adapter_files(folder)) != parent["version"]:
            entry["status"] = "changed"  # other weights there now: its own record is not this one's
        else:
            entry["status"] = "present"
        chain.append(entry)
        if entry["status"] != "present" or entry["version"] in seen or found is None:
            break  # the record ends here, or goes no further than the parent's own recorded data
        seen.add(entry["version"])
        parent = found.get("parent")
    return chain


def _manifest(path: Path) -> dict[str, Any] | None:
    try:
        return read_manifest(path)
    except ValueError as exc:
        raise LineageError(str(exc)) from exc
