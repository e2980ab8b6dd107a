"""`python -m serve --base-model PATH_OR_HUB_ID [--adapters-dir DIR] [--lora NAME=PATH]`."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from pydantic import ValidationError

if TYPE_CHECKING:
    from serve.settings import ServeSettings

S = TypeVar("S", bound="ServeSettings")


def main(argv: list[str] | None = None) -> int:
    from serve.settings import ServeSettings

    settings = load_settings(ServeSettings, argv)
    if settings is None:
        return 2
    import uvicorn

    from serve.app import build_app

    server: uvicorn.Server | None = None

    def request_stop() -> None:  # uvicorn re-raises a caught SIGTERM on exit, which would hide our exit code
        assert server is not None
        server.should_exit = True

    app = build_app(settings, request_stop=request_stop)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # On SIGINT/SIGTERM, requests still open after this long are cut, so the server always stops.
        timeout_graceful_shutdown=settings.shutdown_timeout,
    )
    server = uvicorn.Server(config)
    # uvicorn re-raises the SIGINT it stopped on: a requested stop, not a failure.
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    # Non-zero when the engine could not start (3) or died (1), so a supervisor restarts the server.
    return int(getattr(app.state, "exit_code", 0))


def load_settings(kind: type[S], argv: list[str] | None) -> S | None:
    """The settings from the command line (and SERVE_* variables), checked before anything starts, with
    logging set up at their level; None once what is wrong is printed, one `error:` line each (exit 2)."""
    from pydantic_settings import CliApp

    from serve.adapters import parse_lora_option

    try:
        settings = CliApp.run(kind, cli_args=sys.argv[1:] if argv is None else argv)
    except ValidationError as exc:
        print_settings_errors(exc)
        return None
    refusal = missing_base_folder(settings)
    if refusal is not None:
        print(f"error: --base-model: {refusal}", file=sys.stderr)
        return None
    try:
        for value in settings.lora:
            parse_lora_option(value)
    except ValueError as exc:
        print(f"error: --lora: {exc}", file=sys.stderr)
        return None
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return settings


def print_settings_errors(exc: ValidationError) -> None:
    """One `error: --flag: message` line per invalid setting, for a command line that exits 2."""
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        if error["loc"]:  # a rule between flags (a model validator) names them in its message
            message = "--" + "-".join(str(p) for p in error["loc"]).replace("_", "-") + ": " + message
        print(f"error: {message}", file=sys.stderr)


def missing_base_folder(settings: ServeSettings) -> str | None:
    """Why a base model named by a path cannot be served, found before the engine starts (a hub id is
    checked as it loads: a failure then stops the server with exit code 3)."""
    from tuneserve.hub import is_hub_id

    base = Path(settings.base_model).expanduser()
    if is_hub_id(settings.base_model) or base.is_dir():
        return None
    return f"no folder {base}; give a local model folder or a hub id (org/name)"


if __name__ == "__main__":
    raise SystemExit(main())
