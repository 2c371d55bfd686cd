"""The real ingest loop (`run_ingest` on a real bus consumer) fed a few hundred hostile messages interleaved with valid
envelopes: random bytes, truncated and damaged envelopes, wrong schemas and versions, huge numbers, NUL characters,
deep nesting, forged, tampered and unsigned envelopes, unknown senders. The loop never stops; every bad message is
recorded as refused or rejected with a code, every valid one is buffered, and every offset is committed.

On the embedded bus always; on Kafka too when scripts/services.sh runs it.
"""

import dataclasses
import json
import os
import random
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from apps.federation.choices import UpdateStatus
from apps.federation.models import Update
from apps.governance.models import AuditEvent
from fednested.aggregation import RejectionCode
from fednested.messaging import (
    EmbeddedBusSettings,
    KafkaBusSettings,
    Topic,
    TopicsConfig,
    UpdateEnvelope,
    bootstrap_topics,
    encode,
    make_bus,
)
from fednested.messaging.embedded import connect, write_raw_record
from fednested.messaging.schemas import MAX_COUNT
from tests.federation_world import Device, WorkerWorld, enroll, signed_envelope
from workers.ingest.consumer import run_ingest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

GROUP = "ingest-fuzz"
VALID = 30

# (key, bytes) → (partition, offset): writes past every producer-side check, as a buggy or hostile producer would.
RawWriter = Callable[[str, bytes], tuple[int, int]]


@dataclasses.dataclass
class BusUnderTest:
    settings: EmbeddedBusSettings | KafkaBusSettings
    write_raw: RawWriter

    def committed_everything(self) -> bool:
        """Whether the group's committed offset is the end of every partition of the updates topic."""
        name = self.settings.topics.physical_name(Topic.UPDATES)
        if isinstance(self.settings, EmbeddedBusSettings):
            connection = connect(self.settings.path)
            try:
                heads = dict(
                    connection.execute("SELECT partition, next_offset FROM partition_heads WHERE topic = ?", (name,))
                )
                committed = dict(
                    connection.execute(
                        "SELECT partition, next_offset FROM group_offsets WHERE group_id = ? AND topic = ?",
                        (GROUP, name),
                    )
                )
            finally:
                connection.close()
            return all(committed.get(partition, 0) == head for partition, head in heads.items())
        from confluent_kafka import Consumer, TopicPartition

        probe = Consumer({"bootstrap.servers": self.settings.bootstrap_servers, "group.id": GROUP})
        try:
            partitions = self.settings.topics.settings_for(Topic.UPDATES).partitions
            committed = probe.committed([TopicPartition(name, p) for p in range(partitions)], timeout=20)
            ends = [probe.get_watermark_offsets(TopicPartition(name, p), timeout=20)[1] for p in range(partitions)]
        finally:
            probe.close()
        return all(max(tp.offset, 0) == end for tp, end in zip(committed, ends, strict=True))


