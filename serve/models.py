"""The models this server answers for, and the adapter lifecycle around the registry: resolve a request's
model, list the models, load, unload and refresh adapters, and remember the refused ones (vLLM's
OpenAIServingModels). No HTTP here: serve/routes.py turns what this returns or raises into responses."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serve import protocol
from serve.adapters import Adapter, AdapterError, AdapterRegistry
from serve.engine import EngineClient
from serve.protocol import OpenAIError

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest

log = logging.getLogger(__name__)


@dataclass
class RefusedAdapter:
    name: str
    path: str
    reason: str


@dataclass
class ServedModels:
    """The base (`model_id`) and the adapters of `registry`, as the engine serves them."""

    engine: EngineClient
    registry: AdapterRegistry
    model_id: str
    max_model_len: int
    unload_timeout_s: float = 60.0
    created: int = field(default_factory=lambda: int(time.time()))
    refused: list[RefusedAdapter] = field(default_factory=list)
    # lora_int_id -> engine requests running on it; an unload waits for its adapter's count to reach 0.
    _running: dict[int, int] = field(default_factory=dict)
    _idle: dict[int, asyncio.Event] = field(default_factory=dict)
    _served_names: set[str] = field(default_factory=set)  # every adapter name ever served (metric labels)

    # ----------------------------------------------------------------------------------- the models
    def resolve(self, model: str) -> LoRARequest | None:
        """The LoRA request for an adapter name, None for the base; 404 for anything else."""
        if model == self.model_id:
            return None
        adapter = self.registry.get(model)
        if adapter is None:
            raise OpenAIError.model_not_found(model)
        return adapter.lora_request()

    def has_served(self, model: str) -> bool:
        """The base or an adapter name this server serves or once served (bounded by admin loads)."""
        return model == self.model_id or model in self._served_names

    def list_models(self) -> protocol.ModelList:
        cards = [self._card(self.model_id, parent=None)]
        # An adapter's root is its name, not its path: every key sees this list; admins get paths elsewhere.
        cards += [self._card(adapter.name, parent=self.model_id) for adapter in self.registry]
        return protocol.ModelList(data=cards)

    def card(self, model: str) -> protocol.ModelCard:
        """The card of one served model; 404 for anything else."""
        self.resolve(model)
        return self._card(model, parent=None if model == self.model_id else self.model_id)

    def _card(self, name: str, parent: str | None) -> protocol.ModelCard:
        return protocol.ModelCard(
            id=name,
            created=self.created,
            owned_by="tuneserve",
            root=name,
            parent=parent,
            max_model_len=self.max_model_len,
        )

    # ------------------------------------------------------------------------------------- adapters
    async def load(self, name: str, lora_path: str | None) -> Adapter:
        """A runtime load: `lora_path` (default: `name`) must lie inside the adapters dir."""
        return await self.add_adapter(name, self.registry.resolve_runtime_path(lora_path, name))

    async def add_adapter(self, name: str, path: Path) -> Adapter:
        """Check an adapter statically, then have vLLM load it; only then is it served."""
        # Reading and checking every weight of a large adapter takes a while: not on the event loop.
        adapter = await asyncio.to_thread(self.registry.validate, name, path)
        try:
            await self.engine.add_lora(adapter.lora_request())
        except Exception as exc:  # vLLM raises plain exceptions for unloadable weights
            raise AdapterError(f"vLLM could not load adapter {name!r} from {adapter.path}: {exc}") from exc
        self.registry.register(adapter)
        self._served_names.add(name)
        log.info("serving adapter %s (rank %d) from %s", name, adapter.rank, adapter.path)
        return adapter

    async def remove_adapter(self, name: str) -> Adapter:
        """Stop routing requests to `name`, let the requests running on it finish, then drop it from vLLM.

        vLLM removes an adapter that running requests still use (its worker then fails on their next step,
        KeyError in convert_mapping, and the engine is dead for good), so the engine is asked only once no
        request of ours runs on it. If they do not finish within unload_timeout_s, the adapter stays served
        and the unload fails with 409.
        """
        adapter = self.registry.begin_removal(name)
        running = self._running.get(adapter.lora_int_id, 0)
        if running:
            log.info("unloading adapter %s: waiting for its %d running requests", name, running)
            idle = self._idle.setdefault(adapter.lora_int_id, asyncio.Event())
            try:
                await asyncio.wait_for(idle.wait(), self.unload_timeout_s)
            except TimeoutError:
                self.registry.cancel_removal(adapter)
                left = self._running.get(adapter.lora_int_id, 0)
                raise AdapterError(
                    f"adapter {name!r} still has {left} requests running "
                    f"after {self.unload_timeout_s:.0f} s; it stays loaded: retry the unload later "
                    "(or start the server with a longer --unload-timeout)",
                    status=409,
                ) from None
        try:
            await self.engine.remove_lora(adapter.lora_int_id)
        finally:
            self.registry.finish_removal(adapter)
            self._idle.pop(adapter.lora_int_id, None)
        log.info("unloaded adapter %s", name)
        return adapter

    async def add_adapters(
        self, candidates: Sequence[tuple[str, Path]], *, confined: bool = False
    ) -> list[Adapter]:
        """Add each candidate; a bad one is refused (logged, kept in `refused`) and the rest still load.

        confined: the paths come from the adapters dir and must stay in it once symlinks are followed (the
        rule a runtime load request's lora_path follows).
        """
        added = []
        for name, path in candidates:
            try:
                if confined:
                    path = self.registry.resolve_runtime_path(path.name, name)
                added.append(await self.add_adapter(name, path))
            except AdapterError as exc:
                log.error("refused adapter %s (%s): %s", name, path, exc)
                self.refused = [r for r in self.refused if r.name != name]
                self.refused.append(RefusedAdapter(name=name, path=str(path), reason=str(exc)))
        return added

    async def refresh(self) -> list[Adapter]:
        """Serve adapter folders that appeared in the adapters dir since start-up."""
        return await self.add_adapters(self.registry.discover(), confined=True)

    async def status(self) -> dict[str, Any]:
        """Served adapters, refused ones with the reason, and which adapter ids the engine holds in memory."""
        resident = await self.engine.list_loras()
        return {
            "adapters": [
                {
                    "name": a.name,
                    "path": str(a.path),
                    "rank": a.rank,
                    # The base it declares (a hub id or another machine's path for one trained elsewhere)
                    # and how it was found to fit the served one (serve.adapters' BASE_* values).
                    "base_model": a.base_model,
                    "base_check": a.base_check,
                    "lora_int_id": a.lora_int_id,
                    "resident": a.lora_int_id in resident,
                }
                for a in self.registry
            ],
            "refused": [vars(r) for r in self.refused],
            "engine_lora_ids": sorted(resident),
        }

    # ------------------------------------------------------------------- requests running on adapters
    def request_started(self, lora: LoRARequest | None, model: str) -> None:
        if lora is None:
            return
        adapter = self.registry.get(model)
        if adapter is None or adapter.lora_int_id != lora.lora_int_id:
            # Resolved before an unload, started after it (a stream's body runs after the response starts).
            raise OpenAIError.model_not_found(model, "was unloaded")
        self._running[lora.lora_int_id] = self._running.get(lora.lora_int_id, 0) + 1

    def request_finished(self, lora: LoRARequest | None) -> None:
        if lora is None:
            return
        left = self._running[lora.lora_int_id] - 1
        if left:
            self._running[lora.lora_int_id] = left
            return
        del self._running[lora.lora_int_id]
        idle = self._idle.get(lora.lora_int_id)
        if idle is not None:
            idle.set()
