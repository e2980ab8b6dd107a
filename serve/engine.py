"""The vLLM async engine (same process as the API), built from the server settings with LoRA enabled, and
`EngineClient`: the part of it the serving layer uses (a fake engine implements it in tests)."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any, Protocol

from serve.settings import ServeSettings

if TYPE_CHECKING:
    from vllm import RequestOutput, SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)


class EngineClient(Protocol):
    """What serve needs from vLLM's AsyncLLM."""

    errored: bool

    def generate(
        self,
        prompt: Any,
        sampling_params: SamplingParams,
        request_id: str,
        *,
        lora_request: LoRARequest | None,
    ) -> AsyncGenerator[RequestOutput, None]: ...

    async def add_lora(self, lora_request: LoRARequest) -> bool: ...

    async def remove_lora(self, lora_id: int) -> bool: ...

    async def list_loras(self) -> set[int]: ...


def engine_args(settings: ServeSettings) -> dict[str, object]:
    """Engine arguments from settings; the same names as `vllm serve` flags, for easy comparison.

    `response_format` JSON is compact: the grammar allows no free whitespace between tokens (vLLM's
    `--structured-outputs-config.disable_any_whitespace`), so a model cannot loop on newlines inside its
    JSON until max_tokens cuts it short, as small or lightly tuned models do.
    """
    from vllm.config import StructuredOutputsConfig

    args: dict[str, object] = {
        "model": settings.base_model,
        "revision": settings.revision,
        "served_model_name": settings.model_id,
        "enable_lora": True,
        "max_loras": settings.max_loras,
        "max_lora_rank": settings.max_lora_rank,
        "max_cpu_loras": settings.max_cpu_loras,
        "max_model_len": settings.max_model_len,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "kv_cache_memory_bytes": settings.kv_cache_memory_bytes,
        "dtype": settings.dtype,
        "enforce_eager": settings.enforce_eager,
        "seed": settings.seed,
        "structured_outputs_config": StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True),
    }
    return args


def build_engine(settings: ServeSettings) -> AsyncLLM:
    """Start vLLM's AsyncLLM (its engine core runs in a worker process; this takes a while)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    # vLLM's stats (its default for a server; stated, since /metrics rests on them): its engine then records
    # its Prometheus series and fills each RequestOutput's stats, which serve.metrics reads per adapter.
    args = AsyncEngineArgs(**engine_args(settings), disable_log_stats=False)  # type: ignore[arg-type]
    log.info("starting vLLM engine for %s", settings.base_model)
    return AsyncLLM.from_engine_args(args)