@pytest.fixture(params=["embedded", pytest.param("kafka", marks=[pytest.mark.kafka, pytest.mark.services])])
def bus_under_test(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[BusUnderTest]:
    topics = TopicsConfig(prefix=f"ingest-fuzz-{uuid.uuid4().hex[:8]}.")
    if request.param == "embedded":
        embedded = EmbeddedBusSettings(path=tmp_path / "bus.sqlite3", topics=topics, poll_interval_s=0.01)
        bootstrap_topics(embedded)
        name = topics.physical_name(Topic.UPDATES)

        def append(key: str, raw: bytes) -> tuple[int, int]:
            return write_raw_record(embedded.path, name, key, raw)

        yield BusUnderTest(embedded, append)
        return
    servers = os.environ.get("FEDNESTED_KAFKA_BOOTSTRAP", "")
    if not servers:
        if os.environ.get("FEDNESTED_REQUIRE_SERVICES") == "1":
            pytest.fail("FEDNESTED_REQUIRE_SERVICES=1 but FEDNESTED_KAFKA_BOOTSTRAP is not set: Kafka is not running")
        pytest.skip("Kafka not running: `scripts/services.sh start && source var/services/env.sh`")
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient

    kafka = KafkaBusSettings(bootstrap_servers=servers, topics=topics)
    bootstrap_topics(kafka)
    producer = Producer({"bootstrap.servers": servers})

    def produce(key: str, raw: bytes) -> tuple[int, int]:
        delivered: list[tuple[int, int]] = []

        def on_delivery(error: Any, message: Any) -> None:
            assert error is None, error
            delivered.append((message.partition(), message.offset()))

        producer.produce(topics.physical_name(Topic.UPDATES), value=raw, key=key.encode(), on_delivery=on_delivery)
        assert producer.flush(10) == 0
        [position] = delivered
        return position

    yield BusUnderTest(kafka, produce)
    admin = AdminClient({"bootstrap.servers": servers})
    for future in admin.delete_topics([topics.physical_name(topic) for topic in Topic]).values():
        future.result(timeout=30)


def fake_payload(rng: random.Random) -> dict[str, Any]:
    """A claim check of an upload that never happened: an envelope carrying it can never be buffered."""
    return {
        "uri": f"artifacts://updates/x/{uuid.uuid4()}.safetensors",
        "sha256": rng.randbytes(32).hex(),
        "size_bytes": 64,
    }


def with_document(envelope: UpdateEnvelope, change: Callable[[dict[str, Any]], None]) -> bytes:
    document = json.loads(encode(envelope))
    change(document)
    return json.dumps(document).encode()


def hostile_messages(
    rng: random.Random, world: WorkerWorld, device: Device, other: Device
) -> Iterator[tuple[str, str, bytes, RejectionCode | None]]:
    """(kind, key, bytes, the code it must get or None for any) of each bad message; none of them can be buffered."""
    client_id = device.row.client_id

    def template() -> UpdateEnvelope:
        return signed_envelope(device, fake_payload(rng), update_id=str(uuid.uuid4()))

    for _ in range(60):
        yield "random bytes", client_id, rng.randbytes(rng.randint(0, 3000)), RejectionCode.MALFORMED
    for _ in range(40):
        raw = encode(template())
        yield "truncated", client_id, raw[: rng.randint(0, len(raw) - 1)], RejectionCode.MALFORMED
    for _ in range(40):
        raw = bytearray(encode(template()))
        for _ in range(rng.randint(1, 6)):
            raw[rng.randrange(len(raw))] ^= rng.randint(1, 255)
        yield "damaged", client_id, bytes(raw), None
    for version in (0, 2, -1, "1", 1.5, None, 2**64, True, [1], {"v": 1}):
        yield (
            "schema version",
            client_id,
            with_document(template(), lambda d, v=version: d.update(schema_version=v)),
            (RejectionCode.MALFORMED),
        )
    for schema in ("RoundStart", "ModelAvailable", "Telemetry", "updateenvelope", ""):
        yield (
            "other schema",
            client_id,
            with_document(template(), lambda d, s=schema: d.update(schema=s)),
            (RejectionCode.MALFORMED),
        )
    huge: list[tuple[str, Any]] = [
        ("examples", MAX_COUNT + 1),
        ("examples", 10**30),
        ("examples", -(2**63)),
        ("routed_tokens", {"0.1": 10**40}),
        ("routed_tokens", {"0.1": MAX_COUNT + 1}),
        ("routed_tokens", {f"{2**70}.{2**70}": 1}),
        ("metrics", {"loss": 1e308 * 10}),
        ("metrics", {"loss": 10**400}),
        ("payload", {"uri": "artifacts://u", "sha256": "0" * 64, "size_bytes": 2**70}),
        ("adapter", {"rank": 2**70, "alpha": 1.0, "target_modules": ["w1"]}),
    ]
    for field, value in huge * 2:
        yield "huge number", client_id, with_document(template(), lambda d, f=field, v=value: d.update({f: v})), None
    nul_fields = ["client_id", "base_version", "round_id", "signature", "update_id"]
    for field in nul_fields * 3:
        yield (
            "NUL in a string",
            client_id,
            with_document(template(), lambda d, f=field: d.update({f: "car\x00-1"})),
            None,
        )
    for _ in range(5):
        raw = encode(template())
        position = rng.randrange(len(raw))
        yield "NUL byte", client_id, raw[:position] + b"\x00" + raw[position:], RejectionCode.MALFORMED
    for depth in (40, 200, 999, 1001, 5000, 50_000, 100, 300, 2000, 10_000):
        raw = encode(template())
        nested = b"[" * depth + b"]" * depth
        yield "deep nesting", client_id, raw[:-1] + b',"extra":' + nested + b"}", RejectionCode.MALFORMED
        yield "deep document", client_id, nested, RejectionCode.MALFORMED
    for _ in range(15):
        # Signed by another enrolled device's key while naming this device.
        forged = signed_envelope(dataclasses.replace(device, signing_key=other.signing_key), fake_payload(rng))
        yield "forged", client_id, encode(forged), RejectionCode.BAD_SIGNATURE
    for _ in range(15):
        tampered = template().model_copy(update={"examples": rng.randint(0, 10**6)})
        yield "tampered", client_id, encode(tampered), RejectionCode.BAD_SIGNATURE
    for _ in range(10):
        yield (
            "unsigned",
            client_id,
            encode(template().model_copy(update={"signature": ""})),
            RejectionCode.BAD_SIGNATURE,
        )
    for _ in range(5):
        stranger = template().model_copy(update={"client_id": f"car-unknown-{rng.randint(0, 999)}"})
        yield "unknown sender", stranger.client_id, encode(stranger), RejectionCode.UNKNOWN_CLIENT
    for _ in range(5):
        yield "wrong key", other.row.client_id, encode(template()), RejectionCode.MALFORMED


def test_hostile_messages_never_stop_ingestion(
    world: WorkerWorld, make_update: Callable[..., Any], bus_under_test: BusUnderTest
) -> None:
    rng = random.Random(20260101)
    world.open_round(k=500)
    device, other = enroll(world, "car-fuzz"), enroll(world, "car-other")
    bad = list(hostile_messages(rng, world, device, other))
    valid = [make_update(rng.choice([device, other]), seed=seed)[0] for seed in range(VALID)]
    # Interleaved at random positions; the last message is a valid one, so the loop must still be consuming then.
    schedule: list[tuple[str, Any]] = [("bad", item) for item in bad] + [("valid", envelope) for envelope in valid[:-1]]
    rng.shuffle(schedule)
    schedule.append(("valid", valid[-1]))

    expected_code: dict[str, RejectionCode | None] = {}  # where → the code it must get (None: any refusal)
    with make_bus(bus_under_test.settings) as bus:
        for kind, item in schedule:
            if kind == "valid":
                bus.publish(Topic.UPDATES, item)  # the real producer path
            else:
                _, key, raw, code = item
                partition, offset = bus_under_test.write_raw(key, raw)
                expected_code[f"{Topic.UPDATES.value}[{partition}]@{offset}"] = code
        with bus.consumer(GROUP, [Topic.UPDATES]) as consumer:
            stats = run_ingest(consumer, max_messages=len(schedule), idle_exit_s=60, poll_timeout_s=0.2)

    assert stats.messages == len(schedule)
    assert bus_under_test.committed_everything()
    # Every valid envelope is buffered, once.
    buffered = set(Update.objects.filter(status=UpdateStatus.BUFFERED).values_list("update_id", flat=True))
    assert buffered == {str(envelope.update_id) for envelope in valid}
    assert stats.by_status.get("buffered") == VALID
    assert set(stats.by_status) <= {"buffered", "refused", "rejected"}
    # Every bad message has its own audit row, found by where it was read, with a rejection code (the named attacks
    # their own); none became an Update row other than a rejected one.
    outcomes = {
        event.data["where"]: event.data
        for event in AuditEvent.objects.filter(verb__in=["federation.update.refused", "federation.update.rejected"])
    }
    assert set(outcomes) == set(expected_code)
    codes = {code.value for code in RejectionCode}
    for where, code in expected_code.items():
        assert outcomes[where]["code"] in codes, outcomes[where]
        assert code is None or outcomes[where]["code"] == code.value, (where, code, outcomes[where])
    assert not Update.objects.exclude(status__in=[UpdateStatus.BUFFERED, UpdateStatus.REJECTED]).exists()
