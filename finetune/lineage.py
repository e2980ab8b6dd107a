"""Continued tuning and its record: a run with `init_from=ADAPTER_DIR` starts from that adapter's weights, and
its manifest names the parent (version, data, base), so `python -m finetune lineage DIR` reads any adapter's
ancestry back.

The parent must fit the run: the same LoRA shape (rank, alpha, scaling, target modules) and the same base
(the content hash a local base had when the parent was trained, or the hub id).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune import servable
from tuneserve.manifest import ADAPTER_WEIGHTS, LineageError, adapter_files, adapter_version, folder_sha256
from tuneserve.manifest import read_manifest as manifest_of

if TYPE_CHECKING:
    from finetune.config import FinetuneConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Parent:
    """The adapter a run starts from, as its child's manifest records it."""

    path: Path
    files: dict[str, str]
    manifest: dict[str, Any] | None

    def data_paths(self) -> list[str]:
        """The data sets the parent was trained on (what @parent replays), as its manifest recorded them."""
        data = (self.manifest or {}).get("data") or {}
        paths = data.get("paths") or ([data["source"]] if data.get("source") else [])
        return [str(path) for path in paths]

    def record(self) -> dict[str, Any]:
        manifest = self.manifest or {}
        return {
            "path": str(self.path.resolve()),
            "version": adapter_version(self.files),
            "files": self.files,
            "data": manifest.get("data"),
            "base_model": manifest.get("base_model"),
            "steps": manifest.get("steps"),
        }


def read_parent(config: FinetuneConfig) -> Parent:
    """Check `config.init_from` against the run before any work: a LoRA field or the base that differs is
    refused, naming it."""
    assert config.init_from is not None
    path = Path(config.init_from)
    raw = _adapter_config(path)
    manifest = read_manifest(path)
    lora = config.lora
    ours = {"r": lora.r, "lora_alpha": lora.alpha, "use_rslora": lora.use_rslora}
    for field, value in ours.items():
        theirs = raw.get(field, False if field == "use_rslora" else None)
        if theirs != value:
            name = {"lora_alpha": "alpha"}.get(field, field)
            raise LineageError(
                f"init_from: lora.{name}={value!r} but the adapter at {path} has {field}={theirs!r}; "
                f"continue it with lora.{name}={theirs!r}"
            )
    declared_targets = ((manifest or {}).get("lora") or {}).get("target_modules")
    if declared_targets is not None and declared_targets != lora.target_modules:
        raise LineageError(
            f"init_from: lora.target_modules={lora.target_modules!r} but the adapter at {path} was trained "
            f"with {declared_targets!r}; continue it with the same target_modules"
        )
    _check_base(path, manifest, config)
    return Parent(path=path, files=adapter_files(path), manifest=manifest)


def load_parent_weights(model: Any, parent: Parent) -> None:
    """Copy the parent's LoRA weights into the freshly built PEFT model; every LoRA matrix must match."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = parent.path / ADAPTER_WEIGHTS[0]
    if not weights.is_file():
        raise LineageError(f"init_from: {parent.path} has no {ADAPTER_WEIGHTS[0]} (only safetensors is read)")
    state = load_file(str(weights))
    expected = {key for key in model.state_dict() if "lora_" in key}
    try:
        result: Any = set_peft_model_state_dict(model, state)
    except RuntimeError as exc:  # a matrix of another shape
        raise LineageError(f"init_from: {parent.path} does not fit this run's model: {exc}") from exc
    unexpected = sorted(key for key in result.unexpected_keys if "lora_" in key)
    missing = sorted(key for key in result.missing_keys if "lora_" in key)
    if unexpected or missing or not expected:
        raise LineageError(
            f"init_from: the adapter at {parent.path} does not fit this run's LoRA layers "
            f"({len(missing)} of this run's LoRA matrices missing, e.g. {missing[:1]}; {len(unexpected)} "
            f"of its own unused, e.g. {unexpected[:1]}); continue it with the target_modules it was "
            "trained with"
        )
    log.info("starting from the weights of %s (%s)", parent.path, adapter_version(parent.files))


def read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        return manifest_of(path)
    except ValueError as exc:
        raise LineageError(str(exc)) from exc


def _adapter_config(path: Path) -> dict[str, Any]:
    try:
        return servable.read_lora_config(path)
    except ValueError as exc:
        raise LineageError(f"init_from: {exc}") from exc


def _check_base(path: Path, manifest: dict[str, Any] | None, config: FinetuneConfig) -> None:
    declared = (manifest or {}).get("base_model") or {}
    ours = Path(config.base_model)
    if declared.get("content_sha256") and ours.is_dir():
        if folder_sha256(ours) != declared["content_sha256"]:
            raise LineageError(
                f"init_from: the adapter at {path} was trained on another base (its manifest records base "
                f"content sha256 {declared['content_sha256'][:12]}…; {ours} differs); continue it on that "
                "base"
            )
    elif declared.get("source") == "hub" and declared.get("name") != config.base_model:
        raise LineageError(
            f"init_from: the adapter at {path} was trained on {declared.get('name')!r}, not "
            f"{config.base_model!r}; continue it on that base"
        )
