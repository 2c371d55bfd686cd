"""`manage.py demo` stopped with SIGTERM stops every child (server, ingest worker, relay, edge clients) as Ctrl-C
does: none is left running afterwards."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from django.conf import settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
# The demo has started its control plane and its first devices once it prints this.
CLIENTS_STARTED = "edge clients (`fednested tier2 run-client`)"


def test_sigterm_stops_the_demo_and_every_process_it_started(tmp_path: Path) -> None:
    demo = subprocess.Popen(
        [
            sys.executable,
            str(Path(settings.BASE_DIR) / "manage.py"),
            "demo",
            "--port",
            "0",
            "--pretrain-steps",
            "2",
            "--edge-steps",
            "2",
            "--dir",
            str(tmp_path / "demo"),
        ],
        cwd=settings.BASE_DIR,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    children: list[psutil.Process] = []
    output: list[str] = []
    try:
        assert demo.stdout is not None
        deadline = time.monotonic() + 400
        for line in demo.stdout:
            output.append(line)
            if CLIENTS_STARTED in line or time.monotonic() > deadline:
                break
        assert any(CLIENTS_STARTED in line for line in output), "".join(output)[-3000:]
        # Every child runs in a session of its own, so a signal to the demo's group would not reach them: only the
        # demo's own handling can stop them.
        children = psutil.Process(demo.pid).children(recursive=True)
        names = " ".join(" ".join(child.cmdline()) for child in children)
        for part in ("runserver", "workers.ingest", "workers.relay", "workers.telemetry", "run-client"):
            assert part in names, names
        started = time.monotonic()
        demo.send_signal(signal.SIGTERM)
        rest, _ = demo.communicate(timeout=120)
        output.append(rest)
        stopped_in = time.monotonic() - started
        assert "Interrupted: stopping" in rest, "".join(output)[-3000:]
        _, alive = psutil.wait_procs(children, timeout=10)
        assert alive == [], f"still running after SIGTERM: {[child.cmdline() for child in alive]}"
        assert stopped_in < 120
    finally:
        # Whatever the outcome, the test leaves nothing running behind it.
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        if demo.poll() is None:
            demo.kill()
            demo.wait()
