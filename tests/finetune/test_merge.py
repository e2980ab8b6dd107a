"""`python -m finetune merge`: the merged model answers as base + adapter, carries the chat template, and
loads in `python -m serve`; a wrong base, an existing output or a folder that is no adapter are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune.cli import main
from finetune.merge import MERGE_RECORD
from finetune.prompting import encode_prompt
from tests.finetune.conftest import random_lora
from tuneserve.manifest import MANIFEST, file_sha256, folder_sha256

QUESTIONS = [
    'Describe the lantern as a JSON object with the keys "name" and "color". Output only the JSON.',
    "Say something about the harbor. Wrap your whole reply in double quotes.",
    "Hello! Who are you?",
]
MAX_TOKENS = 16


def random_adapter(base: Path, out: Path, *, manifest: dict[str, object] | None = None) -> Path:
    """A LoRA on every linear layer with random weights, large enough to change greedy answers."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    random_lora(base, out, targets, seed=5, scale=0.2)
    if manifest is not None:
        (out / MANIFEST).write_text(json.dumps(manifest))
    return out


def greedy(model: torch.nn.Module, prompts: list[list[int]]) -> list[list[int]]:
    return [
        model.generate(input_ids=torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False)[
            0, len(p) :
        ].tolist()  # type: ignore[operator]
        for p in prompts
    ]


def test_the_merged_model_answers_as_base_and_adapter_and_renders_as_training_did(
    tiny_base: Path, tiny_tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = {
        "base_model": {"source": "local", "path": str(tiny_base), "content_sha256": folder_sha256(tiny_base)}
    }
    adapter = random_adapter(tiny_base, tmp_path / "adapter", manifest=manifest)
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert not any(path.name.startswith("adapter_") for path in out.iterdir())
    assert (out / "model.safetensors").is_file() and not list(tmp_path.glob(".merged.*"))

    # The chat template travels with the model: the export renders every prompt as the base's tokenizer.
    exported = AutoTokenizer.from_pretrained(out)
    conversations = [[{"role": "user", "content": question}] for question in QUESTIONS]
    prompts = [encode_prompt(tiny_tokenizer, conversation) for conversation in conversations]
    assert [encode_prompt(exported, conversation) for conversation in conversations] == prompts
    assert exported.chat_template == tiny_tokenizer.chat_template

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.dtype == torch.float32  # the base's ("auto")
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    base_answers = greedy(base, prompts)
    with_adapter = PeftModel.from_pretrained(base, str(adapter)).eval()
    # W + s·BA once, or W x + s·B(A x) at each step: the same sums in another order, so logits agree to
    # float32 rounding (measured: at most 5.9e-5 on logits up to 3.9) and greedy tokens are the same.
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, atol=5e-4, rtol=0)
    tuned = greedy(with_adapter, prompts)
    assert greedy(merged, prompts) == tuned
    assert tuned != base_answers  # the adapter changes what the base says

    record = json.loads((out / MERGE_RECORD).read_text())
    assert record["base_model"]["name"] == str(tiny_base)
    assert record["adapter"]["files"]["adapter_model.safetensors"] == file_sha256(
        adapter / "adapter_model.safetensors"
    )
    assert record["adapter"]["manifest"] == manifest and record["dtype"] == "float32"


def test_a_wrong_base_an_existing_output_and_a_non_adapter_are_refused(
    tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = {"base_model": {"source": "local", "path": str(tiny_base), "content_sha256": "0" * 64}}
    adapter = random_adapter(tiny_base, tmp_path / "adapter", manifest=manifest)
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--out", str(out)]) == 2
    assert "is not the base" in capsys.readouterr().err and not out.exists()

    (adapter / MANIFEST).unlink()  # no manifest: the base adapter_config.json names
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["merge", "--adapter", str(adapter), "--out", str(out)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert [path.name for path in out.iterdir()] == ["keep.txt"]
    assert (
        main(["merge", "--adapter", str(adapter), "--out", str(out), "--force", "--dtype", "bfloat16"]) == 0
    )
    assert (
        not (out / "keep.txt").exists()
        and json.loads((out / MERGE_RECORD).read_text())["dtype"] == "bfloat16"
    )

    assert main(["merge", "--adapter", str(tiny_base), "--out", str(tmp_path / "x")]) == 2
    assert "has no adapter_config.json" in capsys.readouterr().err
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "x"), "--dtype", "int8"]) == 2
    assert "--dtype must be one of" in capsys.readouterr().err


@pytest.mark.slow
def test_python_m_serve_serves_a_merged_trained_adapter_as_peft_answers(
    trained_adapter: Path, tiny_base: Path, tiny_tokenizer, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    import openai
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.e2e import start_server, stop_server, wait_healthy

    out = tmp_path / "merged"
    assert (
        main(["merge", "--adapter", str(trained_adapter), "--out", str(out)]) == 0
    )  # base from its manifest
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(trained_adapter)).eval()
    conversations = [[{"role": "user", "content": question}] for question in QUESTIONS]
    expected = [
        tiny_tokenizer.decode(tokens, skip_special_tokens=True)
        for tokens in greedy(peft_model, [encode_prompt(tiny_tokenizer, c) for c in conversations])
    ]
    empty = tmp_path / "adapters"
    empty.mkdir()
    server = start_server(out, empty, tmp_path / "server.log")
    try:
        wait_healthy(server)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        answers = [
            client.chat.completions.create(
                model=str(out),
                messages=conversation,
                temperature=0,
                max_tokens=MAX_TOKENS,  # type: ignore[arg-type]
            )
            .choices[0]
            .message.content
            for conversation in conversations
        ]
    finally:
        stop_server(server)
    assert answers == expected
