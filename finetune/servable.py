"""What vLLM's multi-LoRA engine can serve, checked before training and before serving.

Shared by `finetune` (refuse a config up front) and `serve` (refuse a bad adapter folder);
it imports nothing heavy so the server can use it at start-up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# vLLM's LoRAConfig accepts only these values of max_lora_rank (vllm/config/lora.py, MaxLoRARanks);
# an adapter's rank must be <= the server's max_lora_rank, which must be one of these.
VLLM_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# Module names vLLM's LoRA layers do not cover: embeddings and the output head.
UNSERVABLE_TARGETS: frozenset[str] = frozenset(
    {"lm_head", "embed_tokens", "wte", "wpe", "embed_in", "embed_out", "word_embeddings", "output"}
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def check_lora_settings(
    *,
    r: int,
    use_dora: bool = False,
    modules_to_save: list[str] | None = None,
    target_modules: list[str] | None = None,
) -> list[str]:
    """Problems (empty when fine) that would stop vLLM from serving an adapter with these settings."""
    problems = []
    if r > max(VLLM_LORA_RANKS):
        problems.append(f"r={r} is above the largest rank vLLM serves ({max(VLLM_LORA_RANKS)}); lower lora.r")
    if use_dora:
        problems.append("use_dora=true: vLLM cannot serve DoRA adapters; set lora.use_dora=false")
    if modules_to_save:
        problems.append(
            f"modules_to_save={modules_to_save}: vLLM cannot serve fully trained extra modules; "
            "remove lora.modules_to_save"
        )
    for name in target_modules or ():
        if name.rsplit(".", 1)[-1] in UNSERVABLE_TARGETS:
            problems.append(
                f"target module {name!r} is an embedding or output head, which vLLM's LoRA cannot serve; "
                "target the attention/MLP projections instead (or use all-linear)"
            )
    return problems


def smallest_servable_rank(r: int) -> int:
    """The `--max-lora-rank` a server needs for an adapter of rank r."""
    for rank in VLLM_LORA_RANKS:
        if rank >= r:
            return rank
    raise ValueError(f"rank {r} is above every rank vLLM accepts ({VLLM_LORA_RANKS})")


@dataclass(frozen=True)
class AdapterInfo:
    """The facts about a PEFT LoRA folder that decide whether it can be served."""

    path: Path
    base_model: str | None
    rank: int
    target_modules: tuple[str, ...]


def inspect_adapter(path: Path, *, max_lora_rank: int | None = None) -> AdapterInfo:
    """Read a PEFT LoRA folder and raise ValueError saying why it cannot be served, if it cannot."""
    config_path = path / ADAPTER_CONFIG
    if not path.is_dir():
        raise ValueError(f"adapter {path} is not a folder")
    if not config_path.is_file():
        raise ValueError(f"adapter {path} has no {ADAPTER_CONFIG}; it is not a PEFT adapter folder")
    try:
        raw: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"adapter {path}: cannot read {ADAPTER_CONFIG}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"adapter {path}: {ADAPTER_CONFIG} must hold a JSON object")
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter {path} is a {raw.get('peft_type')} adapter; only LoRA can be served")
    if not any((path / name).is_file() for name in ADAPTER_WEIGHTS):
        raise ValueError(f"adapter {path} has no weights file ({' or '.join(ADAPTER_WEIGHTS)})")
    rank = raw.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(
            f"adapter {path}: {ADAPTER_CONFIG} field 'r' must be a positive integer, not {rank!r}"
        )
    targets = raw.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"adapter {path}: {ADAPTER_CONFIG} field 'target_modules' must be a list of names")
    modules_to_save = raw.get("modules_to_save")
    if modules_to_save is not None and not isinstance(modules_to_save, list):
        modules_to_save = [str(modules_to_save)]
    problems = check_lora_settings(
        r=rank,
        use_dora=bool(raw.get("use_dora", False)),
        modules_to_save=modules_to_save,
        target_modules=list(targets),
    )
    if max_lora_rank is not None and rank > max_lora_rank:
        problems.append(f"rank {rank} is above the server's --max-lora-rank {max_lora_rank}")
    if problems:
        raise ValueError(f"adapter {path} cannot be served: " + "; ".join(problems))
    return AdapterInfo(
        path=path, base_model=raw.get("base_model_name_or_path"), rank=rank, target_modules=tuple(targets)
    )
