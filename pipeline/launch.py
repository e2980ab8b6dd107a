"""A server in a child process: started, waited for (GET /health == 200), stopped; its log kept in a file.

The one launcher of the pipeline (our server), the benchmarks (our server and vLLM's own) and the tests.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    name: str
    command: list[str]
    url: str
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    startup_s: float = 0.0
    cwd: Path | None = None
    env: dict[str, str] = field(default_factory=dict)  # added to this process's environment
    launched_at: float = 0.0  # time.monotonic() at launch
    startup_statuses: list[int] = field(default_factory=list)  # /health answers seen before ready

    def start(self, timeout: float = 600) -> None:
        """Start the server and wait until GET /health answers 200 (raises with the log's tail if not)."""
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the process, its output to the log file; `wait_ready` waits for it."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting %s: %s", self.name, shlex.join(self.command))
        self.launched_at = time.monotonic()
        with self.log_path.open("wb") as handle:
            self.process = subprocess.Popen(
                self.command, cwd=self.cwd, stdout=handle, stderr=subprocess.STDOUT, env=os.environ | self.env
            )

    def wait_ready(self, timeout: float = 600) -> None:
        """Wait until GET /health answers 200; raises RuntimeError with the log's tail if the process exits
        or `timeout` seconds pass first."""
        import httpx

        assert self.process is not None, "launch() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.TransportError):
                status = httpx.get(f"{self.url}/health", timeout=2).status_code
                self.startup_statuses.append(status)
                if status == 200:
                    self.startup_s = time.monotonic() - self.launched_at
                    log.info("%s ready after %.0f s", self.name, self.startup_s)
                    return
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, grace_s: float = 30) -> None:
        """SIGINT, then kill after `grace_s` seconds; safe to call twice or before start."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the server's API process has used so far; not its engine-core child."""
        if self.process is None:
            return float("nan")
        return process_cpu_seconds(self.process.pid)

    def tree_cpu_seconds(self) -> float:
        """CPU time the server's API process and all its descendants (the engine core) have used so far."""
        if self.process is None:
            return float("nan")
        return sum(process_cpu_seconds(pid) for pid in process_tree(self.process.pid))

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]


def tail_lines(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a child process's log, or "(no log)" when it cannot be read."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of one process from /proc/PID/stat (Linux); NaN where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """pid and its living descendants, from /proc/PID/task/TID/children (Linux); [pid] where unreadable."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                pending += [int(child) for child in children.read_text().split()]
            except OSError:
                continue
    return found


@contextlib.contextmanager
def running(server: ServerProcess) -> Iterator[ServerProcess]:
    try:
        server.start()
        yield server
    finally:
        server.stop()
