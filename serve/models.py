"""The models this server answers for, and the adapter lifecycle around the registry: resolve a request's
model, list the models, load, unload and refresh adapters, and remember the refused ones (vLLM's
OpenAIServingModels). No HTTP here: serve/routes.py turns what this returns or raises into responses."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serve import protocol
from serve.adapters import NAME_PATTERN, Adapter, AdapterError, AdapterRegistry
from serve.engine import LORA_TIERS_RPC, EngineClient
from serve.protocol import OpenAIError
from serve.sources import HUB_PREFIX, S3_SCHEME, AdapterCache, AdapterRef, AdapterSources, CachedAdapter

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest

log = logging.getLogger(__name__)

# How long a refused on-request load is answered from memory (a missing or unfit adapter is not fetched
# again for every request naming it).
REFUSAL_MEMORY_S = 30.0


@dataclass
class RefusedAdapter:
    name: str
    path: str
    reason: str


# Where an adapter is, nearest the forward pass first: in one of the engine's --max-loras slots, in its
# host-memory cache (--max-cpu-loras), only on disk (the adapters dir or the adapter cache), or only in its
# remote source (evicted from the adapter cache; a request loads it again).
LOCATIONS = ("slot", "host_memory", "disk", "remote")
ENGINE_TIERS_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class AdapterTiers:
    """A snapshot for /metrics: each adapter's location and running requests, and per (adapter, tier) how
    often it was loaded into and evicted from the tier (tiers: slot, host_memory, disk)."""

    location: dict[str, str]
    in_flight: dict[str, int]
    loads: dict[tuple[str, str], int]
    evictions: dict[tuple[str, str], int]


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
    # Where runtime loads may come from (--adapter-sources), and the cache of the remote ones (None: none).
    sources: AdapterSources = field(default_factory=lambda: AdapterSources(local=True))
    cache: AdapterCache | None = None
    load_on_request: bool = False
    _loading: dict[str, asyncio.Task[Adapter]] = field(default_factory=dict)  # by adapter name
    _fetching: dict[str, asyncio.Task[CachedAdapter]] = field(default_factory=dict)  # by source URI
    _source_of: dict[str, str] = field(default_factory=dict)  # adapter name -> its cache entry's URI
    # On-request loads refused for what the adapter is (not found, not a fit): name -> (when, why); asked
    # again within REFUSAL_MEMORY_S, the answer is the same refusal without fetching again.
    _refusals: dict[str, tuple[float, AdapterError]] = field(default_factory=dict)
    _draining: set[asyncio.Task[None]] = field(default_factory=set)  # unloads of previous alias targets
    _names: dict[int, str] = field(default_factory=dict)  # every lora_int_id ever served -> its name
    _disk_loads: collections.Counter[str] = field(
        default_factory=collections.Counter
    )  # fetches into the cache
    _disk_evictions: collections.Counter[str] = field(default_factory=collections.Counter)
    _remote: dict[str, str] = field(
        default_factory=dict
    )  # evicted from the cache, not loaded since: name -> URI

    # ----------------------------------------------------------------------------------- the models
    def resolve(self, model: str) -> LoRARequest | None:
        """The LoRA request for an adapter name or an alias of one, None for the base (or an alias of it);
        404 for anything else."""
        target = self.registry.alias_target(model) or model
        if target == self.model_id:
            return None
        adapter = self.registry.get(target)
        if adapter is None:
            raise OpenAIError.model_not_found(model)
        return adapter.lora_request()

    def has_served(self, model: str) -> bool:
        """The base or an adapter name or alias this server serves or once served (bounded by admin calls)."""
        return model == self.model_id or model in self._served_names

    def list_models(self) -> protocol.ModelList:
        cards = [self._card(self.model_id, parent=None)]
        # An adapter's root is its name, not its path: every key sees this list; admins get paths elsewhere.
        cards += [
            self._card(adapter.name, parent=self.model_id, version=adapter.version)
            for adapter in self.registry
        ]
        # An alias is a model of its own to clients (its target is the admin's business).
        cards += [self._card(alias, parent=self.model_id) for alias in self.registry.aliases()]
        return protocol.ModelList(data=cards)

    def card(self, model: str) -> protocol.ModelCard:
        """The card of one served model; 404 for anything else."""
        self.resolve(model)
        adapter = self.registry.get(model)
        return self._card(
            model,
            parent=None if model == self.model_id else self.model_id,
            version=adapter.version if adapter is not None else None,
        )

    # -------------------------------------------------------------------------------------- aliases
    async def set_alias(
        self,
        alias: str,
        model: str,
        *,
        load: bool = False,
        lora_path: str | None = None,
        unload_previous: bool = True,
    ) -> tuple[str | None, Adapter | None]:
        """Point `alias` at `model` (with `load`, loaded first from `lora_path`, else the adapters dir's
        folder of that name) in one step: requests that
        resolve the alias from then on get the new target, and those already running finish on the old one.
        With `unload_previous`, the previous target is then unloaded once its running requests end (unless
        another alias points to it). Returns the previous target and the new target's adapter (None: base)."""
        if load:
            self.registry.check_alias_name(alias)  # a bad alias leaves nothing loaded
            await self.load(model, lora_path)
        previous = self.registry.set_alias(alias, model)
        self._served_names.add(alias)
        if (
            unload_previous
            and previous is not None
            and previous not in (model, self.model_id)
            and previous not in self.registry.aliases().values()
        ):
            task = asyncio.create_task(self._drain(previous))
            self._draining.add(task)
            task.add_done_callback(self._draining.discard)
        return previous, self.registry.get(model)

    async def promote(
        self, alias: str, model: str, gate: Mapping[str, Any], *, unload_previous: bool = True
    ) -> tuple[str | None, Adapter]:
        """Point `alias` at the served adapter `model` only on the word of a passing gate report (the
        gate.json of `python -m client gate` or `bench --gate`) that judged this very version of it; else
        409 saying why (the failing rules, or the version the report judged)."""
        adapter = self.registry.get(model)
        if adapter is None:
            raise AdapterError(f"adapter {model!r} is not served; load it before promoting it", status=404)
        if gate.get("passed") is not True:
            rules = gate.get("rules")
            failing = [
                str(rule.get("rule"))
                for rule in (rules if isinstance(rules, list) else [])
                if isinstance(rule, Mapping) and rule.get("passed") is not True
            ]
            raise AdapterError(
                f"the gate report did not pass, so {model!r} is not promoted to {alias!r}; failing rules: "
                + ("; ".join(failing) if failing else "none listed (not a gate report?)"),
                status=409,
            )
        versions = gate.get("versions")
        judged = versions.get(model) if isinstance(versions, Mapping) else None
        if judged != adapter.version:
            raise AdapterError(
                f"the gate report judged {model!r} at version {judged!r}, but this server serves version "
                f"{adapter.version!r}; gate the version you promote",
                status=409,
            )
        previous, _ = await self.set_alias(alias, model, unload_previous=unload_previous)
        return previous, adapter

    async def delete_alias(self, alias: str) -> str:
        return self.registry.remove_alias(alias)

    async def _drain(self, name: str) -> None:
        try:
            await self.remove_adapter(name)
        except AdapterError as exc:  # still busy after --unload-timeout, or unloaded by an admin meanwhile
            log.warning("previous alias target %s stays loaded: %s", name, exc)

    def _card(self, name: str, parent: str | None, version: str | None = None) -> protocol.ModelCard:
        return protocol.ModelCard(
            id=name,
            created=self.created,
            owned_by="tuneserve",
            root=name,
            parent=parent,
            max_model_len=self.max_model_len,
            version=version,
        )

    # ------------------------------------------------------------------------------------- adapters
    async def load(self, name: str, lora_path: str | None) -> Adapter:
        """A runtime load: `lora_path` (default: `name`) lies inside the adapters dir, or is an allowed
        source's `s3://...` or `hf:ORG/NAME[@REVISION]`."""
        if lora_path and lora_path.startswith((S3_SCHEME, HUB_PREFIX)):
            ref = self.sources.allowed(lora_path.removeprefix(HUB_PREFIX))
            if ref is None or self.cache is None:
                raise AdapterError(
                    f"lora_path {lora_path!r} is not in an allowed adapter source "
                    f"({self.sources.describe()}); start the server with --adapter-sources naming it",
                    status=403,
                )
            return await self._load_remote(name, ref)
        return await self.add_adapter(name, self.registry.resolve_runtime_path(lora_path, name))

    async def ensure(self, model: str) -> None:
        """With --load-on-request, serve `model` if it is not served yet but lies in an allowed source; the
        requests asking for it at the same time share one load. Otherwise nothing: resolve() answers 404.
        A source that has nothing under that name gives the very 404 of an unknown model."""
        if model == self.model_id or self.registry.alias_target(model) is not None:
            return
        if self.registry.get(model) is not None:
            if self.cache is not None and model in self._source_of:
                self.cache.touch(self._source_of[model])
            return
        if not self.load_on_request:
            return
        refused = self._refusals.get(model)
        if refused is not None and time.monotonic() - refused[0] < REFUSAL_MEMORY_S:
            self._raise_load_error(model, refused[1])
        task = self._loading.get(model)
        if task is None:
            load = self._on_request_load(model)
            if load is None:
                return
            task = asyncio.create_task(load)
            self._loading[model] = task
            task.add_done_callback(lambda done: self._load_done(model, done))
        try:
            # Shielded: a client that disconnects cancels its wait, not the load the others wait for.
            await asyncio.shield(task)
        except AdapterError as exc:
            self._raise_load_error(model, exc)

    def _on_request_load(self, model: str) -> Coroutine[Any, Any, Adapter] | None:
        ref = self.sources.allowed(model)
        if ref is not None and self.cache is not None:
            return self._load_remote(model, ref)
        adapters_dir = self.registry.adapters_dir
        if (
            self.sources.local
            and adapters_dir is not None
            and NAME_PATTERN.fullmatch(model)
            and (adapters_dir / model / "adapter_config.json").is_file()
        ):
            return self.add_adapter(model, self.registry.resolve_runtime_path(None, model))
        return None

    def _load_done(self, model: str, task: asyncio.Task[Adapter]) -> None:
        self._loading.pop(model, None)
        if task.cancelled():
            return
        exc = task.exception()  # retrieved even when every waiter has gone
        if isinstance(exc, AdapterError) and exc.status in (400, 404):
            self._refusals[model] = (time.monotonic(), exc)
            self.refused = [r for r in self.refused if r.name != model]
            self.refused.append(RefusedAdapter(name=model, path=model, reason=str(exc)))
        elif exc is None:
            self._refusals.pop(model, None)
            self.refused = [r for r in self.refused if r.name != model]

    @staticmethod
    def _raise_load_error(model: str, exc: AdapterError) -> None:
        if exc.status == 404:
            raise OpenAIError.model_not_found(model) from exc
        raise exc

    async def _load_remote(self, name: str, ref: AdapterRef) -> Adapter:
        """Serve the adapter of `ref` under `name`, fetching it into the cache unless it is there."""
        assert self.cache is not None
        entry = self.cache.get(ref)
        if entry is None:
            fetching = self._fetching.get(ref.uri)
            if fetching is None:
                fetching = asyncio.create_task(asyncio.to_thread(self.cache.download, ref))
                self._fetching[ref.uri] = fetching
                fetching.add_done_callback(lambda _: self._fetching.pop(ref.uri, None))
            entry = await asyncio.shield(fetching)
            if entry.uri not in self.cache:  # the first of the requests that shared the fetch
                self.cache.add(entry)
                self._disk_loads[name] += 1
        try:
            adapter = await self.add_adapter(name, entry.path, reference=name == ref.uri)
        except AdapterError:
            if not any(uri == ref.uri for uri in self._source_of.values()):
                self.cache.remove(ref.uri)  # an adapter that cannot be served takes no room
            raise
        self._source_of[name] = ref.uri
        self._remote.pop(name, None)
        await self._make_room(keep=ref.uri)
        return adapter

    async def _make_room(self, keep: str) -> None:
        """Evict least recently used cache entries until the cache is under its limit: their adapters are
        unloaded first; entries with requests running, or being fetched, stay."""
        assert self.cache is not None
        targets = set(self.registry.aliases().values())
        for entry in list(self.cache):
            if not self.cache.over_limit():
                return
            if entry.uri == keep or entry.uri in self._fetching:
                continue
            names = [name for name, uri in self._source_of.items() if uri == entry.uri]
            if any(name in self._loading or name in targets or self._is_running(name) for name in names):
                continue
            try:
                for name in names:
                    await self.remove_adapter(name)
            except AdapterError as exc:  # being unloaded by an admin: its files may still be read
                log.info("adapter cache: keeping %s for now (%s)", entry.uri, exc)
                continue
            self.cache.remove(entry.uri)
            for name in names:
                self._disk_evictions[name] += 1
                self._remote[name] = entry.uri
            log.info(
                "adapter cache: evicted %s (%.1f MiB, unused the longest)", entry.uri, entry.size / 2**20
            )
        if self.cache.over_limit():
            log.warning(
                "adapter cache is %.1f MiB over --adapter-cache-size: every other adapter in it is in use",
                self.cache.over_limit() / 2**20,
            )

    def _is_running(self, name: str) -> bool:
        adapter = self.registry.get(name)
        return adapter is not None and self._running.get(adapter.lora_int_id, 0) > 0

    async def add_adapter(self, name: str, path: Path, *, reference: bool = False) -> Adapter:
        """Check an adapter statically, then have vLLM load it; only then is it served. `reference`: `name`
        is a source's URI (s3://..., org/name), not a folder name."""
        # Reading and checking every weight of a large adapter takes a while: not on the event loop.
        adapter = await asyncio.to_thread(self.registry.validate, name, path, reference=reference)
        try:
            await self.engine.add_lora(adapter.lora_request())
        except Exception as exc:  # vLLM raises plain exceptions for unloadable weights
            raise AdapterError(f"vLLM could not load adapter {name!r} from {adapter.path}: {exc}") from exc
        self.registry.register(adapter)
        self._served_names.add(name)
        self._names[adapter.lora_int_id] = name
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
            self._source_of.pop(name, None)  # its files stay in the cache until evicted
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
        aliases = self.registry.aliases()
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
                    "source": self._source_of.get(a.name),  # its s3:// or hub URI, if fetched from one
                    "version": a.version,
                    "in_flight": self._running.get(a.lora_int_id, 0),
                    "aliases": [alias for alias, target in aliases.items() if target == a.name],
                }
                for a in self.registry
            ],
            # Previous versions finishing their running requests before they are unloaded.
            "draining": [
                {"name": a.name, "version": a.version, "in_flight": self._running.get(a.lora_int_id, 0)}
                for a in self.registry.removing()
            ],
            "aliases": aliases,
            "refused": [vars(r) for r in self.refused],
            "sources": self.sources.describe(),
            "load_on_request": self.load_on_request,
            "cache": self.cache.status() if self.cache is not None else None,
            "engine_lora_ids": sorted(resident),
        }

    async def start_tier_counts(self) -> None:
        """Have the engine count its adapter loads and evictions from now on (before any is loaded)."""
        await self._engine_tiers()

    async def tiers(self) -> AdapterTiers:
        """Where each adapter is and how often it moved, for /metrics. The engine's tiers are left out when it
        does not answer within ENGINE_TIERS_TIMEOUT_S (every adapter is then counted as on disk)."""
        engine = await self._engine_tiers()
        held: dict[str, set[int]] = {tier: set(ids) for tier, ids in (engine or {}).get("held", {}).items()}
        location = {}
        for adapter in self.registry:
            tier = next(
                (t for t in ("slot", "host_memory") if adapter.lora_int_id in held.get(t, ())), "disk"
            )
            location[adapter.name] = tier
        for name in self._remote:
            location.setdefault(name, "remote")
        moves: dict[str, collections.Counter[tuple[str, str]]] = {
            "loads": collections.Counter({(name, "disk"): n for name, n in self._disk_loads.items()}),
            "evictions": collections.Counter({(name, "disk"): n for name, n in self._disk_evictions.items()}),
        }
        for key, pairs in (engine or {}).get("counts", {}).items():
            tier, _, move = key.rpartition("_")
            for lora_id, count in pairs:
                served_as = self._names.get(lora_id)
                if served_as is not None:  # an id vLLM was given by someone else (none here)
                    moves[move][(served_as, tier)] += count
        running = {self._names[i]: n for i, n in self._running.items() if i in self._names}
        return AdapterTiers(
            location=location,
            in_flight={name: running.get(name, 0) for name in location},
            loads=dict(moves["loads"]),
            evictions=dict(moves["evictions"]),
        )

    async def _engine_tiers(self) -> dict[str, Any] | None:
        try:
            answers = await asyncio.wait_for(
                self.engine.collective_rpc(LORA_TIERS_RPC), ENGINE_TIERS_TIMEOUT_S
            )
        except Exception as exc:  # a busy or dead engine: /metrics still answers, without them
            log.warning("the engine did not report its adapter tiers: %s", exc or type(exc).__name__)
            return None
        first: dict[str, Any] | None = (
            answers[0] if answers else None
        )  # every tensor-parallel rank holds the same
        return first

    # ------------------------------------------------------------------- requests running on adapters
    def request_started(self, lora: LoRARequest | None, model: str) -> LoRARequest | None:
        """Count a request as running on its adapter; returns the LoRA request to run it with."""
        if lora is None:
            return None
        target = self.registry.alias_target(model)
        adapter = self.registry.get(target or model)
        if adapter is None or adapter.lora_int_id != lora.lora_int_id:
            if target is None:
                # Resolved before an unload, started after it (a stream's body runs after the response starts)
                raise OpenAIError.model_not_found(model, "was unloaded")
            # An alias repointed between resolving and starting: the new target answers (no request to an
            # alias fails for a swap), and the old one may already be gone from the engine.
            lora = self.resolve(model)
            if lora is None:
                return None
        self._running[lora.lora_int_id] = self._running.get(lora.lora_int_id, 0) + 1
        return lora

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
