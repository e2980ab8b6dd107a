"""Where adapters come from besides the adapters dir: S3 URIs and hub ids, allowed by --adapter-sources and
fetched into a local cache before the usual checks (serve.adapters). No HTTP and no engine here:
serve.models decides when to fetch, and unloads what the cache evicts.

An adapter from a source is named by where it lives, and that name is its model id in the API:
`s3://bucket/prefix/sql` (a folder holding adapter_config.json) or `org/name` / `org/name@revision` (a hub
repo). The cache keeps whole adapter folders under a size limit; the least recently used go first; a folder
is renamed into place only once complete, so a half-fetched adapter is never served.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from serve.adapters import AdapterError
from tuneserve.hub import is_hub_id
from tuneserve.manifest import ADAPTER_CONFIG

log = logging.getLogger(__name__)

LOCAL = "local"
S3_SCHEME = "s3://"
HUB_PREFIX = "hf:"


class SourceNotFound(AdapterError):
    """The reference is allowed but nothing is there: the same 404 as a model that does not exist."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=404)


class SourceUnavailable(AdapterError):
    """The source could not be read now (network, credentials, permissions): 502, worth a retry."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=502)


@dataclass(frozen=True)
class AdapterRef:
    """An adapter in a remote source; `uri` is its model id."""

    kind: Literal["s3", "hf"]
    uri: str
    location: str  # s3: "bucket/prefix" (no scheme); hf: the repo id
    revision: str | None = None

    @property
    def key(self) -> str:
        """The cache's folder name for this adapter."""
        return hashlib.sha256(self.uri.encode()).hexdigest()[:32]


def parse_ref(value: str) -> AdapterRef | None:
    """`s3://bucket/prefix` or `org/name[@revision]`, else None."""
    if value.startswith(S3_SCHEME):
        location = value[len(S3_SCHEME) :].strip("/")
        bucket, _, prefix = location.partition("/")
        if not bucket or not prefix or any(part in ("", ".", "..") for part in prefix.split("/")):
            return None
        return AdapterRef("s3", f"{S3_SCHEME}{location}", location)
    repo_id, _, revision = value.partition("@")
    # Only `owner/name`: a bare name is an adapter of the adapters dir.
    if not _is_repo_id(repo_id) or (revision == "" and "@" in value):
        return None
    uri = f"{repo_id}@{revision}" if revision else repo_id
    return AdapterRef("hf", uri, repo_id, revision or None)


def _is_repo_id(value: str) -> bool:
    return value.count("/") == 1 and is_hub_id(value, owner_required=True)


@dataclass(frozen=True)
class AdapterSources:
    """--adapter-sources: `local` (names in the adapters dir), S3 prefixes and hub owners or repos."""

    local: bool
    s3_prefixes: tuple[str, ...] = ()  # "s3://bucket/" or "s3://bucket/prefix/"
    hub_prefixes: tuple[str, ...] = ()  # "" (any repo), "org/" or "org/name/"

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AdapterSources:
        """ValueError naming the entry for anything but `local`, `s3://BUCKET[/PREFIX]` or `hf:[ORG[/NAME]]`.
        A prefix covers what lies under it as a folder: s3://team covers s3://team/x, not s3://team-2/x."""
        local, s3, hub = False, [], []
        for raw in entries:
            entry = raw.strip()
            if entry == LOCAL:
                local = True
            elif entry.startswith(S3_SCHEME):
                location = entry[len(S3_SCHEME) :].strip("/")
                if not location or ".." in location.split("/"):
                    raise ValueError(
                        f"adapter source {entry!r} names no bucket; write s3://BUCKET/ or s3://BUCKET/PREFIX/"
                    )
                s3.append(f"{S3_SCHEME}{location}/")
            elif entry.startswith(HUB_PREFIX):
                prefix = entry[len(HUB_PREFIX) :].strip("/")
                if prefix and not (
                    is_hub_id(prefix.split("/", 1)[0]) and (prefix.count("/") == 0 or _is_repo_id(prefix))
                ):
                    raise ValueError(
                        f"adapter source {entry!r} is not a hub owner or repo; write hf: (any repo), hf:ORG/ "
                        "or hf:ORG/NAME"
                    )
                hub.append(f"{prefix}/" if prefix else "")
            else:
                raise ValueError(
                    f"adapter source {entry!r} is not one of: local, s3://BUCKET/PREFIX/, hf:ORG/ "
                    "(comma-separated)"
                )
        return cls(local, tuple(s3), tuple(hub))

    @property
    def remote(self) -> bool:
        return bool(self.s3_prefixes or self.hub_prefixes)

    def allowed(self, value: str) -> AdapterRef | None:
        """The reference `value` names, if it lies in an allowed remote source; else None."""
        ref = parse_ref(value)
        if ref is None:
            return None
        prefixes = self.s3_prefixes if ref.kind == "s3" else self.hub_prefixes
        where = ref.uri if ref.kind == "s3" else ref.location
        return ref if any(f"{where}/".startswith(prefix) for prefix in prefixes) else None

    def describe(self) -> str:
        parts = [LOCAL] if self.local else []
        parts += [*self.s3_prefixes, *(f"{HUB_PREFIX}{prefix}" for prefix in self.hub_prefixes)]
        return ",".join(parts) or "(none)"


