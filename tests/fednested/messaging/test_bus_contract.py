"""Contract every bus implementation passes, run against the embedded SQLite bus and a real Kafka broker.

The Kafka cases need FEDNESTED_KAFKA_BOOTSTRAP (scripts/services.sh start); with FEDNESTED_REQUIRE_SERVICES=1 a
missing broker fails them instead of skipping.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fednested.messaging import (
    AdapterSummary,
    Bus,
    Consumer,
    EmbeddedBusSettings,
    KafkaBusSettings,
    Message,
    ModelAvailable,
    PayloadRef,
    RoundStart,
    SchemaError,
    Telemetry,
    Topic,
    TopicError,
    TopicsConfig,
    TopicSettings,
    TrainingTask,
    UpdateEnvelope,
    bootstrap_topics,
    encode,
    make_bus,
)
from fednested.messaging.embedded import write_raw_record

REPO_ROOT = Path(__file__).resolve().parents[3]
CHILD = Path(__file__).with_name("bus_consumer_child.py")
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
# The broker's minimum (group.min.session.timeout.ms): a killed Kafka consumer's partitions move after this long.
KAFKA_SESSION_TIMEOUT_MS = 6000

BusSettings = KafkaBusSettings | EmbeddedBusSettings
RawInjector = Callable[[Topic, str, bytes], None]


@pytest.fixture(params=["embedded", pytest.param("kafka", marks=pytest.mark.kafka)])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BusSettings]:
    """Bus settings with topics no other test uses, bootstrapped; Kafka's topics are deleted afterwards."""
    topics = TopicsConfig(prefix=f"contract-{uuid.uuid4().hex[:10]}.")
    if request.param == "embedded":
        embedded = EmbeddedBusSettings(path=tmp_path / "bus.sqlite3", topics=topics, poll_interval_s=0.01)
        assert [outcome.created for outcome in bootstrap_topics(embedded).topics] == [True] * 4
        yield embedded
        return
    servers = request.getfixturevalue("kafka_bootstrap_servers")
    kafka = KafkaBusSettings(bootstrap_servers=servers, session_timeout_ms=KAFKA_SESSION_TIMEOUT_MS, topics=topics)
    assert [outcome.created for outcome in bootstrap_topics(kafka).topics] == [True] * 4
    yield kafka
    from confluent_kafka.admin import AdminClient

    names = [topics.physical_name(topic) for topic in Topic]
    admin = AdminClient({"bootstrap.servers": servers})  # kept alive until the deletions are confirmed
    for future in admin.delete_topics(names).values():
        future.result(timeout=30)


@pytest.fixture
def bus(settings: BusSettings) -> Iterator[Bus]:
    with make_bus(settings) as opened:
        yield opened


@pytest.fixture
def inject_raw(settings: BusSettings) -> Iterator[RawInjector]:
    """Writes bytes to a topic past all validation, as a buggy or hostile producer would."""
    if isinstance(settings, EmbeddedBusSettings):
        yield lambda topic, key, raw: write_raw_record(settings.path, settings.topics.physical_name(topic), key, raw)
        return
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": settings.bootstrap_servers})

    def produce(topic: Topic, key: str, raw: bytes) -> None:
        producer.produce(settings.topics.physical_name(topic), value=raw, key=key.encode())
        assert producer.flush(10) == 0

    yield produce
    producer.flush(10)


def envelope(client_id: str, sequence: int) -> UpdateEnvelope:
    """An update envelope whose `examples` field carries a sequence number, to check order on the consumer side."""
    return UpdateEnvelope(
        update_id=uuid.uuid4(),
        client_id=client_id,
        base_version="v7",
        examples=sequence,
        routed_tokens={"0.1": 100 + sequence},
        metrics={"loss": 2.5},
        payload=PayloadRef(uri=f"s3://deltas/{client_id}/{sequence}.safetensors", sha256="ab" * 32, size_bytes=4096),
        adapter=AdapterSummary(rank=8, alpha=16.0, target_modules=["w1", "w2"]),
        created_at=NOW,
    )


