"""tuneserve.hub.is_hub_id: the one rule serve (base and adapter names) and finetune (datasets) apply."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneserve.hub import is_hub_id


@pytest.mark.parametrize("value", ["Qwen/Qwen2.5-7B-Instruct", "gpt2", "google/IFEval", "org_1/name.v2"])
def test_repo_ids_are_hub_ids(value: str) -> None:
    assert is_hub_id(value)


@pytest.mark.parametrize(
    "value", ["", "/abs/model", "./model", "../model", "~/model", "a/b/c", "a\\b", "my model", "-x/y", "org/"]
)
def test_paths_and_malformed_names_are_not(value: str) -> None:
    assert not is_hub_id(value)


def test_an_existing_folder_is_a_path_even_when_named_like_an_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "org" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not is_hub_id("org/model")
    assert is_hub_id("org/other")


def test_datasets_need_an_owner() -> None:
    assert is_hub_id("squad") and not is_hub_id("squad", owner_required=True)
    assert is_hub_id("rajpurkar/squad", owner_required=True)
