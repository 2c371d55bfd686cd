"""The data engine's worker on the real Kafka and PostgreSQL: telemetry in → signals stored → a rising-loss rule
fires → a trigger with its evidence → its TrainingTask event on tasks.training (through the outbox relay) → the
task row; bad records around the valid ones (malformed JSON, an unknown schema version, oversized, NaN, an unknown
device) are refused and recorded while the valid ones are stored; the API lists it all; SIGTERM stops the process."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from apps.accounts.choices import Role
from apps.dataengine.choices import TriggerStatus
from apps.dataengine.models import DataEngineTrigger, DeviceSignal, TelemetryRejection
from apps.dataengine.services import save_rule
from apps.federation.choices import TaskKind, TaskStatus
from apps.federation.events import bus_settings
from apps.federation.models import TrainingTask
from apps.outbox.handlers import Delivery
from apps.outbox.models import OutboxEvent
from fednested.messaging import KafkaBusSettings, TelemetryV2, Topic, bootstrap_topics, encode, make_bus
from tests.conftest import _client, make_device, make_user
from workers.relay.relay import relay_batch
from workers.telemetry.consumer import run_telemetry

pytestmark = [pytest.mark.kafka, pytest.mark.services, pytest.mark.timeout(180)]
REPO = Path(__file__).resolve().parents[2]
START = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def kafka_servers() -> str:
    servers = os.environ.get("FEDNESTED_KAFKA_BOOTSTRAP", "")
    if not servers:
        if os.environ.get("FEDNESTED_REQUIRE_SERVICES") == "1":
            pytest.fail("FEDNESTED_REQUIRE_SERVICES=1 but FEDNESTED_KAFKA_BOOTSTRAP is not set: Kafka is not running")
        pytest.skip("Kafka not running: `scripts/services.sh start && source var/services/env.sh`")
    return servers


@pytest.fixture
def kafka(settings: Any) -> Iterator[KafkaBusSettings]:
    """The control plane's bus on the real Kafka, under topics of this test's own."""
    settings.FEDNESTED_BUS = "kafka"
    settings.FEDNESTED_KAFKA_BOOTSTRAP = kafka_servers()
    settings.FEDNESTED_TOPIC_PREFIX = f"dataengine-{uuid.uuid4().hex[:8]}."
    bus = bus_settings()
    assert isinstance(bus, KafkaBusSettings)
    bootstrap_topics(bus)
    yield bus
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bus.bootstrap_servers})
    for future in admin.delete_topics([bus.topics.physical_name(topic) for topic in Topic]).values():
        future.result(timeout=30)


def telemetry(client_id: str, loss: float, minute: int) -> TelemetryV2:
    return TelemetryV2.model_validate(
        {
            "client_id": client_id,
            "base_version": "tiny-moe-v1",
            "loss": loss,
            "steps": 8,
            "tokens": 256,
            "duration_s": 2.0,
            "outcome": "succeeded",
            "started_at": START + timedelta(minutes=minute),
            "finished_at": START + timedelta(minutes=minute, seconds=2),
        }
    )


def produce_raw(bus: KafkaBusSettings, records: list[tuple[str, bytes]]) -> None:
    """Records as a misbehaving device would write them: straight to the topic, past the bus's validation."""
    producer = Producer({"bootstrap.servers": bus.bootstrap_servers})
    for key, value in records:
        producer.produce(bus.topics.physical_name(Topic.TELEMETRY), key=key.encode(), value=value)
    assert producer.flush(30) == 0


def consume(bus: KafkaBusSettings, group: str, expected: int) -> Any:
    with make_bus(bus) as opened, opened.consumer(group, [Topic.TELEMETRY, Topic.TASKS]) as consumer:
        return run_telemetry(consumer, max_messages=expected, idle_exit_s=20, poll_timeout_s=0.5)


