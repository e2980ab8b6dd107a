"""Continued tuning (`init_from`) on the tiny base: the child starts from the parent's weights, its manifest
records the parent, `python -m finetune lineage` reads the chain back, and a parent that does not fit the run
is refused before training, naming why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.cli import main
from tests.finetune.conftest import REPO_ROOT, overrides
from tuneserve.manifest import MANIFEST, adapter_files, adapter_version

CONFIG = str(REPO_ROOT / "configs" / "tiny-demo.yaml")


def train(tiny_base: Path, data: Path, out: Path, *extra: str) -> int:
    return main(["run", "--config", CONFIG, *overrides(tiny_base, data, out, "training.max_steps=4", *extra)])


@pytest.fixture(scope="module")
def parent(tiny_base: Path, task_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lineage") / "parent"
    assert train(tiny_base, task_data, out) == 0
    return out


@pytest.fixture(scope="module")
def new_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from client.tasks import write_task_data

    out = tmp_path_factory.mktemp("new-tasks")
    return write_task_data(out, ["uppercase"], n_train=120, n_test=8, seed=1)["train"]


def lora_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_a_continued_adapter_starts_from_its_parent_and_records_it(
    parent: Path, new_data: Path, tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    child = tmp_path / "child"
    # A learning rate that cannot move the weights: what the child holds is what it started from.
    assert train(tiny_base, new_data, child, f"init_from={parent}", "training.learning_rate=1e-12") == 0
    started, trained = lora_weights(child), lora_weights(parent)
    assert started.keys() == trained.keys()
    assert any(
        tensor.abs().max() > 1e-3 for key, tensor in trained.items() if "lora_B" in key
    )  # not PEFT's 0
    for key, tensor in trained.items():
        torch.testing.assert_close(started[key], tensor, atol=1e-6, rtol=0)

    manifest = json.loads((child / MANIFEST).read_text())
    parent_manifest = json.loads((parent / MANIFEST).read_text())
    recorded = manifest["parent"]
    assert recorded["path"] == str(parent.resolve())
    assert recorded["version"] == adapter_version(adapter_files(parent))
    assert recorded["data"] == parent_manifest["data"] and recorded["data"] != manifest["data"]
    assert recorded["base_model"] == parent_manifest["base_model"] and recorded["steps"] == 4

    # Three generations, child first; then the grandparent's folder goes away.
    grandchild = tmp_path / "grandchild"
    assert train(tiny_base, new_data, grandchild, f"init_from={child}") == 0
    capsys.readouterr()
    assert main(["lineage", str(grandchild), "--json"]) == 0
    chain = json.loads(capsys.readouterr().out)
    assert [entry["version"] for entry in chain] == [
        adapter_version(adapter_files(folder)) for folder in (grandchild, child, parent)
    ]
    assert [entry["status"] for entry in chain] == ["present"] * 3
    assert chain[2]["data"]["sha256"] == parent_manifest["data"]["sha256"]
    moved = tmp_path / "moved"
    shutil.copytree(parent, moved)
    shutil.rmtree(parent)
    try:
        assert main(["lineage", str(grandchild)]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 3 and "[missing]" in lines[2] and lines[2].startswith("    sha256:")
    finally:
        shutil.copytree(moved, parent)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (["lora.r=8"], "init_from: lora.r=8 but the adapter at .* has r=16; continue it with lora.r=16"),
        (["lora.alpha=8"], "lora.alpha=8 but the adapter at .* has lora_alpha=32"),
        (["lora.target_modules=[q_proj]"], "was trained with 'all-linear'"),
        (["init_from=NOWHERE"], "has no adapter_config.json"),
        (["init_from=OTHER_BASE"], "was trained on another base"),
    ],
)
def test_a_parent_that_does_not_fit_is_refused_before_training(
    parent: Path,
    new_data: Path,
    tiny_base: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    edit: list[str],
    message: str,
) -> None:
    import re

    other_base = tmp_path / "other-base-parent"
    shutil.copytree(parent, other_base)
    manifest = json.loads((other_base / MANIFEST).read_text())
    manifest["base_model"]["content_sha256"] = "0" * 64
    (other_base / MANIFEST).write_text(json.dumps(manifest))
    replaced = {"NOWHERE": str(tmp_path / "nowhere"), "OTHER_BASE": str(other_base)}
    edits = [edit[0].replace(key, value) for key, value in replaced.items() if key in edit[0]] or edit
    extra = edits if edits[0].startswith("init_from=") else [f"init_from={parent}", *edits]
    out = tmp_path / "child"
    assert train(tiny_base, new_data, out, *extra) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists() and not Path(f"{out}.partial").exists()