def poll_all(consumer: Consumer, count: int, *, timeout_s: float = 30.0, commit: bool = True) -> list[Message]:
    """Poll until `count` messages arrived (committing each) or the timeout passes."""
    received: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while len(received) < count and time.monotonic() < deadline:
        message = consumer.poll(0.2)
        if message is not None:
            received.append(message)
            if commit:
                consumer.commit(message)
    return received


def test_every_schema_round_trips_through_its_topic(bus: Bus) -> None:
    events = [
        (
            Topic.CONTROL_ROUNDS,
            ModelAvailable(
                version_id="v8", alias="champion", manifest_sha256="cd" * 32, artifact_uri="s3://m/v8", published_at=NOW
            ),
        ),
        (
            Topic.CONTROL_ROUNDS,
            RoundStart(
                round_id="r-9",
                base_version="v8",
                deadline=NOW + timedelta(hours=1),
                config={"local_steps": 20, "experts": ["0.1", "1.3"]},
                started_at=NOW,
            ),
        ),
        (Topic.UPDATES, envelope("edge-1", 1)),
        (
            Topic.TELEMETRY,
            Telemetry(
                client_id="edge-1",
                loss=1.75,
                steps=20,
                duration_s=12.5,
                outcome="succeeded",
                dp_noised=True,
                started_at=NOW,
                finished_at=NOW + timedelta(seconds=12.5),
            ),
        ),
        (Topic.TASKS, TrainingTask(task_id="task-1", kind="expert_aggregation", params={"k": 4}, created_at=NOW)),
    ]
    for topic, event in events:
        bus.publish(topic, event)
    with bus.consumer("round-trip", list(Topic)) as consumer:
        received = poll_all(consumer, len(events))
    assert len(received) == len(events)
    assert all(message.valid and message.error is None for message in received)
    assert sorted((m.topic.value, encode(m.event)) for m in received if m.event) == sorted(
        (topic.value, encode(event)) for topic, event in events
    )
    control = [m.event for m in received if m.topic is Topic.CONTROL_ROUNDS]
    assert [type(event) for event in control] == [ModelAvailable, RoundStart]  # one partition: total order
    assert {m.key for m in received if m.topic is Topic.UPDATES} == {"edge-1"}


def test_events_of_one_key_arrive_in_publish_order(bus: Bus) -> None:
    clients = ["edge-a", "edge-b", "edge-c", "edge-d"]
    for sequence in range(10):
        for client in clients:
            bus.publish(Topic.UPDATES, envelope(client, sequence))
    with bus.consumer("ordering", [Topic.UPDATES]) as consumer:
        received = poll_all(consumer, 40)
    assert len(received) == 40
    for client in clients:
        mine = [m for m in received if m.key == client]
        assert [m.event.examples for m in mine if isinstance(m.event, UpdateEnvelope)] == list(range(10))
        assert len({m.partition for m in mine}) == 1
        assert [m.offset for m in mine] == sorted(m.offset for m in mine)


