"""Route-level properties of the HTTP layer that the end-to-end tests cannot see."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

from fastapi.routing import APIRoute

from serve.routes import router


def _dependency_calls(dependant: Any) -> Iterator[Any]:
    for sub in dependant.dependencies:
        yield sub.call
        yield from _dependency_calls(sub)


def test_every_endpoint_and_dependency_runs_on_the_event_loop() -> None:
    # FastAPI runs a plain `def` endpoint or dependency in its thread pool: a thread hop (and GIL hand-off
    # with the engine's output handler) per request for work that never blocks; three such dependencies were
    # part of the extra API-process CPU per request that bench/serve_vs_vllm showed against vLLM's server.
    checked = 0
    for route in router.routes:
        assert isinstance(route, APIRoute)
        for call in [route.endpoint, *_dependency_calls(route.dependant)]:
            assert inspect.iscoroutinefunction(call), f"{route.path}: {call.__qualname__} is not async"
            checked += 1
    assert checked > len(router.routes)  # the dependencies were walked, not only the endpoints


def test_freeze_startup_heap_puts_live_objects_out_of_the_collectors_reach() -> None:
    import gc

    from serve.app import freeze_startup_heap

    try:
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0