@pytest.mark.django_db
def test_telemetry_to_trigger_to_task_with_bad_records_refused_around_the_valid_ones(
    kafka: KafkaBusSettings, settings: Any, artifact_store: Path, version_factory: Any, family_factory: Any
) -> None:
    settings.FEDNESTED_JOBS_IN_PROCESS = False  # the evaluation's outbox row is enough: no worker runs it here
    engineer, token = make_user("eve-engineer", Role.ENGINEER)
    make_device(engineer, "car-1", domain="medical")
    version_factory(family_factory(), "tiny-moe-v1")
    (artifact_store / "heldout").mkdir()
    (artifact_store / "heldout" / "medical.jsonl").write_text('{"text": "held out"}\n')
    save_rule(
        actor=engineer,
        name="medical-loss-rising",
        kind="rising_loss",
        params={"window": 4, "min_rise": 0.3},
        task_kind=TaskKind.EVALUATION,
        task_params={"version_id": "tiny-moe-v1"},
        cooldown_s=3600,
    )
    valid = [telemetry("car-1", loss, minute) for minute, loss in enumerate([1.0, 1.1, 1.5, 1.6])]
    nan = encode(valid[0]).replace(b'"loss":1.0', b'"loss":NaN').replace(b'"tokens":256', b'"tokens":257')
    v99 = encode(valid[0]).replace(b'"schema_version":2', b'"schema_version":99')
    oversized = json.dumps({**json.loads(encode(valid[0])), "pad": "x" * 20_000}).encode()
    records = [
        ("car-1", encode(valid[0])),
        ("car-1", b'{"schema": "Telemetry", "schema_version": 2, '),
        ("car-1", encode(valid[1])),
        ("car-1", v99),
        ("car-1", oversized),
        ("car-1", encode(valid[2])),
        ("car-1", nan),
        ("car-unknown", encode(telemetry("car-unknown", 0.5, 0))),
        ("car-1", encode(valid[3])),
    ]
    produce_raw(kafka, records)
    group = f"dataengine-test-{uuid.uuid4().hex[:8]}"
    stats = consume(kafka, group, expected=len(records))
    assert stats.by_status == {"stored": 4, "refused": 5}
    assert list(DeviceSignal.objects.order_by("reported_at").values_list("loss", flat=True)) == [1.0, 1.1, 1.5, 1.6]
    reasons = list(TelemetryRejection.objects.order_by("id").values_list("reason", flat=True))
    assert len(reasons) == 5
    assert any(reason.startswith("malformed JSON at line 1") for reason in reasons)
    assert any("unknown version 99 of schema 'Telemetry' (known versions: 1, 2)" in reason for reason in reasons)
    assert any(f"record of {len(oversized)} bytes exceeds FEDNESTED_TELEMETRY_MAX_BYTES" in r for r in reasons)
    assert any("field 'loss'" in reason and "finite" in reason for reason in reasons)
    assert "unknown device 'car-unknown': not enrolled" in reasons

    trigger = DataEngineTrigger.objects.get()
    assert (trigger.domain, trigger.status, trigger.evidence["rise"]) == ("medical", TriggerStatus.PUBLISHED, 0.5)
    assert [signal["loss"] for signal in trigger.evidence["signals"]] == [1.0, 1.1, 1.5, 1.6]

    # The relay puts the trigger's TrainingTask event on tasks.training; the same worker turns it into the task.
    with Delivery() as delivery:
        assert relay_batch(delivery).errors == []
    assert OutboxEvent.objects.get(topic=Topic.TASKS.value, key=trigger.task_id).sent_at is not None
    stats = consume(kafka, group, expected=1)
    assert stats.by_status == {"task_created": 1}
    trigger.refresh_from_db()
    task = TrainingTask.objects.get()
    assert (trigger.status, trigger.training_task, task.kind, task.status, task.params) == (
        TriggerStatus.TASK_CREATED,
        task,
        TaskKind.EVALUATION,
        TaskStatus.PENDING,
        {"version_id": "tiny-moe-v1"},
    )

    # The API shows the signals, the trigger with its evidence, and the rule.
    client = _client(token)
    signals = client.get("/api/v1/data-engine/signals/", {"domain": "medical"}).json()
    assert signals["count"] == 4
    [listed] = client.get("/api/v1/data-engine/triggers/").json()["results"]
    assert (listed["rule"], listed["status"], listed["training_task"]) == (
        "medical-loss-rising",
        "task_created",
        task.pk,
    )
    assert listed["evidence"]["rise"] == 0.5
    page = client.get("/data-engine/")
    assert page.status_code == 302  # the console signs in by session, not by token


@pytest.mark.slow
def test_sigterm_stops_the_worker_cleanly(kafka: KafkaBusSettings) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "FEDNESTED_BUS": "kafka",
        "FEDNESTED_KAFKA_BOOTSTRAP": kafka.bootstrap_servers,
        "FEDNESTED_TOPIC_PREFIX": kafka.topics.prefix,
    }
    argv = [sys.executable, "-m", "workers.telemetry", "--group", f"sigterm-{uuid.uuid4().hex[:8]}"]
    process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        assert process.stderr is not None
        started = ""
        while time.monotonic() < deadline and "data engine consuming" not in started:
            started += process.stderr.readline()
            assert process.poll() is None, started[-2000:]
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr[-2000:]
    assert "data engine: 0 messages in 0 batches" in stdout
