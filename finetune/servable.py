"""What vLLM's multi-LoRA engine can serve, checked before training and before serving.

Shared by `finetune` (refuse a config up front) and `serve` (refuse a bad adapter folder, check it against
the manifest a run wrote); it imports nothing heavy so the server can use it at start-up.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneserve.manifest import ADAPTER_CONFIG, ADAPTER_WEIGHTS

# vLLM's LoRAConfig accepts only these values of max_lora_rank (vllm/config/lora.py, MaxLoRARanks);
# an adapter's rank must be <= the server's max_lora_rank, which must be one of these.
VLLM_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# Module names vLLM's LoRA layers do not cover: embeddings and the output head.
UNSERVABLE_TARGETS: frozenset[str] = frozenset(
    {"lm_head", "embed_tokens", "wte", "wpe", "embed_in", "embed_out", "word_embeddings", "output"}
)


def read_lora_config(folder: Path) -> dict[str, Any]:
    """A LoRA adapter folder's adapter_config.json; ValueError saying what is wrong with the folder."""
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        raise ValueError(f"{folder} has no {ADAPTER_CONFIG}: give the folder of a PEFT LoRA adapter")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {config_path}: {exc}") from exc
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{folder} is not a LoRA adapter")
    if not any((folder / name).is_file() for name in ADAPTER_WEIGHTS):
        raise ValueError(f"{folder} has no weights file ({' or '.join(ADAPTER_WEIGHTS)})")
    return config


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


# A PEFT LoRA matrix: `base_model.model.<module>.lora_A.weight` (an adapter name may sit before `.weight`).
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<matrix>A|B)(?:\.[^.]+)?\.weight$")


def _load_tensors(weights: Path) -> Mapping[str, Any]:
    """name -> torch tensor of a safetensors or PyTorch weights file (ValueError if it does not open)."""
    import torch

    if weights.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(weights))
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{weights.name} is not a readable safetensors file: {exc}") from exc
    try:
        loaded = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises pickle, zip and runtime errors alike
        raise ValueError(f"{weights.name} is not a readable PyTorch weights file: {exc}") from exc
    if not isinstance(loaded, dict) or not all(isinstance(t, torch.Tensor) for t in loaded.values()):
        raise ValueError(f"{weights.name} does not hold a dict of tensors")
    return loaded


def check_lora_weights(weights: Path, base_linears: Mapping[str, tuple[int, int]] | None = None) -> int:
    """The largest rank of a LoRA weights file; ValueError saying why it must not be served otherwise.

    Refused: no lora_A/lora_B pairs, a matrix without its partner, NaN or infinite values (a diverged run:
    served, they corrupt other requests' answers in the same batch), and, given the base's linear layers
    (module name -> (in_features, out_features), see base_linear_shapes), a module the base lacks or a
    matrix whose shape does not fit it (an adapter made for another model).
    """
    import torch

    tensors = _load_tensors(weights)
    matrices: dict[str, dict[str, tuple[int, ...]]] = {}
    non_finite = []
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            non_finite.append(key)
        match = _LORA_KEY.match(key)
        if match:
            matrices.setdefault(match["module"], {})[match["matrix"]] = tuple(tensor.shape)
    if non_finite:
        raise ValueError(
            f"{weights.name}: {len(non_finite)} of its {len(tensors)} tensors hold NaN or infinite values "
            f"(first: {non_finite[0]}); the training run that made it diverged: retrain it (a lower "
            "learning rate, gradient clipping)"
        )
    if not matrices:
        raise ValueError(f"{weights.name} holds no lora_A/lora_B weights; not a LoRA adapter")
    ranks = []
    for module, pair in sorted(matrices.items()):
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{weights.name}: {module} has lora_{''.join(pair)} but not its partner")
        a, b = pair["A"], pair["B"]
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise ValueError(
                f"{weights.name}: {module} has lora_A of shape {list(a)} and lora_B of shape {list(b)}; "
                "they must be (r, in) and (out, r)"
            )
        ranks.append(a[0])
        if base_linears is None:
            continue
        if module not in base_linears:
            example = next(iter(base_linears), "none")
            raise ValueError(
                f"{weights.name}: it adapts {module!r}, which the base model has no linear layer named so "
                f"(one it has: {example!r}); the adapter was made for another model"
            )
        in_features, out_features = base_linears[module]
        if (a[1], b[0]) != (in_features, out_features):
            raise ValueError(
                f"{weights.name}: {module} maps {a[1]} -> {b[0]} features, but the base model's layer maps "
                f"{in_features} -> {out_features}; the adapter was made for another model"
            )
    return max(ranks)


def base_linear_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """Module name -> (in_features, out_features) of every linear layer of the model a transformers config
    describes, from a skeleton on the meta device (no weights are read or allocated)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
