"""`manage.py demo --no-serve` from start to finish, with the smallest training budgets: the real control plane,
ingest worker and edge-client subprocesses on SQLite and the embedded bus, whatever services the caller's
environment points at."""

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_demo_applies_a_stale_update_and_moves_every_device(tmp_path: Path) -> None:
    demo_dir = tmp_path / "demo"
    (demo_dir / "stale").mkdir(parents=True)  # the demo starts clean
    env = {**os.environ, "DATABASE_URL": "postgres://nobody@127.0.0.1:1/unused"}  # must be ignored by the demo
    completed = subprocess.run(
        [
            sys.executable,
            str(Path(settings.BASE_DIR) / "manage.py"),
            "demo",
            "--no-serve",
            "--port",
            "0",
            "--pretrain-steps",
            "2",
            "--edge-steps",
            "2",
            "--step-timeout",
            "400",
            # With two steps per device nothing moves far; a loose gate keeps this run's path (both candidates
            # promoted) the same on every machine. A held candidate's summary: test_demo_parts.
            "--gate-max-increase",
            "1",
            "--dir",
            str(demo_dir),
        ],
        cwd=settings.BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=850,
        check=False,
    )
    output = completed.stdout
    assert completed.returncode == 0, f"{output}\n{completed.stderr[-3000:]}"
    assert not (demo_dir / "stale").exists()
    for line in (
        "olivia approved it: it is the champion",
        "Window demo: the aggregation worker applied",
        "to the champion v1: demo-candidate",
        "Window demo.2: the aggregation worker applied",
        "to the champion demo-candidate: demo.2-candidate",
        "olivia approved demo.2-candidate (within the promotion gate); champion moved, devices told",
        "it ships fisher.safetensors: the diagonal Fisher of its expert weights on code, telemetry",
        "its config asks the devices for EWC",
        "all 3 devices report demo.2-candidate as their current version",
        "Stale updates applied with their staleness weight: ",
        "governance officer  olivia / ",
        "Data engine consuming telemetry.edge and tasks.training",
        "Data engine stored ",
    ):
        assert line in output, line
    gate = output.split("Promotion gate (untrained domains telemetry, code may get at most 1.0 nats worse")[1]
    assert "demo-candidate    passed: promoted" in gate
    assert "demo.2-candidate  passed: promoted" in gate
    table = output.split("Per-domain held-out loss of each version")[1]
    header = next(line for line in table.splitlines() if line.startswith("domain"))
    assert header.split() == ["domain", "v1", "demo-candidate", "demo.2-candidate"]
    with sqlite3.connect(demo_dir / "db.sqlite3") as database:
        applied = database.execute(
            "select v.version_id, u.staleness, count(*) from federation_update u "
            "join registry_modelversion v on v.id = u.applied_in_id group by 1, 2 order by 1, 2"
        ).fetchall()
        decisions = database.execute("select decision, count(*) from governance_approvaldecision group by 1").fetchall()
        devices = database.execute(
            "select count(*) from federation_edgedevice d join registry_modelversion v on v.id = d.current_version_id "
            "where v.version_id = 'demo.2-candidate'"
        ).fetchone()
        lost = database.execute("select count(*) from federation_update where status = 'rejected'").fetchone()
        signals = database.execute(
            "select count(distinct report_sha256), count(distinct client_id), min(tokens) from dataengine_devicesignal"
        ).fetchone()
        refused = database.execute("select count(*) from dataengine_telemetryrejection").fetchone()
    # K = 2: two fresh updates make the first candidate; the late update on v1 (τ = 1 by then) and a fresh one on
    # demo-candidate make the second.
    assert applied == [("demo-candidate", 0, 2), ("demo.2-candidate", 0, 1), ("demo.2-candidate", 1, 1)]
    assert lost == (0,)
    assert decisions == [("approved", 3)]  # v1 and both candidates, each by the officer
    assert devices == (3,)
    # Every run trained with the round's EWC against its version's Fisher (the devices' own audit logs say so).
    finished = [
        json.loads(line)["details"]
        for log in sorted((demo_dir / "devices").glob("*/state/audit/audit.jsonl"))
        for line in log.read_text().splitlines()
        if '"training.finished"' in line
    ]
    assert len(finished) == 5
    # The data engine stored each run's telemetry report (per-domain signals) from all three devices; none refused.
    assert signals[:2] == (5, 3)
    assert signals[2] > 0
    assert refused == (0,)
    assert all(entry["ewc_penalty"] is not None for entry in finished)
