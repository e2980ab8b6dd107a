"""The client versions the compatibility tests ran with, printed at the end of the run (the README's matrix
states them)."""

from __future__ import annotations

import pytest

VERSIONS: dict[str, str] = {}


@pytest.fixture(scope="session")
def client_versions() -> dict[str, str]:
    """Client name -> the version a test drove; filled by the tests."""
    return VERSIONS


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if VERSIONS:
        terminalreporter.write_sep("-", "compatibility: client versions tested")
        for name, version in sorted(VERSIONS.items()):
            terminalreporter.write_line(f"{name} {version}")
