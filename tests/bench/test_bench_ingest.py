"""The ingest benchmark runs end to end in a tiny configuration (a few envelopes) against the real services and
writes a report whose figures add up; nothing here asserts a speed."""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kafka, pytest.mark.services, pytest.mark.slow, pytest.mark.timeout(300)]
REPO = Path(__file__).resolve().parents[2]


def test_bench_ingest_tiny_configuration(tmp_path: Path) -> None:
    if not (os.environ.get("FEDNESTED_KAFKA_BOOTSTRAP") and os.environ.get("DATABASE_URL", "").startswith("postgres")):
        if os.environ.get("FEDNESTED_REQUIRE_SERVICES") == "1":
            pytest.fail("FEDNESTED_REQUIRE_SERVICES=1 but Kafka or PostgreSQL is not configured")
        pytest.skip("needs Kafka and PostgreSQL: `scripts/services.sh start && source var/services/env.sh`")
    out = tmp_path / "ingest.json"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        # A database of its own, beside the test session's.
        "FEDNESTED_TEST_DB_NAME": f"test_bench_ingest_{uuid.uuid4().hex[:8]}",
    }
    arguments = ["--envelopes", "12", "--unbatched-envelopes", "3", "--batch-size", "5", "--devices", "4"]
    result = subprocess.run(
        [sys.executable, "-m", "bench.ingest", *arguments, "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    # The first record goes out untimed (it acquires the idempotent producer's id); the other 11 are timed.
    assert report["producer"]["envelopes"] == 11
    batched, single, embedded = report["kafka_batched"], report["kafka_batch_size_1"], report["embedded_batched"]
    assert (batched["envelopes"], batched["batch_size"]) == (12, 5)
    # 12 messages in batches of at most 5: at least three batches.
    assert batched["batches"] >= 3
    assert (single["envelopes"], single["batches"]) == (3, 3)
    assert embedded["envelopes"] == 12
    assert report["envelopes_per_s"] == batched["envelopes_per_s"] > 0
    assert report["ratio_to_producer"] == pytest.approx(
        batched["envelopes_per_s"] / report["producer"]["envelopes_per_s"]
    )
    assert 0 < batched["latency_ms_p50"] <= batched["latency_ms_p99"]
    # Batched, the statements a batch shares are spread over its envelopes: fewer per envelope than one at a time.
    assert batched["sql_statements_per_envelope"] < single["sql_statements_per_envelope"]
