"""The Ray Serve application: an ingress bound to N engine replicas. `python -m serve.cluster` runs it, and so
can Ray's own tools: `serve run serve.cluster.app:build base_model=...`, or a KubeRay RayService whose
serveConfigV2 names `import_path: serve.cluster.app:build` with the settings as `args`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from serve.cluster.settings import ClusterSettings

if TYPE_CHECKING:
    from ray.serve import Application


def build(args: dict[str, Any]) -> Application:
    """Ray Serve's application builder: `args` are ClusterSettings fields (`base_model` or `base-model`); an
    invalid one fails the deployment with pydantic's error naming it. --host/--port are Ray's to set then."""
    values = {key.replace("-", "_"): value for key, value in args.items()}
    return deployment_graph(ClusterSettings.model_validate(values))


def deployment_graph(settings: ClusterSettings) -> Application:
    """The Ray Serve application: the ingress bound to `settings.replicas` engine replicas."""
    from ray import serve as ray_serve

    from serve.cluster.ingress import Ingress
    from serve.cluster.replica import EngineReplica

    replica = ray_serve.deployment(
        name="EngineReplica",
        num_replicas=settings.replicas,
        ray_actor_options={"num_cpus": settings.replica_cpus, "num_gpus": settings.replica_gpus},
        # Ray's default (5 at a time per replica) would cap vLLM's batches at 5; the engine schedules them.
        max_ongoing_requests=256,
        # The engine loads in the constructor: health checks start once it serves.
        health_check_period_s=5,
        graceful_shutdown_timeout_s=settings.shutdown_timeout,
    )(EngineReplica)
    ingress = ray_serve.deployment(
        name="Ingress",
        num_replicas=settings.ingress_replicas,
        ray_actor_options={"num_cpus": 0},  # it only forwards: no CPU reserved from the engines
        max_ongoing_requests=10_000,
    )(ray_serve.ingress()(Ingress))
    return ingress.bind(
        replica.bind(settings.replica_settings()), settings.model_id, settings.max_request_bytes
    )
