"""The vLLM async engine (same process as the API), built from the server settings with LoRA enabled, and
`EngineClient`: the part of it the serving layer uses (a fake engine implements it in tests)."""

from __future__ import annotations

import collections
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

    async def collective_rpc(
        self,
        method: str,
        timeout: float | None = None,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> list[Any]: ...


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
    args = AsyncEngineArgs(
        **engine_args(settings),  # type: ignore[arg-type]
        disable_log_stats=False,
        worker_extension_cls=f"{LoRATiers.__module__}.{LoRATiers.__qualname__}",
    )
    log.info("starting vLLM engine for %s", settings.base_model)
    return AsyncLLM.from_engine_args(args)


LORA_TIERS_RPC = "tuneserve_lora_tiers"
LORA_TIERS = ("slot", "host_memory")


class LoRATiers:
    """A vLLM worker extension (`worker_extension_cls`): which adapters the engine holds in its two LRU tiers,
    the --max-loras slots the forward pass reads and the --max-cpu-loras cache in host memory, and how often
    each adapter was loaded into and evicted from each; vLLM exports none of it. The first call (the server
    makes it before loading any adapter) wraps the worker's LoRA manager's one entry point for loads."""

    def tuneserve_lora_tiers(self) -> dict[str, Any] | None:
        manager = getattr(getattr(self, "model_runner", None), "lora_manager", None)
        if manager is None:  # LoRA off
            return None
        counts: dict[str, collections.Counter[int]] | None = getattr(manager, "_tuneserve_counts", None)
        if counts is None:
            counts = _count_tier_moves(manager)
        held = _held(manager)
        return {
            "held": {tier: sorted(ids) for tier, ids in held.items()},
            # Pairs, not int-keyed maps: msgpack between the engine's processes keeps them as they are.
            "counts": {name: sorted(counter.items()) for name, counter in counts.items()},
        }


def _held(manager: Any) -> dict[str, set[int]]:
    adapters = manager._adapter_manager
    return {
        "slot": {lora_id for lora_id in adapters.lora_index_to_id if lora_id is not None},
        "host_memory": set(adapters.list_adapters()),
    }


def _count_tier_moves(manager: Any) -> dict[str, collections.Counter[int]]:
    """Count, per adapter id, what entered and left each tier during each of the manager's add_adapter calls
    (the engine's own loads for a step's batch and the server's add_lora both go through it)."""
    counts = {
        f"{tier}_{move}": collections.Counter[int]() for tier in LORA_TIERS for move in ("loads", "evictions")
    }
    add_adapter = manager.add_adapter

    def counting_add_adapter(lora_request: Any) -> Any:
        adapters, lora_id = manager._adapter_manager, lora_request.lora_int_id
        if (
            lora_id in adapters.lora_index_to_id
            and lora_id in adapters._registered_adapters  # membership only: no LRU touch
            and not getattr(lora_request, "load_inplace", False)
        ):
            # Every step asks for each adapter of its batch; held in both tiers already, nothing can move.
            return add_adapter(lora_request)
        before = _held(manager)
        try:
            return add_adapter(lora_request)
        finally:
            after = _held(manager)
            for tier in LORA_TIERS:
                counts[f"{tier}_loads"].update(after[tier] - before[tier])
                counts[f"{tier}_evictions"].update(before[tier] - after[tier])

    manager.add_adapter = counting_add_adapter
    manager._tuneserve_counts = counts
    return counts
