"""Child processes of the demo (HTTP server, ingest worker, edge devices): started with their own log file,
watched, and stopped again whatever happens."""

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


class DemoError(RuntimeError):
    """The demo cannot go on; the message says which step failed and where its log is."""


@dataclass
class ManagedProcess:
    """A child process whose output goes to `log_path`."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return "(no log written)"
        return "\n".join(text.splitlines()[-lines:])

    def failure(self, what: str) -> DemoError:
        return DemoError(
            f"{self.name} {what} (exit status {self.popen.poll()}); see {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGINT first (clients finish their step and close the bus cleanly), then SIGTERM, then SIGKILL."""
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            if not self.running:
                return
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                continue


def start_process(
    name: str, argv: Sequence[str], *, env: Mapping[str, str], log_path: Path, cwd: Path
) -> ManagedProcess:
    """Start `argv` in its own process group (so stopping it also stops anything it starts), logging to a file."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return ManagedProcess(name=name, popen=popen, log_path=log_path)


def free_port(preferred: int) -> int:
    """`preferred` if nothing listens on it on 127.0.0.1, else a free port the kernel picks."""
    for candidate in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            port: int = probe.getsockname()[1]
            return port
    raise DemoError("no free TCP port on 127.0.0.1")


def wait_for_http(url: str, process: ManagedProcess, *, timeout_s: float) -> None:
    """Wait until `url` answers (any HTTP status), failing early with the log tail if the process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not process.running:
            raise process.failure("exited before it answered")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answered, if only to say no
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.3)
    raise process.failure(f"did not answer {url} within {timeout_s:.0f} s")
