"""Which LoRA adapters the server serves: names, vLLM ids, and the static checks an adapter folder must pass.

vLLM loads the weights afterwards; everything here is decided from files alone, before vLLM sees the adapter.
An adapter fits the served base when finetune's manifest records the base's content hash, or else when every
LoRA matrix in its weights fits a linear layer of the base; the base's name it declares only decides whether
a warning is logged (adapters trained elsewhere name a hub id or another machine's path).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.prompting import fingerprint_difference, template_fingerprint
from finetune.servable import base_linear_shapes, check_lora_weights, inspect_adapter
from tuneserve.hub import is_hub_id
from tuneserve.manifest import ADAPTER_WEIGHTS, MANIFEST, adapter_version, folder_sha256, weights_sha256

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Folders `finetune` (and editors) leave while writing: a run's work dir, a checkpoint being written,
# and the previous adapter during an overwrite (finetune.artifacts.publish).
UNFINISHED_SUFFIXES = (".partial", ".tmp", ".replaced")


class AdapterError(ValueError):
    """A refusal with a message saying why; `status` is the HTTP status to answer with (400, 404, 409)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# How an adapter was found to fit the served base (Adapter.base_check, shown in the admin listing).
BASE_BY_CONTENT = "content_sha256"  # its finetune manifest records the served base's content hash
BASE_BY_NAME = "name"  # it declares the served base's name; its weights fit the base's layers
BASE_BY_SHAPES = "shapes"  # it declares another base, but its weights fit every layer they adapt
BASE_UNDECLARED = "undeclared"  # it declares no base; its weights fit the base's layers if they are known


@dataclass(frozen=True)
class Adapter:
    """An adapter that passed validation; `base_model` is the base it declares (None if it declares none),
    `base_check` how it was matched to the served base (one of the BASE_* values), `version` its identity."""

    name: str
    path: Path
    lora_int_id: int
    rank: int
    base_model: str | None
    base_check: str
    # What it is, not what it is called: "sha256:<12 hex>" of the weights its finetune manifest lists, else
    # "<name>@<n>" for the n-th load under that name.
    version: str = ""

    def lora_request(self) -> LoRARequest:
        from vllm.lora.request import LoRARequest

        return LoRARequest(lora_name=self.name, lora_int_id=self.lora_int_id, lora_path=str(self.path))


def check_name_syntax(name: str) -> None:
    """Raise ValueError unless `name` can be a model id and a folder name: 1-64 of letters, digits, . _ -"""
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"adapter name {name!r} is not allowed; use 1-64 letters, digits, '.', '_' or '-' "
            "(it becomes the model id in the API)"
        )
    if set(name) == {"."}:
        raise ValueError(f"adapter name {name!r} is not allowed; it would name a folder's parent or itself")


def parse_lora_option(value: str) -> tuple[str, Path]:
    """`--lora NAME=PATH` -> (NAME, PATH); ValueError saying what is wrong otherwise."""
    name, sep, path = value.partition("=")
    name, path = name.strip(), path.strip()
    if not sep or not name or not path:
        raise ValueError(f"--lora expects NAME=PATH (e.g. --lora sql=/adapters/sql), got {value!r}")
    check_name_syntax(name)
    return name, Path(path).expanduser()


