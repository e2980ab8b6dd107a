"""Config loading: every shipped config validates, overrides apply, and each bad input names its field."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.config import ConfigError, dump_config, load_config

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO_ROOT / "configs").glob("*.yaml"))

MINIMAL = ["base_model=some/model", "output_dir=out", "data.path=data.jsonl"]


def test_configs_are_shipped() -> None:
    names = {path.name for path in SHIPPED}
    assert {
        "tiny-demo.yaml",
        "qwen2.5-7b-instruct-lora.yaml",
        "llama-3.1-8b-instruct-lora.yaml",
        "mistral-7b-instruct-v0.3-lora.yaml",
    } <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    config = load_config(path)
    assert config.base_model
    assert config.output_dir
    assert config.data.path


def test_overrides_apply_to_any_field(tmp_path: Path) -> None:
    config = load_config(
        REPO_ROOT / "configs" / "tiny-demo.yaml",
        ["training.max_steps=7", "lora.r=8", "lora.target_modules=[q_proj, v_proj]", "data.overlong=drop"],
    )
    assert config.training.max_steps == 7
    assert config.lora.r == 8
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.data.overlong == "drop"
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(dump_config(config))
    assert load_config(dumped) == config


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["training.learning_rat=1e-4"], "training.learning_rat: unknown field"),
        (["training.learning_rate=fast"], "training.learning_rate: Input should be a valid number"),
        (
            ["training.precision=fp16"],
            "fp16 is not supported (loss scaling is not implemented); use bf16 or fp32",
        ),
        (["lora.use_dora=true"], "vLLM cannot serve DoRA"),
        (["lora.modules_to_save=[lm_head]"], "vLLM cannot serve fully trained extra modules"),
        (["lora.target_modules=[q_proj, lm_head]"], "'lm_head' is an embedding or output head"),
        (["lora.target_modules=[embed_tokens]"], "'embed_tokens' is an embedding or output head"),
        (["lora.r=1024"], "above the largest rank vLLM serves (512)"),
        (["lora.r=0"], "lora.r: Input should be greater than or equal to 1"),
        (["data.format=csv"], "data.format: Input should be 'auto', 'alpaca', 'chat' or 'prompt_completion'"),
        (["data.eval_fraction=1.5"], "data.eval_fraction: Input should be less than 1"),
        (["training.micro_batch_size=0"], "training.micro_batch_size"),
    ],
)
def test_bad_values_name_the_field(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, MINIMAL + overrides)
    assert expected in str(caught.value)


def test_missing_required_fields_are_listed() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["base_model=x"])
    message = str(caught.value)
    assert "output_dir: required field is missing" in message
    assert "data: required field is missing" in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("base_model: [unclosed", "is not valid YAML"),
        ("- a\n- list\n", "must hold a mapping of fields, not list"),
    ],
)
def test_bad_files(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=expected):
        load_config(path)


def test_missing_file_and_bad_override() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nowhere.yaml")
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config(None, ["training.max_steps"])
    with pytest.raises(ConfigError, match=r"lora\.r is not a section"):
        load_config(None, [*MINIMAL, "lora.r=4", "lora.r.x=1"])
