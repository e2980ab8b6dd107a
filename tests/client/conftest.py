"""Fixtures of the client's tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from client.__main__ import main as client_main


@pytest.fixture
def usage_error(capsys: pytest.CaptureFixture[str]) -> Callable[[list[str]], str]:
    """Runs `python -m client ARGV`, which must end as a usage error (exit 2); gives its stderr."""

    def run(argv: list[str]) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            client_main(argv)
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    return run
