"""What every package of the distribution shares: a leaf that imports none of them (checked by `make lint`).

finetune, serve, client and the pipeline may import from here; nothing here imports from them.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    """The installed tuneserve version, or "unknown" when running from a tree that was never installed."""
    try:
        return version("tuneserve")
    except PackageNotFoundError:
        return "unknown"