# ------------------------------------------------------------------------------------------- fetching


def fetch(ref: AdapterRef, dest: Path, max_bytes: int) -> None:
    """Write the adapter's files (those directly in its folder or repo) into the empty folder `dest`."""
    if ref.kind == "s3":
        _fetch_s3(ref, dest, max_bytes)
    else:
        _fetch_hub(ref, dest, max_bytes)
    if not (dest / ADAPTER_CONFIG).is_file():
        raise SourceNotFound(f"{ref.uri} holds no {ADAPTER_CONFIG}, so it is no PEFT adapter")


def _too_big(ref: AdapterRef, size: int, max_bytes: int) -> AdapterError:
    return AdapterError(
        f"adapter {ref.uri} is {size / 2**20:.1f} MiB, more than the whole adapter cache "
        f"({max_bytes / 2**20:.1f} MiB); restart the server with a larger --adapter-cache-size",
        status=400,
    )


def _fetch_s3(ref: AdapterRef, dest: Path, max_bytes: int) -> None:
    try:
        import s3fs
    except ImportError:
        raise SourceUnavailable(
            f"{ref.uri}: S3 needs s3fs, which is not installed; pip install 'tuneserve[s3]'"
        ) from None
    # The endpoint, region and credentials come from the usual AWS variables and files (botocore reads them);
    # no listing cache: a new version uploaded under the same prefix must be seen.
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    try:
        listing = fs.ls(ref.location, detail=True)
    except FileNotFoundError:
        raise SourceNotFound(f"nothing at {ref.uri}") from None
    except Exception as exc:
        raise SourceUnavailable(f"cannot list {ref.uri}: {_reason(exc)}") from exc
    files = [item for item in listing if item.get("type") == "file"]
    names = {item["name"].rsplit("/", 1)[-1] for item in files}
    if ADAPTER_CONFIG not in names:
        raise SourceNotFound(f"nothing at {ref.uri} (no {ADAPTER_CONFIG} directly under it)")
    size = sum(int(item.get("size") or 0) for item in files)
    if size > max_bytes:
        raise _too_big(ref, size, max_bytes)
    try:
        for item in files:
            fs.get_file(item["name"], str(dest / item["name"].rsplit("/", 1)[-1]))
    except Exception as exc:
        raise SourceUnavailable(f"cannot download {ref.uri}: {_reason(exc)}") from exc


def _fetch_hub(ref: AdapterRef, dest: Path, max_bytes: int) -> None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        # Into the hub's own cache (HF_HUB_CACHE, offline with HF_HUB_OFFLINE=1, a token from HF_TOKEN); the
        # adapter's top-level files only: repos may keep checkpoints in sub-folders.
        snapshot = Path(snapshot_download(ref.location, revision=ref.revision, ignore_patterns=["*/*"]))
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        if isinstance(exc, GatedRepoError):
            raise SourceUnavailable(f"hub repo {ref.uri} is gated: {_reason(exc)}") from exc
        raise SourceNotFound(f"no hub repo {ref.uri}") from None
    except LocalEntryNotFoundError:
        raise SourceNotFound(
            f"hub repo {ref.uri} is not in the local hub cache (the hub is offline)"
        ) from None
    except Exception as exc:
        raise SourceUnavailable(f"cannot download hub repo {ref.uri}: {_reason(exc)}") from exc
    files = [path for path in snapshot.iterdir() if path.is_file() and not path.name.startswith(".")]
    size = sum(path.stat().st_size for path in files)
    if size > max_bytes:
        raise _too_big(ref, size, max_bytes)
    for path in files:
        shutil.copyfile(path, dest / path.name)  # the cache's files are symlinks to blobs: copy the content


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


