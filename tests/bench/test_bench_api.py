"""The API benchmark's machinery works end to end in a tiny configuration: a fresh database, the deployed server
(gunicorn with two uvicorn workers and a connection pool), a handful of Locust devices for a few seconds; every call
the devices make succeeds and the report has the figures the issue asks for. Also: the figures' arithmetic."""

import json
import os
from pathlib import Path

import pytest

from bench.api import BenchSettings, latency_summary, run, summarize


def _record(phase: str, name: str, start_s: float, latency_ms: float, status: int = 200, error: str = "") -> dict:
    return {
        "phase": phase,
        "name": name,
        "start_s": start_s,
        "latency_ms": latency_ms,
        "status": status,
        "error": error,
    }


def test_summary_counts_errors_rates_and_percentiles_per_phase() -> None:
    records = [_record("approval", "enroll", 0.0, 1000.0, 201)]
    records += [_record("steady", "champion", 1.0 + index / 100, float(index + 1), 304) for index in range(100)]
    records.append(_record("steady", "heartbeat", 1.5, 9.0, 0, "ConnectionRefusedError: refused"))
    summary = summarize(records, cpu_s=0.204)
    assert summary["errors"] == 1
    assert summary["cpu_ms_per_request"] == pytest.approx(2.0)
    # 102 requests from t=0 to the last one's end (1.99 s + 100 ms)
    assert summary["requests_per_s"] == pytest.approx(102 / 2.09)
    champion = summary["calls"]["champion"]
    assert champion["p50_ms"] == pytest.approx(50.5)
    assert champion["p99_ms"] == pytest.approx(99.01)
    assert summary["phases"]["approval"]["requests"] == 1
    assert summary["statuses"] == {"201": 1, "304": 100, "0": 1}
    assert summary["error_examples"] == ["ConnectionRefusedError: refused"]
    assert latency_summary([]) == {"requests": 0, "errors": 0}


@pytest.mark.services
@pytest.mark.slow
def test_a_tiny_run_against_the_deployed_server_answers_every_device(tmp_path: Path) -> None:
    if not os.environ.get("DATABASE_URL", "").startswith("postgres"):
        if os.environ.get("FEDNESTED_REQUIRE_SERVICES") == "1":
            pytest.fail("FEDNESTED_REQUIRE_SERVICES=1 but DATABASE_URL names no PostgreSQL: source var/services/env.sh")
        pytest.skip("needs the PostgreSQL of scripts/services.sh (DATABASE_URL)")
    out = tmp_path / "api.json"
    settings = BenchSettings(devices=4, duration_s=4.0, workers=2, pool_size=2, servers=("deployed",))
    report = run(settings, out, database_name=f"{os.environ.get('FEDNESTED_TEST_DB_NAME', 'test_fednested')}_bench_api")
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    deployed = report["configurations"]["deployed"]
    assert report["errors"] == deployed["errors"] == 0, deployed["error_examples"]
    approval = deployed["calls"]
    assert approval["enroll"]["requests"] == approval["manifest"]["requests"] == 4
    # Each device polled: its first answer is 200 with an ETag, later ones 304 (the champion did not move).
    assert deployed["statuses"].get("304", 0) > 0
    assert deployed["statuses"]["201"] >= 4
    assert report["requests_per_s"] > 0
    assert report["p99_ms"] > 0
    assert deployed["cpu_ms_per_request"] > 0
    assert report["champion_answer_bytes"] > 1000
