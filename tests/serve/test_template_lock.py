"""The template lock: an adapter's manifest records how training rendered prompts, and the server refuses to
serve it where it renders them otherwise, naming the first differing token (or warns, if allowed)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from client.__main__ import main as client_main
from client.tasks import write_task_data
from finetune.prompting import fingerprint_difference, template_fingerprint
from serve.adapters import BASE_BY_CONTENT, AdapterError, AdapterRegistry
from tests.e2e import start_server, stop_server, wait_healthy
from tuneserve.manifest import MANIFEST, weights_sha256
from tuneserve.rendering import GOLDEN_CHATS


def _with_system_prompt(tiny_base: Path, out: Path) -> Path:
    """The tiny base with one change: its chat template adds a default system prompt (as SmolLM2's does)."""
    shutil.copytree(tiny_base, out)
    template = (out / "chat_template.jinja").read_text()
    default = (
        "{%- if messages[0]['role'] != 'system' %}<|im_start|>system\nBe brief.<|im_end|>\n{%- endif %}\n"
    )
    (out / "chat_template.jinja").write_text(default + template)
    return out


def _registry(base: Path, **options: bool) -> AdapterRegistry:
    template = template_fingerprint(AutoTokenizer.from_pretrained(str(base)))
    return AdapterRegistry(
        base_model=str(base), adapters_dir=None, max_lora_rank=16, template=template, **options
    )


def test_the_fingerprint_names_the_first_differing_token(tiny_base: Path, tmp_path: Path) -> None:
    trained = template_fingerprint(AutoTokenizer.from_pretrained(str(tiny_base)))
    assert len(trained["golden"]) == len(GOLDEN_CHATS) and all("ids" in chat for chat in trained["golden"])
    assert trained["generation_prompt"] == "<|im_start|>assistant\n"
    assert fingerprint_difference(trained, trained) is None
    changed = _with_system_prompt(tiny_base, tmp_path / "changed")
    served = template_fingerprint(AutoTokenizer.from_pretrained(str(changed)))
    difference = fingerprint_difference(trained, served)
    assert difference is not None
    assert difference.startswith("golden conversation 1 of 2 differs at token 1: trained 'user' (id ")
    assert "served 'system' (id " in difference
    # The weights are the same network: only the template changed.
    assert weights_sha256(changed) == weights_sha256(tiny_base)
    # A field beyond the golden chats: named by itself.
    assert fingerprint_difference({**trained, "eos_token_id": 0}, trained) == (
        f"eos_token_id differs: trained 0, served {trained['eos_token_id']}"
    )


@pytest.mark.slow
def test_an_adapter_is_refused_where_prompts_render_otherwise(
    adapters_dir: Path, tiny_base: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    adapter = adapters_dir / "fmt"
    manifest = json.loads((adapter / MANIFEST).read_text())
    assert manifest["template"]["golden"] and manifest["base_model"]["weights_sha256"]
    assert _registry(tiny_base).validate("fmt", adapter).base_check == BASE_BY_CONTENT

    changed = _with_system_prompt(tiny_base, tmp_path / "changed")
    with pytest.raises(
        AdapterError, match=r"golden conversation 1 of 2 differs at token 1: trained 'user'"
    ) as refused:
        _registry(changed).validate("fmt", adapter)
    assert "--allow-template-mismatch" in str(refused.value)
    with caplog.at_level(logging.WARNING, logger="serve.adapters"):
        allowed = _registry(changed, allow_template_mismatch=True).validate("fmt", adapter)
    assert allowed.base_check == BASE_BY_CONTENT  # the same weights: only the rendering differs
    assert "serving it anyway (--allow-template-mismatch)" in caplog.text

    # An adapter made before the lock (no fingerprint in its manifest) is served as before.
    older = tmp_path / "older"
    shutil.copytree(adapter, older)
    (older / MANIFEST).write_text(json.dumps({**manifest, "template": None}))
    assert _registry(changed).validate("older", older).base_check == BASE_BY_CONTENT


@pytest.mark.slow
def test_the_server_refuses_it_at_start_and_the_client_sees_it_too(
    adapters_dir: Path, tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import httpx

    changed = _with_system_prompt(tiny_base, tmp_path / "changed")
    served = tmp_path / "adapters"
    served.mkdir()
    shutil.copytree(adapters_dir / "fmt", served / "fmt")
    shutil.copytree(adapters_dir / "elsewhere", served / "elsewhere")  # plain PEFT: nothing recorded
    tasks = write_task_data(tmp_path / "tasks", ["uppercase"], n_train=0, n_test=2)["test"]
    server = start_server(changed, served, tmp_path / "server.log")
    try:
        wait_healthy(server)
        models = {entry["id"] for entry in httpx.get(f"{server.url}/v1/models").json()["data"]}
        # The client catches the same difference through /tokenize before it sends a prompt.
        bench = ["bench", "--base-url", f"{server.url}/v1", "--models", str(changed), "--suite", "tasks"]
        bench += ["--data", str(tasks), "--max-tokens", "8", "--no-progress"]
        assert client_main([*bench, "--out", str(tmp_path / "b1"), "--tokenizer", str(tiny_base)]) == 2
        error = capsys.readouterr().err
        assert "golden conversation 1 of 2 differs at token 1: local 'user' (id " in error
        assert not (tmp_path / "b1" / "results.json").exists()
        assert client_main([*bench, "--out", str(tmp_path / "b2"), "--tokenizer", str(changed)]) == 0
        assert (tmp_path / "b2" / "results.json").is_file()
    finally:
        stop_server(server)
    assert "elsewhere" in models and "fmt" not in models
    log = (tmp_path / "server.log").read_text()
    assert "golden conversation 1 of 2 differs at token 1" in log
