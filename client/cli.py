"""What every `python -m client` command shares: its flags are the fields of one pydantic-settings model, and
a bad value ends as argparse's usage error (exit 2) naming the flag and saying what is allowed."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import TypeAlias, TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings, CliSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
Settings = TypeVar("Settings", bound="CommandSettings")


class UsageError(Exception):
    """A flag's value that only the command can judge (e.g. a data file that does not parse): exit 2."""


class CommandSettings(BaseSettings):
    """Base of the client commands' settings: kebab-case flags, a bool flag flips its default (`--no-cache`),
    unknown fields are refused, and nothing is read from the environment."""

    model_config = SettingsConfigDict(
        cli_kebab_case=True, cli_implicit_flags="toggle", cli_hide_none_type=True, extra="forbid"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Flags (added by `add_command`) and keyword arguments only: an environment variable such as SEED or
        # OUT must not change a benchmark unseen.
        return (init_settings,)


def describe(error: ValidationError) -> str:
    """One clause per invalid value: the flag, what is allowed, and what was given."""
    lines = []
    for each in error.errors():
        message = each["msg"].removeprefix("Value error, ")
        if not each["loc"]:  # a check across flags names them itself
            lines.append(message)
        elif each["type"] == "missing":
            lines.append(f"--{str(each['loc'][0]).replace('_', '-')} is required")
        elif each["type"] == "value_error":  # our own checks quote the value where it helps
            lines.append(f"--{str(each['loc'][0]).replace('_', '-')}: {message}")
        else:
            lines.append(f"--{str(each['loc'][0]).replace('_', '-')}: {message} (got {each['input']})")
    return "; ".join(lines)


def add_command(
    commands: Commands,
    name: str,
    settings: type[Settings],
    run: Callable[[Settings], int],
    *,
    help: str,
    description: str,
    formatter_class: type[argparse.HelpFormatter] = argparse.HelpFormatter,
) -> None:
    """Register `name`: its flags are the fields of `settings`; `main` hands `run` the checked settings."""
    parser = commands.add_parser(name, help=help, description=description, formatter_class=formatter_class)
    source: CliSettingsSource[Settings] = CliSettingsSource(settings, root_parser=parser)

    def run_parsed(args: argparse.Namespace) -> int:
        try:
            checked = settings(_cli_settings_source=source(parsed_args=args))
        except ValidationError as error:
            parser.error(describe(error))
        try:
            return run(checked)
        except UsageError as error:
            parser.error(str(error))

    parser.set_defaults(run=run_parsed)


def known_names(names: list[str], known: Sequence[str], what: str) -> list[str]:
    """`names` (e.g. a comma-separated flag's parts) stripped; ValueError for none, an unknown or a repeat."""
    chosen = [name.strip() for name in names if name.strip()]
    unknown = [name for name in chosen if name not in known]
    if unknown or not chosen:
        raise ValueError(f"unknown {what} {unknown or names}; choose from: {', '.join(known)}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"lists one of the {what} more than once: {','.join(chosen)}")
    return chosen