class AdapterRegistry:
    """The adapters being served, by name; ids for vLLM are handed out once and never reused."""

    def __init__(
        self,
        *,
        base_model: str,
        adapters_dir: Path | None,
        max_lora_rank: int,
        served_name: str | None = None,
        base_config: Any = None,
        template: dict[str, Any] | None = None,
        allow_template_mismatch: bool = False,
    ) -> None:
        if adapters_dir is not None and not adapters_dir.is_dir():
            raise ValueError(
                f"--adapters-dir {adapters_dir} is not a folder; create it or leave the option out"
            )
        self.base_model = base_model
        self.served_name = served_name or base_model
        # The base's transformers config (the engine's); None: read from base_model when first needed.
        self.base_config = base_config
        # How this server renders prompts (finetune.prompting.template_fingerprint of the base's tokenizer),
        # given or worked out from `tokenizer` when an adapter first brings a fingerprint to compare with.
        self.template = template
        self.tokenizer: Any = None
        self.allow_template_mismatch = allow_template_mismatch
        self._base_weights_sha256: str | None = None
        self._linears: dict[str, tuple[int, int]] | None = None
        self._linears_error: str | None = None  # why the base's linear layers cannot be listed
        self.adapters_dir = adapters_dir
        self.max_lora_rank = max_lora_rank
        self._adapters: dict[str, Adapter] = {}
        self._removing: dict[str, Adapter] = {}  # unloads waiting for their adapter's requests to finish
        self._ids = itertools.count(1)  # next() on it is atomic, so validate() may run in threads
        # Every id ever registered: vLLM caches weights by id, so a removed adapter's id must never come back.
        self._used_ids: set[int] = set()
        self._base_sha256: str | None = None
        self._aliases: dict[str, str] = {}  # alias -> the adapter name (or the base's id) it points to
        self._loads: dict[str, int] = {}  # adapter name -> how many times it was validated (its versions)

    # -- the served set -------------------------------------------------------------------------------

    def validate(self, name: str, path: Path, *, reference: bool = False) -> Adapter:
        """Every check that needs no engine; raises AdapterError. Hands out a fresh id, registers nothing.
        `reference`: the name is a source's URI (checked by serve.sources), not a folder name."""
        self._check_name(name, syntax=not reference)
        self._check_free(name)
        try:
            info = inspect_adapter(path, max_lora_rank=self.max_lora_rank)
        except ValueError as exc:
            raise AdapterError(str(exc)) from exc
        self._check_weights(path, info.base_model)
        manifest = self._read_manifest(path)  # read once: the base, the template and the version use it
        base_check = self._check_base(name, path, info.base_model, manifest)
        self._check_template(name, manifest)  # the same network: does it see prompts as in training?
        return Adapter(
            name=name,
            path=path,
            lora_int_id=next(self._ids),
            rank=info.rank,
            base_model=info.base_model,
            base_check=base_check,
            version=self._version(name, manifest),
        )

    def _version(self, name: str, manifest: dict[str, Any] | None) -> str:
        files = (manifest or {}).get("files")
        if isinstance(files, dict) and files:
            return adapter_version(files)
        self._loads[name] = self._loads.get(name, 0) + 1
        return f"{name}@{self._loads[name]}"

    @staticmethod
    def _read_manifest(path: Path) -> dict[str, Any] | None:
        """The folder's finetune manifest; None if it has none, or one that cannot be read (with a warning:
        the checks then fall back to what adapters from other trainers are checked by)."""
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            return None
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("adapter %s: ignoring unreadable %s (%s)", path, MANIFEST, exc)
            return None
        return manifest if isinstance(manifest, dict) else None

    def register(self, adapter: Adapter) -> None:
        """Add a validated adapter; 409 if its name is taken."""
        self._check_free(adapter.name)
        if adapter.lora_int_id in self._used_ids:
            raise ValueError(
                f"lora_int_id {adapter.lora_int_id} was used before; get a fresh Adapter from validate()"
            )
        self._adapters[adapter.name] = adapter
        self._used_ids.add(adapter.lora_int_id)
        log.info(
            "serving adapter %s (id %d, rank %d) from %s",
            adapter.name,
            adapter.lora_int_id,
            adapter.rank,
            adapter.path,
        )

    def remove(self, name: str) -> Adapter:
        """Stop serving `name`; 404 if it is not served. Its id stays retired."""
        adapter = self.begin_removal(name)
        self.finish_removal(adapter)
        return adapter

    def begin_removal(self, name: str) -> Adapter:
        """Stop routing requests to `name` while its running requests finish; its name stays taken until
        finish_removal (or cancel_removal puts it back). 404 if not served, 409 if already being removed or
        an alias points to it."""
        if name in self._removing:
            raise AdapterError(f"adapter {name!r} is already being unloaded", status=409)
        pointing = sorted(alias for alias, target in self._aliases.items() if target == name)
        if pointing:
            raise AdapterError(
                f"adapter {name!r} is what alias {', '.join(map(repr, pointing))} points to; point the alias "
                "elsewhere (POST /v1/aliases) or delete it first",
                status=409,
            )
        adapter = self._adapters.pop(name, None)
        if adapter is None:
            raise AdapterError(
                f"no adapter named {name!r} is loaded; loaded: {self.names() or 'none'}", status=404
            )
        self._removing[name] = adapter
        return adapter

    def cancel_removal(self, adapter: Adapter) -> None:
        del self._removing[adapter.name]
        self._adapters[adapter.name] = adapter

    def finish_removal(self, adapter: Adapter) -> None:
        del self._removing[adapter.name]
        log.info("stopped serving adapter %s (id %d)", adapter.name, adapter.lora_int_id)

    def get(self, name: str) -> Adapter | None:
        return self._adapters.get(name)

    def removing(self) -> list[Adapter]:
        """Adapters being unloaded: no new request goes to them, their running ones finish."""
        return [self._removing[name] for name in sorted(self._removing)]

    # -- aliases ----------------------------------------------------------------------------------------

    def check_alias_name(self, alias: str) -> None:
        """400 for a bad alias name, 409 if an adapter or the base has that name."""
        if alias in (self.base_model, self.served_name) or alias in self._adapters or alias in self._removing:
            raise AdapterError(
                f"{alias!r} is the name of a served model; an alias needs a name of its own", status=409
            )
        try:
            check_name_syntax(alias)
        except ValueError as exc:
            raise AdapterError(str(exc).replace("adapter name", "alias")) from exc

    def set_alias(self, alias: str, target: str) -> str | None:
        """Point `alias` at the served adapter (or base) `target` in one step; returns the previous target.
        400 for a bad name, 409 if an adapter or the base has that name or `target` is an alias (states of
        the server, not bad requests), 404 if `target` is not served."""
        self.check_alias_name(alias)
        if target in self._aliases:
            raise AdapterError(f"{target!r} is an alias; point {alias!r} at an adapter", status=409)
        if target not in self._adapters and target != self.served_name:
            raise AdapterError(
                f"no adapter named {target!r} is loaded; loaded: {self.names() or 'none'}", status=404
            )
        previous = self._aliases.get(alias)
        self._aliases[alias] = target
        log.info("alias %s -> %s (was %s)", alias, target, previous or "unset")
        return previous

    def remove_alias(self, alias: str) -> str:
        """Delete `alias`; returns what it pointed to. 404 if there is no such alias."""
        target = self._aliases.pop(alias, None)
        if target is None:
            raise AdapterError(f"no alias {alias!r}; aliases: {sorted(self._aliases) or 'none'}", status=404)
        log.info("alias %s deleted (it pointed to %s)", alias, target)
        return target

    def alias_target(self, name: str) -> str | None:
        return self._aliases.get(name)

    def aliases(self) -> dict[str, str]:
        return dict(sorted(self._aliases.items()))

    def names(self) -> list[str]:
        return sorted(self._adapters)

    def __iter__(self) -> Iterator[Adapter]:
        return iter([self._adapters[name] for name in self.names()])

    def __len__(self) -> int:
        return len(self._adapters)

    # -- finding adapters on disk ---------------------------------------------------------------------

    def discover(self) -> list[tuple[str, Path]]:
        """Finished adapter folders directly under adapters_dir whose names are not served yet, by name."""
        if self.adapters_dir is None:
            return []
        found = []
        for path in sorted(self.adapters_dir.iterdir()):
            name = path.name
            served = name in self._adapters or name in self._removing
            if name.startswith(".") or name.endswith(UNFINISHED_SUFFIXES) or served:
                continue
            if path.is_dir() and (path / "adapter_config.json").is_file():
                found.append((name, path))
        return found

    def resolve_runtime_path(self, raw: str | None, name: str) -> Path:
        """The folder a runtime load request may use: inside adapters_dir once symlinks are resolved."""
        if self.adapters_dir is None:
            raise AdapterError(
                "this server has no adapters folder; "
                "start the server with --adapters-dir to load adapters at runtime"
            )
        if not raw:
            self._check_name(name)
            raw = name
        requested = Path(raw)
        if ".." in requested.parts:
            raise AdapterError(
                f"lora_path {raw!r} may not contain '..'; give a folder inside the adapters dir", status=403
            )
        root = Path(os.path.realpath(self.adapters_dir))
        try:
            resolved = Path(os.path.realpath(self.adapters_dir / requested))
        except (OSError, ValueError) as exc:
            raise AdapterError(f"lora_path {raw!r} is not a usable path: {exc}") from exc
        if resolved == root or not resolved.is_relative_to(root):
            raise AdapterError(
                f"lora_path {raw!r} must be inside the adapters dir {self.adapters_dir} "
                "(symlinks are followed); copy or link the adapter folder there",
                status=403,  # a valid path this server may not read from, not a malformed request
            )
        if not resolved.exists():
            raise AdapterError(f"no adapter {raw!r} in the adapters dir {self.adapters_dir}", status=404)
        return resolved

    # -- checks ---------------------------------------------------------------------------------------

    def _check_name(self, name: str, *, syntax: bool = True) -> None:
        try:
            if syntax:
                check_name_syntax(name)
        except ValueError as exc:
            raise AdapterError(str(exc)) from exc
        if name in (self.base_model, self.served_name):
            raise AdapterError(
                f"adapter name {name!r} is the served base model's name; "
                "pick another so requests can tell them apart",
                status=409,
            )

    def _check_free(self, name: str) -> None:
        if name in self._aliases:
            raise AdapterError(
                f"{name!r} is an alias (of {self._aliases[name]!r}); an adapter needs a name of its own",
                status=409,
            )
        if name in self._adapters:
            raise AdapterError(f"an adapter named {name!r} is already loaded; unload it first", status=409)
        if name in self._removing:
            raise AdapterError(
                f"adapter {name!r} is being unloaded (its running requests are finishing); retry when done",
                status=409,
            )

    def _check_weights(self, path: Path, declared: str | None) -> None:
        """The weights open and hold finite LoRA pairs that fit the base's layers, of a rank we serve.

        PEFT saves a lora_A/lora_B pair for every module its target_modules matched, so this checks each
        targeted module by name and shape: an adapter of another model fails here whatever base it names.
        """
        weights = next((path / name for name in ADAPTER_WEIGHTS if (path / name).is_file()), None)
        if weights is None:
            raise AdapterError(f"adapter {path}: its weights file disappeared while it was being checked")
        try:
            with weights.open("rb") as handle:
                if not handle.read(8):
                    raise AdapterError(f"adapter {path}: {weights.name} is empty")
        except OSError as exc:
            raise AdapterError(f"adapter {path}: cannot read {weights.name}: {exc}") from exc
        try:
            rank = check_lora_weights(weights, self._base_linears())
        except ValueError as exc:
            declared_other = declared and not self._same_base_name(declared, self.base_model)
            why = (
                f" (it declares base model {declared!r}; this server serves {self.base_model!r})"
                if declared_other
                else ""
            )
            raise AdapterError(f"adapter {path}: {exc}{why}") from exc
        # Per-module ranks (PEFT's rank_pattern) can exceed the `r` in adapter_config.json.
        if rank > self.max_lora_rank:
            raise AdapterError(
                f"adapter {path}: its weights have rank {rank}, above the server's --max-lora-rank "
                f"{self.max_lora_rank}; restart with a larger --max-lora-rank"
            )

    def _base_linears(self) -> dict[str, tuple[int, int]] | None:
        """The base's linear layers by module name (built once), or None when they cannot be known."""
        if self._linears is None:
            from transformers import AutoConfig

            try:
                config = self.base_config or AutoConfig.from_pretrained(self.base_model)
                self._linears = base_linear_shapes(config)
            except Exception as exc:  # remote code, an architecture transformers lacks, no hub access
                self._linears_error = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "cannot list the linear layers of %s (%s); adapter weights are checked without them, "
                    "and adapters declaring another base are refused",
                    self.base_model,
                    self._linears_error,
                )
                self._linears = {}
        return self._linears or None

    def _check_template(self, name: str, manifest: dict[str, Any] | None) -> None:
        """The template lock: an adapter whose manifest records how its training rendered prompts is served
        only where this server renders them the same way (or with a warning, if allowed)."""
        recorded = (manifest or {}).get("template")
        if not isinstance(recorded, dict):
            return  # trained elsewhere, or before the lock existed: nothing recorded to compare
        if self.template is None and self.tokenizer is not None:
            self.template = template_fingerprint(self.tokenizer)
        if self.template is None:
            return  # no tokenizer yet (a registry used without a server)
        difference = fingerprint_difference(recorded, self.template)
        if difference is None:
            return
        message = (
            f"adapter {name!r} was trained with prompts rendered otherwise than this server renders them for "
            f"{self.base_model!r}: {difference}"
        )
        if self.allow_template_mismatch:
            log.warning("%s; serving it anyway (--allow-template-mismatch)", message)
            return
        raise AdapterError(
            f"{message}. Serve it on the tokenizer and chat template it was trained with, or pass "
            "--allow-template-mismatch to serve it anyway"
        )

    def _check_base(
        self, name: str, path: Path, declared: str | None, manifest: dict[str, Any] | None
    ) -> str:
        """How the adapter fits the served base (a BASE_* value), after _check_weights; AdapterError if not.

        finetune's manifest records the hash of a local base's weights (or, older, of its whole folder): that
        decides. Otherwise the weights
        (already checked against the base's linear layers) decide, and a declared name other than the
        served base's is only a warning: adapters trained elsewhere name the hub id or the path they were
        trained from. Where the base's layers cannot be listed, nothing but the name is left to check.
        """
        recorded = (manifest or {}).get("base_model")
        if (
            isinstance(recorded, dict)
            and recorded.get("source") == "local"
            and Path(self.base_model).is_dir()
        ):
            # The config and weights alone when recorded (the template lock, _check_template, judges the
            # tokenizer and template); else, from adapters made before, the whole folder's content.
            for what, served_hash in (
                ("weights", self._served_base_weights_sha256),
                ("content", self._served_base_sha256),
            ):
                trained = recorded.get(f"{what}_sha256")
                if not trained:
                    continue
                if trained == served_hash():
                    return BASE_BY_CONTENT
                raise AdapterError(
                    f"adapter {name!r} was trained on base model {recorded.get('name')!r} ({what} sha256 "
                    f"{trained[:12]}...), but this server serves {self.base_model!r} ({what} sha256 "
                    f"{served_hash()[:12]}...); they are different models"
                )
        checked = self._base_linears() is not None
        if not declared:
            log.warning(
                "adapter %s (%s) does not say which base model it was trained on; serving it on %s (%s)",
                name,
                path,
                self.base_model,
                "its weights fit the base's layers"
                if checked
                else "unchecked: the base's layers are unknown",
            )
            return BASE_UNDECLARED
        if self._same_base_name(declared, self.base_model):
            return BASE_BY_NAME
        if not checked:
            raise AdapterError(
                f"adapter {name!r} was trained on base model {declared!r}, but this server serves "
                f"{self.base_model!r}, whose linear layers cannot be listed ({self._linears_error}), so the "
                "adapter's weights cannot be checked against them; if it was trained on this same model, set "
                f"base_model_name_or_path in its adapter_config.json to {self.base_model!r}"
            )
        log.warning(
            "adapter %s (%s) declares base model %r, not the served %r; serving it on %s because every LoRA "
            "matrix in its weights fits a linear layer of that base by name and shape (if it was trained on "
            "another model of the same architecture and size, its answers will be wrong)",
            name,
            path,
            declared,
            self.base_model,
            self.base_model,
        )
        return BASE_BY_SHAPES

    def _served_base_weights_sha256(self) -> str:
        if self._base_weights_sha256 is None:
            self._base_weights_sha256 = weights_sha256(Path(self.base_model))
        return self._base_weights_sha256

    def _served_base_sha256(self) -> str:
        if self._base_sha256 is None:
            started = time.monotonic()
            self._base_sha256 = folder_sha256(Path(self.base_model))
            log.info("hashed base model folder %s in %.1fs", self.base_model, time.monotonic() - started)
        return self._base_sha256

    @staticmethod
    def _same_base_name(declared: str, served: str) -> bool:
        """Same string, same local folder, or a hub id whose last part names the local folder (any case)."""
        if declared.rstrip("/") == served.rstrip("/"):
            return True
        declared_path, served_path = Path(declared), Path(served)
        if declared_path.exists() and served_path.exists():
            return os.path.realpath(declared_path) == os.path.realpath(served_path)
        for hub, local in ((declared, served_path), (served, declared_path)):
            if is_hub_id(hub) and not is_hub_id(str(local)):
                return hub.rstrip("/").rsplit("/", 1)[-1].lower() == local.name.lower()
        return False
