"""`python -m serve.cluster` settings: every `python -m serve` flag, plus where and how many replicas run."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from serve.settings import ServeSettings


class ClusterSettings(ServeSettings):
    """`python -m serve.cluster --replicas N [--address auto|HOST:PORT|ray://HOST:PORT] [serve flags]`.

    --host/--port are Ray Serve's HTTP proxy's; every other flag goes to each replica's server as it is."""

    model_config = SettingsConfigDict(
        **{**ServeSettings.model_config, "cli_prog_name": "python -m serve.cluster"}
    )

    replicas: int = Field(1, ge=1, description="Replicas of the server (each with its own engine).")
    address: str | None = Field(
        None,
        description="Ray cluster to join: auto (the one `ray start` started on this node), HOST:PORT or "
        "ray://HOST:10001 (none: start a local one for as long as this command runs).",
    )
    replica_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves for each replica.")
    replica_gpus: float = Field(
        0.0, ge=0, description="GPUs Ray reserves for each replica (on GPUs: --tensor-parallel-size)."
    )
    ingress_replicas: int = Field(
        1, ge=1, description="Replicas of the ingress that forwards requests (more for many engine replicas)."
    )
    app_name: str = Field("tuneserve", min_length=1, description="Ray Serve application name.")

    @model_validator(mode="after")
    def _proxy_port(self) -> ClusterSettings:
        if self.port == 0:
            raise ValueError(
                "--port: Ray Serve's proxy needs a fixed port; 0 (any free port) is not possible"
            )
        return self

    def replica_settings(self) -> ServeSettings:
        """What each replica's server runs with: these settings less the cluster's own fields."""
        values: dict[str, Any] = {name: getattr(self, name) for name in ServeSettings.model_fields}
        return ServeSettings.model_validate(values)
