"""API keys with scopes (tenants): which models each key may use and how many requests a minute it may
send, read from --api-keys-file. No HTTP here: serve/routes.py authenticates with it and answers refusals."""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, TypeAdapter, ValidationError, model_validator

# Labels of the keys given on the command line; a file entry may not take them.
API_KEY_TENANT = "api-key"
ADMIN_KEY_TENANT = "admin-api-key"
RATE_WINDOW_S = 60.0


class KeyEntry(BaseModel):
    """One entry of the keys file. The key comes in clear (`key`), from an environment variable (`key_env`),
    or as the SHA-256 of the key in hex (`key_sha256`: the file then holds no secret)."""

    # hide_input_in_errors: an error about an entry never quotes its key.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True, frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")  # a metric label and log field, never the key
    key: SecretStr | None = None
    key_env: str | None = Field(None, min_length=1)
    key_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    models: list[str] = Field(min_length=1)  # served names or glob patterns ("*": every model)
    rate_limit_rpm: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_key(self) -> KeyEntry:
        given = [name for name in ("key", "key_env", "key_sha256") if getattr(self, name) is not None]
        if len(given) != 1:
            got = ", ".join(given) or "none"
            raise ValueError(f"give exactly one of key, key_env, key_sha256 (got {got})")
        if self.key is not None and not self.key.get_secret_value():
            raise ValueError("key is empty")
        if any(not pattern.strip() for pattern in self.models):
            raise ValueError("models holds an empty name")
        return self


_ENTRIES = TypeAdapter(list[dict[str, Any]])


@dataclass(frozen=True)
class Tenant:
    """Who sent a request: `name` labels logs and metrics; `models` are names or glob patterns it may use."""

    name: str
    models: tuple[str, ...]
    rate_limit_rpm: int | None = None

    @property
    def all_models(self) -> bool:
        return "*" in self.models

    def allows(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass
class Tenants:
    """The keys this server accepts (by their SHA-256), each with its tenant."""

    keys: list[tuple[bytes, Tenant]]
    # /v1 routes need one of the keys; False with --admin-api-key alone, which guards only the admin routes.
    required: bool
    clock: Callable[[], float] = time.monotonic
    # tenant name -> times of its requests admitted in the last RATE_WINDOW_S (at most rate_limit_rpm).
    _admitted: dict[str, deque[float]] = field(default_factory=dict)

    @property
    def rate_limited(self) -> bool:
        return any(tenant.rate_limit_rpm is not None for _, tenant in self.keys)

    @property
    def names(self) -> list[str]:
        return [tenant.name for _, tenant in self.keys]

    def authenticate(self, token: str) -> Tenant | None:
        """The tenant of this key, or None. Every stored digest is compared, in constant time, so the answer
        takes as long whichever key (if any) matches."""
        digest = key_digest(token)
        found = None
        for stored, tenant in self.keys:
            if hmac.compare_digest(digest, stored):
                found = tenant
        return found

    def admit(self, tenant: Tenant) -> float | None:
        """Count one request of `tenant`; None if it is within its rate limit, else the seconds until it
        would be (a sliding window: never more than rate_limit_rpm requests in any RATE_WINDOW_S)."""
        if tenant.rate_limit_rpm is None:
            return None
        now = self.clock()
        times = self._admitted.setdefault(tenant.name, deque())
        while times and times[0] <= now - RATE_WINDOW_S:
            times.popleft()
        if len(times) >= tenant.rate_limit_rpm:
            return times[0] + RATE_WINDOW_S - now
        times.append(now)
        return None


class KeysFileError(ValueError):
    """A keys file that cannot be used; the message names the file and the entry, never a key."""


def load_tenants(
    path: Path | None,
    *,
    api_key: str | None = None,
    admin_api_key: str | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Tenants:
    """The keys of `path` (YAML or JSON: a list of entries, see KeyEntry) plus --api-key and --admin-api-key
    (both for every model, without a rate limit)."""
    keys: list[tuple[bytes, Tenant]] = []
    if api_key is not None:
        keys.append((key_digest(api_key), Tenant(API_KEY_TENANT, ("*",))))
    if admin_api_key is not None:
        keys.append((key_digest(admin_api_key), Tenant(ADMIN_KEY_TENANT, ("*",))))
    if path is not None:
        keys += _read_keys_file(path, keys)
    return Tenants(keys, required=api_key is not None or path is not None, clock=clock)


def _read_keys_file(path: Path, builtin: list[tuple[bytes, Tenant]]) -> list[tuple[bytes, Tenant]]:
    import yaml

    def fail(message: str) -> KeysFileError:
        return KeysFileError(f"API keys file {path}: {message}")

    try:
        text = path.read_text()
    except OSError as exc:
        raise fail(f"cannot be read ({exc.strerror})") from None
    try:
        document = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        raw = _ENTRIES.validate_python(document)
    except (ValueError, yaml.YAMLError, ValidationError):
        # No parser's message: it may quote a line of the file, key included.
        entries = "{name, key | key_env | key_sha256, models}"
        raise fail(f"must be a JSON or YAML list of entries {entries}") from None
    if not raw:
        raise fail("holds no entries")
    seen_names = {tenant.name: "the command line" for _, tenant in builtin}
    seen_keys = {digest: f"'{tenant.name}'" for digest, tenant in builtin}
    keys = []
    for index, item in enumerate(raw, start=1):
        label = f"entry {index}" + (f" ('{item['name']}')" if isinstance(item.get("name"), str) else "")
        try:
            entry = KeyEntry.model_validate(item)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, error['loc'])) or 'entry'}: {error['msg']}" for error in exc.errors()
            )
            raise fail(f"{label}: {problems}") from None
        if entry.name in seen_names:
            raise fail(f"{label}: the name '{entry.name}' is taken (by {seen_names[entry.name]})")
        if entry.key_env is not None:
            value = os.environ.get(entry.key_env, "")
            if not value:
                raise fail(f"{label}: the environment variable {entry.key_env} (key_env) is not set or empty")
            digest = key_digest(value)
        elif entry.key is not None:
            digest = key_digest(entry.key.get_secret_value())
        else:
            assert entry.key_sha256 is not None
            digest = bytes.fromhex(entry.key_sha256)
        if digest in seen_keys:
            raise fail(f"{label}: the same key as {seen_keys[digest]}; every tenant needs its own key")
        seen_names[entry.name] = f"entry {index}"
        seen_keys[digest] = f"entry {index} ('{entry.name}')"
        keys.append((digest, Tenant(entry.name, tuple(entry.models), entry.rate_limit_rpm)))
    return keys