def test_message_polled_but_not_committed_is_redelivered_after_the_consumer_process_is_killed(
    bus: Bus, settings: BusSettings
) -> None:
    sent = [envelope("edge-crash", sequence) for sequence in range(3)]
    for event in sent:
        bus.publish(Topic.UPDATES, event)
    child = subprocess.Popen(
        [sys.executable, str(CHILD), settings.model_dump_json(), "crashers", Topic.UPDATES.value],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        assert child.stdout is not None
        committed_line = child.stdout.readline().split()
        polled_line = child.stdout.readline().split()
        assert committed_line[:1] == ["COMMITTED"], committed_line
        assert polled_line[:1] == ["POLLED"], polled_line
    finally:
        # SIGKILL: no close(), no leave-group, no last commit, exactly as a crash.
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL
    committed_offset, polled_offset = int(committed_line[2]), int(polled_line[2])

    with bus.consumer("crashers", [Topic.UPDATES]) as successor:
        redelivered = poll_all(successor, 2, timeout_s=KAFKA_SESSION_TIMEOUT_MS / 1000 + 20)
    assert [m.offset for m in redelivered] == [polled_offset, polled_offset + 1]
    assert committed_offset not in [m.offset for m in redelivered]
    assert [m.event for m in redelivered] == sent[1:]


def wait_for_split(consumers: list[Consumer], partitions: int, timeout_s: float = 30.0) -> list[set[tuple[Topic, int]]]:
    """Poll every consumer until their assignments are disjoint, non-empty and cover all partitions."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for consumer in consumers:
            assert consumer.poll(0.1) is None  # nothing is published yet
        assignments = [set(consumer.assignment()) for consumer in consumers]
        union = set().union(*assignments)
        if all(assignments) and sum(map(len, assignments)) == len(union) == partitions:
            return assignments
    pytest.fail(f"no stable split of {partitions} partitions within {timeout_s}s: {assignments}")


def test_members_of_a_group_share_partitions_and_another_group_gets_everything(bus: Bus) -> None:
    first, second = bus.consumer("aggregators", [Topic.UPDATES]), bus.consumer("aggregators", [Topic.UPDATES])
    try:
        assignments = wait_for_split([first, second], partitions=6)
        sent = {}
        for index in range(24):
            event = envelope(f"edge-{index % 12:02d}", index)
            bus.publish(Topic.UPDATES, event)
            sent[event.update_id] = event
        received: dict[int, list[Message]] = {0: [], 1: []}
        deadline = time.monotonic() + 30
        while sum(map(len, received.values())) < len(sent) and time.monotonic() < deadline:
            for index, consumer in enumerate((first, second)):
                message = consumer.poll(0.05)
                if message is not None:
                    received[index].append(message)
                    consumer.commit(message)
        for index in (0, 1):  # drain: anything beyond the 24 would be a duplicate
            message = (first, second)[index].poll(0.5)
            assert message is None, f"duplicate delivery {message}"
    finally:
        first.close()
        second.close()
    ids = [m.event.update_id for ms in received.values() for m in ms if isinstance(m.event, UpdateEnvelope)]
    assert sorted(ids) == sorted(sent)  # each message consumed by exactly one member
    assert received[0]
    assert received[1]
    for index, messages in received.items():
        assert {(m.topic, m.partition) for m in messages} <= assignments[index]

    with bus.consumer("auditors", [Topic.UPDATES]) as other_group:
        everything = poll_all(other_group, len(sent))
    assert sorted(m.event.update_id for m in everything if isinstance(m.event, UpdateEnvelope)) == sorted(sent)


def test_publish_validates_before_anything_is_written(bus: Bus) -> None:
    invalid = UpdateEnvelope.model_construct(**{**envelope("edge-1", 0).__dict__, "examples": -5})
    with pytest.raises(SchemaError, match="field 'examples': Input should be greater than or equal to 0"):
        bus.publish(Topic.UPDATES, invalid)
    with pytest.raises(TopicError, match=re.escape("updates.experts.local does not carry Telemetry")):
        bus.publish(
            Topic.UPDATES,
            Telemetry(
                client_id="edge-1",
                loss=None,
                steps=0,
                duration_s=0.0,
                outcome="failed",
                started_at=NOW,
                finished_at=NOW,
            ),
        )
    with pytest.raises(
        TopicError, match=re.escape("key 'edge-2' for UpdateEnvelope on updates.experts.local must be the client id")
    ):
        bus.publish(Topic.UPDATES, envelope("edge-1", 1), key="edge-2")
    with pytest.raises(TopicError, match=re.escape("unknown topic 'updates.experts'")):
        bus.publish("updates.experts", envelope("edge-1", 1))
    sentinel = envelope("edge-1", 2)
    bus.publish(Topic.UPDATES, sentinel)
    with bus.consumer("validation", [Topic.UPDATES]) as consumer:
        assert [m.event for m in poll_all(consumer, 1)] == [sentinel]
        assert consumer.poll(0.5) is None


def test_invalid_payloads_are_handed_back_recorded_and_skipped(bus: Bus, inject_raw: RawInjector) -> None:
    good = json.loads(encode(envelope("edge-1", 0)))
    missing_payload = {key: value for key, value in good.items() if key != "payload"}
    inject_raw(Topic.UPDATES, "edge-1", b'{"schema": "UpdateEnvelope", oops}')
    inject_raw(Topic.UPDATES, "edge-1", json.dumps({**good, "schema_version": 99}).encode())
    inject_raw(Topic.UPDATES, "edge-1", json.dumps(missing_payload).encode())
    inject_raw(Topic.UPDATES, "edge-1", encode(envelope("edge-2", 0)))  # valid event, someone else's key
    valid = envelope("edge-1", 5)
    bus.publish(Topic.UPDATES, valid)

    rejections: list[tuple[str, str, bytes]] = []
    accepted = []
    with bus.consumer("ingest", [Topic.UPDATES]) as consumer:
        for message in poll_all(consumer, 5):
            if message.error is not None:
                rejections.append((message.where(), str(message.error), message.raw))
            else:
                accepted.append(message.event)
    assert accepted == [valid]
    reasons = [reason for _, reason, _ in rejections]
    assert reasons[0].startswith("malformed JSON at line 1 column 30 (char 29)")
    assert reasons[1] == "unknown version 99 of schema 'UpdateEnvelope' (known versions: 1)"
    assert reasons[2] == "invalid UpdateEnvelope v1: field 'payload': required field is missing"
    assert "key 'edge-1' for UpdateEnvelope on updates.experts.local must be the client id: 'edge-2'" in reasons[3]
    assert rejections[0][2] == b'{"schema": "UpdateEnvelope", oops}'
    assert [where.split("@")[1] for where, _, _ in rejections] == ["0", "1", "2", "3"]

    # Every rejection was committed past: the group resumes after the valid message, not at the bad ones.
    after = envelope("edge-1", 6)
    bus.publish(Topic.UPDATES, after)
    with bus.consumer("ingest", [Topic.UPDATES]) as resumed:
        assert [m.event for m in poll_all(resumed, 1)] == [after]


def test_bootstrap_is_idempotent_and_aligns_changed_topics(settings: BusSettings) -> None:
    again = bootstrap_topics(settings)
    assert not again.changed
    assert again.lines()[-1].startswith("nothing to change on ")

    topics = settings.topics.model_copy(
        update={
            "updates": TopicSettings(partitions=8, retention_ms=7 * 86_400_000),
            "telemetry": TopicSettings(partitions=3, retention_ms=86_400_000),
            "tasks": TopicSettings(partitions=1, retention_ms=7 * 86_400_000),
        }
    )
    changed = settings.model_copy(update={"topics": topics})
    report = bootstrap_topics(changed)
    prefix = settings.topics.prefix
    assert report.changed
    assert f"altered {prefix}updates.experts.local: partitions 6 → 8 (keys map anew from here on)" in report.lines()
    assert f"altered {prefix}telemetry.edge: retention 3d → 1d" in report.lines()
    assert f"warning: {prefix}tasks.training: has 3 partitions, the configuration asks for 1; " in "\n".join(
        report.lines()
    )
    assert f"unchanged {prefix}control.federation_rounds" in report.lines()

    settled = bootstrap_topics(changed)
    assert not settled.changed
    assert [outcome.warnings != () for outcome in settled.topics] == [False, False, False, True]
    with make_bus(changed) as bus:
        bus.publish(Topic.UPDATES, envelope("edge-1", 0))
        with bus.consumer("after-growth", [Topic.UPDATES]) as consumer:
            assert len(poll_all(consumer, 1)) == 1
            assert len([p for t, p in consumer.assignment() if t is Topic.UPDATES]) == 8
