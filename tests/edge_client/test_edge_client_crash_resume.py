"""Crash safety with real processes: the client (`python -m fednested tier2 run-client`) is SIGKILLed after it
spooled its update, first while the control plane answers 503, then after the server stored the payload but
before the client heard back; restarted, it delivers that same update exactly once and loses nothing."""

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from fednested.messaging.topics import Topic

REPO = Path(__file__).resolve().parents[2]


def _start(config: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "fednested", "tier2", "run-client", "--config", str(config), *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL


def _spooled(state: Path, sub: str) -> list[tuple[str, str]]:
    """(kind, item id) of the spool items under pending/ or done/, in queue order."""
    directory = state / "spool" / sub
    items = [json.loads((entry / "item.json").read_text()) for entry in sorted(directory.iterdir())]
    return [(item["kind"], item["item_id"]) for item in items]


@pytest.mark.slow
def test_killed_client_resumes_its_spooled_update_and_it_arrives_exactly_once(
    tmp_path: Path, control_plane: Any, kit: Any, embedded_bus: Any
) -> None:
    control_plane.add_version(kit.assets.v1)
    control_plane.champion = "v1"
    files = kit.write_files(tmp_path / "device", control_plane, embedded_bus)
    state = files["state"]

    # 1. Uploads fail (503): the client trains, spools, and sits in backoff. Kill it there.
    control_plane.unavailable.add("payload")
    first = _start(files["config"], "--rounds", "1", "--max-wait-s", "300")
    kit.wait_until(
        lambda: any(r.method == "PUT" for r in control_plane.requests) or first.poll() is not None,
        timeout_s=240,
        what="the first upload attempt",
    )
    assert first.poll() is None, first.communicate()
    _kill(first)
    spooled = _spooled(state, "pending")
    assert [kind for kind, _ in spooled] == ["update", "telemetry"]
    update_id = spooled[0][1]
    assert control_plane.payloads == {}
    assert kit.drain(embedded_bus, Topic.UPDATES, quiet_s=0.3) == []

    # 2. The server stores the payload but the client dies before the answer reaches it.
    control_plane.unavailable.clear()
    control_plane.hold_puts = threading.Event()
    second = _start(files["config"], "--rounds", "1", "--max-wait-s", "300")
    assert control_plane.payload_stored.wait(timeout=240), second.communicate()
    _kill(second)
    control_plane.hold_puts.set()
    control_plane.hold_puts = None
    assert list(control_plane.payloads) == [update_id]
    assert _spooled(state, "pending") == spooled
    assert kit.drain(embedded_bus, Topic.UPDATES, quiet_s=0.3) == []

    # 3. A clean restart: the same update (same id) is re-uploaded idempotently and published once.
    third = _start(files["config"], "--rounds", "1", "--max-wait-s", "300", "--json")
    out, err = third.communicate(timeout=300)
    assert third.returncode == 0, err
    report = json.loads(out)
    assert report["updates_delivered"] == [update_id]
    assert report["trained_on"] == []  # nothing was trained twice
    assert report["pending"] == 0

    updates = kit.drain(embedded_bus, Topic.UPDATES)
    assert [str(message.event.update_id) for message in updates] == [update_id]
    assert len(kit.drain(embedded_bus, Topic.TELEMETRY)) == 1
    puts = [r for r in control_plane.requests if r.method == "PUT" and update_id in r.path]
    assert len(puts) >= 3  # 503s, the stored-but-unanswered one, and the idempotent retry
    assert len({r.body for r in puts}) == 1  # the same bytes every time
    assert _spooled(state, "pending") == []
    assert _spooled(state, "done") == spooled
    # Two kills left the audit log verifiable (a torn tail would have been cut and recorded).
    check = subprocess.run(
        [sys.executable, "-m", "fednested", "tier2", "verify-audit", str(state / "audit" / "audit.jsonl")],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stderr
    assert "chain intact" in check.stdout
