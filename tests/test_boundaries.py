"""The import boundaries `make lint` checks with import-linter ([tool.importlinter] in pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("finetune", "serve", "client", "vllm_cpu_lora_fix", "tuneserve", "pipeline")
SHARED_WITH_SERVE = {"finetune.prompting", "finetune.servable"}


def _contracts() -> dict[str, dict[str, object]]:
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {contract["name"]: contract for contract in config["contracts"]}


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).with_name("lint-imports")), "--config", str(root / "pyproject.toml")]
    return subprocess.run(command, cwd=root, capture_output=True, text=True, env={"PYTHONPATH": str(root)})


def test_serve_may_use_only_the_prompt_renderer_and_the_servability_check() -> None:
    # The contract lists what serve may not import; a new finetune module must land on that list.
    contract = _contracts()["serve imports from finetune only the prompt renderer and the servability check"]
    modules = {f"finetune.{path.stem}" for path in (REPO_ROOT / "finetune").glob("*.py")} - {
        "finetune.__init__"
    }
    assert set(contract["forbidden_modules"]) == modules - SHARED_WITH_SERVE  # type: ignore[arg-type]


def test_the_tree_keeps_its_boundaries() -> None:
    result = _lint_imports(REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("finetune/data.py", "import serve.app", "finetune imports neither serve nor client"),
        ("client/bench.py", "from finetune import prompting", "client imports neither finetune nor serve"),
        ("serve/app.py", "import finetune.recipe", "serve imports from finetune only the prompt renderer"),
        ("tuneserve/hub.py", "import vllm_cpu_lora_fix", "tuneserve, the shared leaf, imports none"),
        ("pipeline/demo.py", "from client.tasks import FAMILIES", "the pipeline imports none of finetune"),
        ("serve/models.py", "from starlette.requests import Request", "serve's serving layer, models and"),
    ],
)
def test_a_forbidden_import_fails_the_lint(tmp_path: Path, module: str, line: str, contract: str) -> None:
    for package in PACKAGES:
        shutil.copytree(REPO_ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(f"{line}\n{target.read_text()}")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert f"Contracts: {len(_contracts()) - 1} kept, 1 broken." in result.stdout, result.stdout
    assert f"{contract}" in result.stdout.split("BROKEN")[0].splitlines()[-1], result.stdout
