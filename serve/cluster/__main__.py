"""`python -m serve.cluster --replicas N [--address ...] [every python -m serve flag]`: deploys the server on
Ray Serve and keeps it up until SIGINT/SIGTERM, then removes it (and stops the Ray it started, if any)."""

from __future__ import annotations

import logging
import signal
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serve.cluster.settings import ClusterSettings

log = logging.getLogger(__name__)

EXIT_START_FAILED = 3  # as `python -m serve`: the replicas could not start


def main(argv: list[str] | None = None) -> int:
    from serve.__main__ import load_settings
    from serve.cluster.settings import ClusterSettings

    settings = load_settings(ClusterSettings, argv)
    return 2 if settings is None else run(settings)


def run(settings: ClusterSettings) -> int:
    import ray
    from ray import serve as ray_serve

    from serve.cluster.app import deployment_graph

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    ray.init(
        address=settings.address, logging_level=logging.getLevelNamesMapping()[settings.log_level.upper()]
    )
    try:
        ray_serve.start(http_options={"host": settings.host, "port": settings.port})
        try:
            # Returns once every replica's engine serves (their constructors wait for it).
            ray_serve.run(deployment_graph(settings), name=settings.app_name, route_prefix="/")
        except Exception as exc:
            log.critical("the replicas could not start (exit code %d): %s", EXIT_START_FAILED, exc)
            return EXIT_START_FAILED
        log.info(
            "ready: %d replicas of %s on http://%s:%d",
            settings.replicas,
            settings.model_id,
            settings.host,
            settings.port,
        )
        stop.wait()
        log.info("stopping: removing the application %s", settings.app_name)
        ray_serve.delete(settings.app_name)
        return 0
    finally:
        ray.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
