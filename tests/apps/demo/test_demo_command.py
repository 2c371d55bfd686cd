"""`manage.py demo --no-serve` from start to finish, with the smallest training budgets: the real control plane,
ingest worker and edge-client subprocesses on SQLite and the embedded bus, whatever services the caller's
environment points at."""

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_demo_runs_two_rounds_and_moves_every_device(tmp_path: Path) -> None:
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
        "Round 1: the aggregation worker built round-1-candidate from 3 updates",
        "Round 2: olivia approved round-2-candidate; champion moved, devices told",
        "all 3 devices report round-2-candidate as their current version",
        "governance officer  olivia / ",
    ):
        assert line in output, line
    table = output.split("Per-domain held-out loss of each version")[1]
    header = next(line for line in table.splitlines() if line.startswith("domain"))
    assert header.split() == ["domain", "v1", "round-1-candidate", "round-2-candidate"]
    with sqlite3.connect(demo_dir / "db.sqlite3") as database:
        applied = database.execute("select count(*) from federation_update where status = 'applied'").fetchone()
        decisions = database.execute("select decision, count(*) from governance_approvaldecision group by 1").fetchall()
        devices = database.execute(
            "select count(*) from federation_edgedevice d join registry_modelversion v on v.id = d.current_version_id "
            "where v.version_id = 'round-2-candidate'"
        ).fetchone()
    assert applied == (6,)  # three devices × two rounds, nothing lost
    assert decisions == [("approved", 3)]  # v1 and both candidates, each by the officer
    assert devices == (3,)
