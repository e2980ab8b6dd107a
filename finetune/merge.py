"""`python -m finetune merge --adapter DIR --out DIR`: the base with a LoRA adapter merged into its weights,
saved as an ordinary transformers model folder.

The folder holds the weights (safetensors), the config, the generation config and the base's tokenizer with
its chat template, so the export renders prompts exactly as training did and loads wherever a model loads
(transformers, vLLM, `python -m serve --base-model DIR`). `merge.json` records what it was made from.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from finetune.artifacts import publish
from finetune.servable import read_lora_config
from tuneserve import package_version
from tuneserve.manifest import adapter_files, folder_sha256, read_manifest

log = logging.getLogger(__name__)

MERGE_RECORD = "merge.json"
DTYPES = ("auto", "float32", "bfloat16", "float16")


class MergeError(Exception):
    """The adapter cannot be merged as asked; the message says why and what to do."""


def merge(
    adapter: Path, out: Path, *, base_model: str | None = None, dtype: str = "auto", force: bool = False
) -> Path:
    """Merge `adapter` into its base (the one its manifest or adapter_config.json names, or `base_model`)
    and write the merged model to `out` in one rename; returns `out`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise MergeError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    try:
        adapter_config = read_lora_config(adapter)
        manifest = read_manifest(adapter)
    except ValueError as exc:
        raise MergeError(str(exc)) from exc
    base, revision = _base_of(adapter, adapter_config, manifest, base_model)
    _check_base(adapter, manifest, base)
    if out.exists() and not force:
        raise MergeError(f"{out} already exists; pass --force to replace it")
    if out.resolve() == adapter.resolve() or (Path(base).is_dir() and out.resolve() == Path(base).resolve()):
        raise MergeError(f"--out {out} is the adapter's or the base's own folder; choose a new one")

    log.info("merging adapter %s into %s", adapter, base)
    torch_dtype: Any = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(base, revision=revision, dtype=torch_dtype)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(base, revision=revision)
    if not getattr(tokenizer, "chat_template", None):
        log.warning("the base's tokenizer has no chat template; the merged model has none either")

    staging = out.with_name(f".{out.name}.merging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        record = {
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "package": {"name": "tuneserve", "version": package_version()},
            "base_model": {"name": base, "revision": revision},
            "adapter": {
                "path": str(adapter.resolve()),
                "files": adapter_files(adapter),
                "manifest": manifest,
            },
            "dtype": str(merged.dtype).removeprefix("torch."),
        }
        (staging / MERGE_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True), encoding="utf-8")
        publish(staging, out, overwrite=force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("merged model written to %s", out)
    return out


def _base_of(
    adapter: Path, config: dict[str, Any], manifest: dict[str, Any] | None, given: str | None
) -> tuple[str, str | None]:
    """The base to merge into, and its revision: --base-model, else the manifest's, else the config's."""
    if given is not None:
        return given, None
    declared = (manifest or {}).get("base_model") or {}
    if declared.get("source") == "local" and Path(declared.get("path", "")).is_dir():
        return declared["path"], None
    if declared.get("source") == "hub":
        return declared["name"], declared.get("commit") or declared.get("revision")
    name = config.get("base_model_name_or_path")
    if not name:
        raise MergeError(f"{adapter} names no base model; pass --base-model PATH_OR_HUB_ID")
    return str(name), None


def _check_base(adapter: Path, manifest: dict[str, Any] | None, base: str) -> None:
    """A local base whose content differs from the one the adapter was trained on is refused."""
    expected = ((manifest or {}).get("base_model") or {}).get("content_sha256")
    if expected is None or not Path(base).is_dir():
        return
    if folder_sha256(Path(base)) != expected:
        raise MergeError(
            f"{base} is not the base {adapter} was trained on: its manifest records base content "
            f"sha256 {expected[:12]}…, this folder's differs; pass the base it was trained on as --base-model"
        )
