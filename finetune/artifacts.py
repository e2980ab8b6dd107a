"""What a finished run leaves besides the adapter weights.

The manifest, the loss plot, and the atomic move of the finished folder into place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from finetune.config import FinetuneConfig
from finetune.prompting import template_fingerprint
from tuneserve import package_version
from tuneserve.manifest import adapter_files, folder_sha256, weights_sha256

log = logging.getLogger(__name__)


def base_identity(base_model: str, revision: str | None, commit: str | None) -> dict[str, Any]:
    """Which base the adapter was trained on: a local folder's content hash, or a hub id and its commit."""
    local = Path(base_model)
    if local.is_dir():
        started = time.monotonic()
        content = folder_sha256(local)
        log.info("hashed base model folder %s in %.1fs", local, time.monotonic() - started)
        return {
            "source": "local",
            "name": base_model,
            "path": str(local.resolve()),
            "content_sha256": content,
            # Config and weights only: a server decides "the same network" by this, and how prompts are
            # rendered by the manifest's template fingerprint, so a changed template is named as such.
            "weights_sha256": weights_sha256(local),
        }
    return {"source": "hub", "name": base_model, "revision": revision, "commit": commit}


def set_adapter_base(adapter_dir: Path, base_model: str) -> None:
    """Record the base exactly as the user named it (hub id or path) in adapter_config.json."""
    config_path = adapter_dir / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    adapter_config["base_model_name_or_path"] = base_model
    config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True), encoding="utf-8")


def build_manifest(
    adapter_dir: Path,
    config: FinetuneConfig,
    model: Any,
    *,
    data_hash: str,
    metrics: dict[str, Any],
    data_paths: list[str] | None = None,
    tokenizer: Any = None,
) -> dict[str, Any]:
    commit = getattr(getattr(model, "config", None), "_commit_hash", None)
    return {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "package": {"name": "tuneserve", "version": package_version()},
        "base_model": base_identity(config.base_model, config.revision, commit),
        # paths: every data set read (@parent resolved), so a continued run can replay them.
        "data": {
            "source": config.data.path or metrics["data"]["source"],
            "paths": data_paths or [],
            "sha256": data_hash,
        },
        "lora": config.lora.model_dump(mode="json"),
        "steps": metrics["steps"],
        "final_eval_loss": metrics["final_eval_loss"],
        "files": adapter_files(adapter_dir),
        # How prompts were rendered in training; the server refuses to serve the adapter where it renders
        # them otherwise (the template lock).
        "template": template_fingerprint(tokenizer) if tokenizer is not None else None,
    }


def plot_loss(metrics: dict[str, Any], path: Path) -> None:
    """Train and eval loss against optimizer steps, and the task score on a second axis when measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4), dpi=120)
    train = metrics["train_loss"]
    evals = metrics["eval_loss"]
    if train:
        axis.plot([p["step"] for p in train], [p["loss"] for p in train], label="train loss", linewidth=1.2)
    if evals:
        axis.plot(
            [p["step"] for p in evals], [p["loss"] for p in evals], "o-", label="eval loss", linewidth=1.5
        )
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("cross-entropy per target token")
    axis.set_title("LoRA fine-tuning loss")
    axis.grid(alpha=0.3)
    handles, labels = axis.get_legend_handles_labels()
    scores = metrics.get("task_score") or []
    if scores:
        # A share in [0, 1] beside a loss in nats: its own axis, so neither curve is flattened.
        score_axis = axis.twinx()
        score_axis.plot(
            [p["step"] for p in scores],
            [p["score"] for p in scores],
            "s--",
            color="tab:green",
            label=f"task score ({scores[-1]['n']} prompts)",
            linewidth=1.5,
        )
        score_axis.set_ylim(0, 1)
        score_axis.set_ylabel("share of prompts followed")
        more_handles, more_labels = score_axis.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
        axis.set_title("LoRA fine-tuning loss and task score")
    if handles:
        axis.legend(handles, labels)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def make_readable(folder: Path) -> None:
    """Give files the usual umask permissions (safetensors writes 0600), so a server user can read them."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def publish(staging: Path, output_dir: Path, *, overwrite: bool) -> None:
    """Move a complete staging folder to output_dir with one rename, so readers never see half an adapter."""
    make_readable(staging)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    previous = None
    if output_dir.exists():
        if not overwrite:
            raise FileExistsError(f"{output_dir} already exists; set overwrite=true to replace it")
        previous = output_dir.with_name(output_dir.name + ".replaced")
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(output_dir, previous)
    os.replace(staging, output_dir)
    if previous is not None:
        shutil.rmtree(previous)
