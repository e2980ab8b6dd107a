"""Server settings: one pydantic-settings class, read from `--flags` and `SERVE_*` environment variables."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import ByteSize, Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from finetune.servable import VLLM_LORA_RANKS
from serve.sources import LOCAL, AdapterSources
from serve.tenants import Tenants, load_tenants


class ServeSettings(BaseSettings):
    """`python -m serve --base-model ... [--adapters-dir DIR] [--lora NAME=PATH ...]`; every flag has a
    `SERVE_<NAME>` environment variable (e.g. SERVE_BASE_MODEL, SERVE_API_KEY)."""

    model_config = SettingsConfigDict(
        env_prefix="SERVE_",
        cli_kebab_case=True,
        cli_prog_name="python -m serve",
        cli_implicit_flags=True,
        extra="forbid",
        hide_input_in_errors=True,  # an error never quotes the command line's keys
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
    adapter_sources: list[str] = Field(
        default_factory=lambda: [LOCAL],
        description="Where adapters may be loaded from at runtime, comma-separated: local (the adapters "
        "dir), s3://BUCKET/PREFIX/ (AWS_* variables give endpoint, region, keys), hf:ORG/ or hf:ORG/NAME "
        "(hub repos; hf: alone: any). Anything else is refused.",
    )
    load_on_request: bool = Field(
        False,
        description="A request naming an adapter that is not loaded loads it from an allowed source first: a "
        "folder name in the adapters dir, s3://BUCKET/PREFIX/NAME, or ORG/NAME[@REVISION] on the hub.",
    )
    allow_template_mismatch: bool = Field(
        False,
        description="Serve an adapter whose manifest records prompts rendered otherwise than this server "
        "renders them (another chat template, special tokens or vocabulary), with a warning instead of a "
        "refusal.",
    )
    adapter_cache_dir: Path | None = Field(
        None,
        description="Adapters fetched from S3 or the hub, one server per folder (default: "
        "$XDG_CACHE_HOME/tuneserve/adapters, else ~/.cache/tuneserve/adapters).",
    )
    adapter_cache_size: ByteSize = Field(
        ByteSize(20 << 30),
        description="Size limit of the adapter cache (e.g. 20GiB, 500MB); the least recently used adapters "
        "not in use are unloaded and deleted to stay under it.",
    )
    host: str = Field("0.0.0.0", description="Interface to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind (0: any free port).")
    api_key: SecretStr | None = Field(
        None,
        description="Bearer key for every model on /v1/*, /tokenize, /detokenize (none, nor --api-keys-file: "
        "open).",
    )
    api_keys_file: Path | None = Field(
        None,
        description="YAML or JSON list of tenant keys: {name, key | key_env | key_sha256, models (names or "
        "globs), rate_limit_rpm}; a key sees only its models. Works alongside --api-key.",
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
    enable_auto_tool_choice: bool = Field(
        False,
        description="Parse tool calls out of the model's answers (tool_choice auto, required or a named "
        "function), as vLLM's flag does; needs --tool-call-parser.",
    )
    tool_parser_plugin: str | None = Field(
        None, description="Python file registering a custom tool parser whose name --tool-call-parser takes."
    )
    tool_call_parser: str | None = Field(
        None,
        description="vLLM tool parser for the base's tool-call format: hermes (Qwen2.5, Hermes), llama3_json "
        "(Llama 3.1/3.2), mistral, pythonic, ... (vLLM's ToolParserManager names).",
    )
    exclude_tools_when_tool_choice_none: bool = Field(
        False, description="Leave the tools out of the prompt when tool_choice is none (default: rendered)."
    )

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

    @field_validator("tool_call_parser")
    @classmethod
    def _registered_parser(cls, value: str | None, info: ValidationInfo) -> str | None:
        # vLLM's start-up check (vllm/entrypoints/launchers/launcher.py), at load time: a typo fails here, not
        # at the first request.
        if value is None:
            return value
        from vllm.tool_parsers import ToolParserManager

        plugin = info.data.get("tool_parser_plugin")
        if plugin:
            ToolParserManager.import_tool_parser(plugin)
        names = ToolParserManager.list_registered()
        if value not in names:
            raise ValueError(
                f"unknown tool call parser '{value}'; choose from {', '.join(names)} "
                "(or register one with --tool-parser-plugin)"
            )
        return value

    @model_validator(mode="after")
    def _auto_tools_need_parser(self) -> ServeSettings:
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("--enable-auto-tool-choice requires --tool-call-parser (as in vLLM)")
        return self

    @field_validator("adapter_sources", mode="before")
    @classmethod
    def _split_sources(cls, value: object) -> object:
        # `--adapter-sources local,s3://team/` and SERVE_ADAPTER_SOURCES=local,s3://team/ as well as a list.
        if isinstance(value, str):
            return [part for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            return [part for item in value for part in str(item).split(",") if part.strip()]
        return value

    @field_validator("adapter_sources")
    @classmethod
    def _known_sources(cls, value: list[str]) -> list[str]:
        AdapterSources.parse(value)
        return value

    def sources(self) -> AdapterSources:
        return AdapterSources.parse(self.adapter_sources)

    def cache_dir(self) -> Path:
        if self.adapter_cache_dir is not None:
            return self.adapter_cache_dir.expanduser()
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return Path(base) / "tuneserve" / "adapters"

    @model_validator(mode="after")
    def _keys_file(self) -> ServeSettings:
        # Read at load time, so a bad entry fails the command line (exit 2) naming it, not the first request.
        self.tenants()
        return self

    def tenants(self, clock: Callable[[], float] = time.monotonic) -> Tenants:
        """The keys this server accepts: --api-key, --admin-api-key and --api-keys-file's."""
        return load_tenants(
            self.api_keys_file,
            api_key=self.api_key.get_secret_value() if self.api_key else None,
            admin_api_key=self.admin_api_key.get_secret_value() if self.admin_api_key else None,
            clock=clock,
        )

    @property
    def keys_required(self) -> bool:
        """/v1 routes need a key (else they are open)."""
        return self.api_key is not None or self.api_keys_file is not None

    @property
    def model_id(self) -> str:
        """The API id of the base model."""
        return self.served_model_name or self.base_model
