"""Server settings: one pydantic-settings class, read from `--flags` and `SERVE_*` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from finetune.servable import VLLM_LORA_RANKS


class ServeSettings(BaseSettings):
    """`python -m serve --base-model ... [--adapters-dir DIR] [--lora NAME=PATH ...]`; every flag has a
    `SERVE_<NAME>` environment variable (e.g. SERVE_BASE_MODEL, SERVE_API_KEY)."""

    model_config = SettingsConfigDict(
        env_prefix="SERVE_",
        cli_kebab_case=True,
        cli_prog_name="python -m serve",
        cli_implicit_flags=True,
        extra="forbid",
    )

    base_model: str = Field(description="Hub id or local folder of the base model.")
    served_model_name: str | None = Field(
        None, description="API model id of the base (default: --base-model)."
    )
    revision: str | None = Field(None, description="Hub revision of the base model.")
    adapters_dir: Path | None = Field(
        None, description="Every sub-folder holding a PEFT LoRA adapter is served under the folder's name."
    )
    lora: list[str] = Field(default_factory=list, description="Extra adapter NAME=PATH (repeatable).")
    host: str = Field("0.0.0.0", description="Interface to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind (0: any free port).")
    api_key: SecretStr | None = Field(
        None, description="Bearer key required on /v1/*, /tokenize, /detokenize (none: open)."
    )
    admin_api_key: SecretStr | None = Field(
        None, description="Bearer key for loading/unloading adapters at runtime (none: disabled)."
    )
    public_docs: bool = Field(
        False, description="With --api-key: serve /docs and /openapi.json without a key (else the key)."
    )
    public_metrics: bool = Field(
        False, description="With --api-key: serve /metrics without a key (else the key)."
    )
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Serve /metrics on this port instead (no key: for a scraper on a private network).",
    )
    max_loras: int = Field(
        16,
        ge=1,
        description="Adapters in one batch (engine LoRA slots). Requests on more distinct adapters wait; "
        "each slot holds max_lora_rank-sized weights for every layer (7B model, rank 16, bf16: about 80 MB).",
    )
    max_cpu_loras: int | None = Field(
        None, ge=1, description="Adapters kept in host memory (default: engine's)."
    )
    max_request_bytes: int = Field(
        4 << 20, ge=1024, description="Largest request body in bytes; larger ones get 413."
    )
    unload_timeout: float = Field(
        60.0,
        gt=0,
        description="Seconds an unload waits for the requests running on its adapter; then it fails (409) "
        "and the adapter stays loaded.",
    )
    shutdown_timeout: int = Field(
        5, ge=1, description="Seconds a stopping server (SIGINT/SIGTERM) lets open requests finish."
    )
    max_lora_rank: int = Field(16, description=f"Largest adapter rank served; one of {VLLM_LORA_RANKS}.")
    max_model_len: int | None = Field(None, ge=16, description="Context length (default: the model's).")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs to shard the model over.")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Share of GPU memory for weights + KV cache (on CPU: of host memory)."
    )
    kv_cache_memory_bytes: int | None = Field(
        None, ge=1 << 20, description="Exact KV cache size in bytes (overrides --gpu-memory-utilization)."
    )
    dtype: str = Field("auto", description="Model dtype: auto, bfloat16, float16, float32.")
    enforce_eager: bool = Field(False, description="Disable CUDA graphs / compilation (faster start).")
    seed: int = Field(0, description="Engine seed.")
    log_level: str = Field("info", description="Log level of the server.")

    @field_validator("max_lora_rank")
    @classmethod
    def _vllm_rank(cls, value: int) -> int:
        if value not in VLLM_LORA_RANKS:
            raise ValueError(f"must be one of {VLLM_LORA_RANKS} (vLLM's accepted values)")
        return value

    @model_validator(mode="after")
    def _cpu_loras(self) -> ServeSettings:
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        return self

    @property
    def model_id(self) -> str:
        """The API id of the base model."""
        return self.served_model_name or self.base_model