# ---------------------------------------------------------------------------------------------- cache


@dataclass
class CachedAdapter:
    uri: str
    path: Path  # the adapter folder
    size: int
    last_used: float


class AdapterCache:
    """Adapter folders fetched from sources, at most `max_bytes` together; one server process owns `root`.

    Layout: `root/KEY/adapter/` (the files) and `root/KEY/source.json` (its URI and size), made complete in a
    staging folder and renamed into place: a folder without source.json is an interrupted fetch.
    """

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        root.mkdir(parents=True, exist_ok=True)
        self._lock_file = self._lock(root)
        self._entries: dict[str, CachedAdapter] = {}
        for folder in root.iterdir():
            if folder.name.startswith("."):
                if folder.name.startswith(".staging-"):
                    shutil.rmtree(folder, ignore_errors=True)
                continue
            entry = self._read(folder)
            if entry is None:
                log.warning("adapter cache: removing %s, an incomplete entry", folder)
                shutil.rmtree(folder, ignore_errors=True)
            else:
                self._entries[entry.uri] = entry

    @staticmethod
    def _lock(root: Path) -> BinaryIO:
        handle = (root / ".lock").open("ab")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise ValueError(
                f"--adapter-cache-dir {root} is in use by another server process; give each server its own "
                "(it evicts what it alone tracks)"
            ) from None
        return handle

    @staticmethod
    def _read(folder: Path) -> CachedAdapter | None:
        meta = folder / "source.json"
        try:
            record = json.loads(meta.read_text(encoding="utf-8"))
            return CachedAdapter(record["uri"], folder / "adapter", int(record["size"]), meta.stat().st_mtime)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def close(self) -> None:
        self._lock_file.close()

    def __iter__(self) -> Iterator[CachedAdapter]:
        return iter(sorted(self._entries.values(), key=lambda entry: entry.last_used))

    def __contains__(self, uri: str) -> bool:
        return uri in self._entries

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self._entries.values())

    def get(self, ref: AdapterRef) -> CachedAdapter | None:
        entry = self._entries.get(ref.uri)
        if entry is not None:
            self.touch(ref.uri)
        return entry

    def touch(self, uri: str) -> None:
        entry = self._entries.get(uri)
        if entry is not None:
            entry.last_used = time.time()

    def download(self, ref: AdapterRef) -> CachedAdapter:
        """Fetch `ref` into the cache's folder (blocking: run it in a thread); add() then tracks it, and the
        caller makes room afterwards."""
        staging = self.root / f".staging-{uuid.uuid4().hex}"
        (staging / "adapter").mkdir(parents=True)
        try:
            started = time.monotonic()
            fetch(ref, staging / "adapter", self.max_bytes)
            size = sum(path.stat().st_size for path in (staging / "adapter").iterdir())
            (staging / "source.json").write_text(json.dumps({"uri": ref.uri, "size": size}), encoding="utf-8")
            final = self.root / ref.key
            if final.exists():  # an entry this process evicted but could not delete
                shutil.rmtree(final)
            os.rename(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info(
            "fetched adapter %s (%.1f MiB) in %.1f s into %s",
            ref.uri,
            size / 2**20,
            time.monotonic() - started,
            final,
        )
        return CachedAdapter(ref.uri, final / "adapter", size, time.time())

    def add(self, entry: CachedAdapter) -> None:
        self._entries[entry.uri] = entry

    def remove(self, uri: str) -> None:
        entry = self._entries.pop(uri, None)
        if entry is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(entry.path.parent)

    def over_limit(self) -> int:
        """Bytes above the size limit (0 if under it)."""
        return max(0, self.total_bytes - self.max_bytes)

    def status(self) -> dict[str, Any]:
        return {
            "dir": str(self.root),
            "max_bytes": self.max_bytes,
            "bytes": self.total_bytes,
            "adapters": [
                {"uri": entry.uri, "bytes": entry.size, "last_used": entry.last_used} for entry in self
            ],
        }
