"""Server settings: every flag also comes from SERVE_* environment variables; bad values are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from pydantic_settings import CliApp

from serve.__main__ import main
from serve.engine import engine_args
from serve.settings import ServeSettings


def test_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVE_API_KEY", "from-env")
    monkeypatch.setenv("SERVE_MAX_LORAS", "6")
    settings = CliApp.run(
        ServeSettings,
        cli_args=["--base-model", "org/model", "--lora", "a=/x", "--lora", "b=/y", "--max-lora-rank", "64"],
    )
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "from-env"
    assert settings.max_loras == 6
    assert settings.lora == ["a=/x", "b=/y"]
    assert settings.model_id == "org/model"
    args = engine_args(settings)
    assert args["enable_lora"] is True and args["max_lora_rank"] == 64 and args["max_loras"] == 6


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_lora_rank": 12}, "must be one of (1, 8, 16"),
        ({"max_loras": 4, "max_cpu_loras": 2}, "max_cpu_loras (2) must be >= max_loras (4)"),
        ({"port": 70000}, "less than or equal to 65535"),
    ],
)
def test_bad_values_are_refused(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ServeSettings(base_model="m", **values)  # type: ignore[arg-type]


def test_cli_errors_name_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--base-model", "m", "--lora", "no-equals-sign"]) == 2
    assert "--lora" in capsys.readouterr().err
    assert main(["--base-model", "m", "--max-loras", "0"]) == 2
    assert "--max-loras: Input should be greater than or equal to 1" in capsys.readouterr().err


def test_tool_call_parser_names_are_vllms(capsys: pytest.CaptureFixture[str]) -> None:
    settings = ServeSettings(base_model="m", enable_auto_tool_choice=True, tool_call_parser="hermes")
    assert settings.tool_call_parser == "hermes"
    # A typo fails at start-up with vLLM's list of parsers, as vLLM's server does (exit 2 like any bad flag).
    assert main(["--base-model", "m", "--enable-auto-tool-choice", "--tool-call-parser", "hermez"]) == 2
    error = capsys.readouterr().err
    assert "--tool-call-parser: unknown tool call parser 'hermez'" in error
    assert "hermes" in error and "llama3_json" in error and "mistral" in error
    assert main(["--base-model", "m", "--enable-auto-tool-choice"]) == 2
    assert "error: --enable-auto-tool-choice requires --tool-call-parser" in capsys.readouterr().err


def test_tool_parser_plugin_registers_a_parser(tmp_path: Path) -> None:
    plugin = tmp_path / "my_parser.py"
    plugin.write_text(
        "from vllm.tool_parsers import ToolParserManager\n"
        "from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser\n\n\n"
        '@ToolParserManager.register_module("tuneserve_test_plugin")\n'
        "class PluginParser(Hermes2ProToolParser):\n"
        "    pass\n"
    )
    with pytest.raises(ValidationError, match="unknown tool call parser"):
        ServeSettings(base_model="m", tool_call_parser="tuneserve_test_plugin")
    settings = ServeSettings(
        base_model="m", tool_parser_plugin=str(plugin), tool_call_parser="tuneserve_test_plugin"
    )
    assert settings.tool_call_parser == "tuneserve_test_plugin"
