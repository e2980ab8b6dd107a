"""Where built bases are cached (.cache/NAME; the tiny base in .cache/tiny-base): one folder per base for the
pipeline, the tests and the benchmarks. `finetune base` builds them; building again reuses the folder."""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO_ROOT / ".cache"
TINY = "tiny"


def built_base_dir(name: str) -> Path:
    """The cache folder of a base `python -m finetune base NAME` builds."""
    return CACHE_DIR / ("tiny-base" if name == TINY else name)


TINY_BASE_DIR = built_base_dir(TINY)


def build_base_command(name: str) -> list[str]:
    """`python -m finetune base NAME --out` its cache folder (reused when already built)."""
    return [sys.executable, "-m", "finetune", "base", name, "--out", str(built_base_dir(name))]
