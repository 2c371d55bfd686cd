"""Ingest throughput: update envelopes per second through Kafka → the ingest worker's loop → PostgreSQL, against the
Kafka producer's own throughput on the same broker in the same run.

`make bench-ingest` writes bench/results/ingest.json. Everything is real: devices enrolled through the control
plane's service, envelopes signed with their keys, payloads of the `tiny` preset uploaded into the artifact store as
the API stores them, the worker's own `run_ingest` on a real consumer group, and a database of its own on the
PostgreSQL server of `var/services/env.sh` (created and dropped by the run). The window's K is the largest allowed,
so no aggregation runs during the measurement.

Runs, each on fresh envelopes and a fresh consumer group: the producer alone (produce every record, one flush);
the worker one message at a time (`batch_size` 1: what ingestion was before batching); the worker in batches; the
same batches on the embedded bus (SQLite file) with the same PostgreSQL database.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.report import machine, write_report

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "ingest.json"
DATABASE_NAME = "fednested_bench_ingest"


@dataclass(frozen=True)
class IngestBenchSettings:
    """What `make bench-ingest` runs; the test runs a tiny configuration of the same."""

    envelopes: int = 3000
    # Batch size 1 is slow (the baseline): fewer envelopes keep the run bounded.
    unbatched_envelopes: int = 100
    batch_size: int = 500
    devices: int = 50
    embedded: bool = True
    # The target on the 2-core reference machine.
    target_envelopes_per_s: float = 1000.0

    def __post_init__(self) -> None:
        if min(self.envelopes, self.unbatched_envelopes, self.batch_size, self.devices) < 1:
            raise ValueError(f"every count must be at least 1: {self}")


def _setup_django(prefix: str) -> None:
    """Django against the services of var/services/env.sh, with this run's topic prefix and test database name."""
    if not os.environ.get("DATABASE_URL", "").startswith("postgres"):
        raise SystemExit(
            "bench-ingest needs PostgreSQL and Kafka: `make services-start && source var/services/env.sh` first "
            "(DATABASE_URL is not a postgres:// URL)"
        )
    if not os.environ.get("FEDNESTED_KAFKA_BOOTSTRAP"):
        raise SystemExit("bench-ingest needs Kafka: FEDNESTED_KAFKA_BOOTSTRAP is not set (source var/services/env.sh)")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")
    os.environ.setdefault("FEDNESTED_TEST_DB_NAME", DATABASE_NAME)
    # Control events of this run (RoundStart on opening the window) go to this run's topics, not the deployment's.
    os.environ["FEDNESTED_TOPIC_PREFIX"] = prefix
    os.environ["FEDNESTED_BUS"] = "kafka"
    import django

    django.setup()


@contextmanager
def _database() -> Iterator[None]:
    """A database of this run's own (FEDNESTED_TEST_DB_NAME), migrated, dropped at the end."""
    from django.test.utils import setup_databases, setup_test_environment, teardown_databases, teardown_test_environment

    setup_test_environment(debug=False)
    config = setup_databases(verbosity=0, interactive=False)
    try:
        yield
    finally:
        teardown_databases(config, verbosity=0)
        teardown_test_environment()


def _build_world(root: Path) -> Any:
    """A registered `tiny` base version v1 in the artifact store `root`, as the tests' WorkerWorld."""
    from apps.accounts.choices import Role
    from apps.accounts.models import User
    from fednested.checkpoints import save_version
    from fednested.deltas import expert_param_shapes
    from fednested.models import build_model
    from tests.federation_world import WorkerWorld, register_base_version

    model = build_model("tiny", vocab_size=320, seed=3)
    save_version(model, root / "versions" / "v1", version_id="v1", parent_version=None)
    engineer = User(username="bench-engineer", role=Role.ENGINEER)
    engineer.set_unusable_password()
    engineer.save()
    family, base = register_base_version(root, engineer)
    return WorkerWorld(root=root, shapes=expert_param_shapes(model), engineer=engineer, family=family, base=base)


def _envelopes(world: Any, devices: Sequence[Any], count: int, round_id: str, seed: int) -> list[tuple[str, bytes]]:
    """`count` (key, record) pairs: signed envelopes whose payloads (two experts' adapters of the tiny model, as the
    tests' update builder makes them) are uploaded into the artifact store as the API stores them."""
    from fednested.messaging import encode
    from tests.federation_world import LAYER0_DOWN, LAYER1_UP, random_adapters, signed_envelope, write_payload

    records = []
    for index in range(count):
        device = devices[index % len(devices)]
        update_id = str(uuid.uuid4())
        adapters = random_adapters(world.shapes, {LAYER0_DOWN: [1], LAYER1_UP: [2]}, seed + index)
        payload = write_payload(world, device, update_id, adapters)
        envelope = signed_envelope(device, payload, round_id=round_id, update_id=update_id)
        records.append((device.row.client_id, encode(envelope)))
    return records


class _TimedConsumer:
    """The worker's consumer, with the time each batch spent between `consume` returning and its offset commit
    (the worker's own latency per envelope: checks, transaction, commit)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.latencies: list[float] = []
        self.first_taken_at: float | None = None
        self.last_committed_at = 0.0
        self._taken_at = 0.0

    def consume(self, max_messages: int, timeout_s: float) -> list[Any]:
        messages: list[Any] = self.inner.consume(max_messages, timeout_s)
        self._taken_at = time.perf_counter()
        if messages and self.first_taken_at is None:
            self.first_taken_at = self._taken_at
        return messages

    def commit_batch(self, messages: Sequence[Any]) -> None:
        self.inner.commit_batch(messages)
        self.last_committed_at = time.perf_counter()
        self.latencies.extend([self.last_committed_at - self._taken_at] * len(messages))


@contextmanager
def _counting_statements() -> Iterator[list[int]]:
    """Counts the SQL statements this process sends (a wrapper around every execute; cheaper than capturing them)."""
    from django.db import connection

    count = [0]

    def counter(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        count[0] += 1
        return execute(sql, params, many, context)

    with connection.execute_wrapper(counter):
        yield count


def _run_worker(bus_settings: Any, group: str, count: int, batch_size: int) -> dict[str, Any]:
    """The ingest worker's loop over `count` waiting records; its throughput, latency and statements per envelope."""
    from apps.federation.models import Update
    from fednested.messaging import Topic, make_bus
    from workers.ingest.consumer import run_ingest

    before = Update.objects.count()
    with make_bus(bus_settings) as bus, bus.consumer(group, [Topic.UPDATES]) as consumer:
        timed = _TimedConsumer(consumer)
        with _counting_statements() as statements:
            stats = run_ingest(
                timed,  # type: ignore[arg-type]  # the consumer's two calls the loop makes, timed
                max_messages=count,
                idle_exit_s=60,
                poll_timeout_s=1.0,
                batch_size=batch_size,
            )
    # From the first batch in hand to the last offset committed: joining the group (a rebalance, seconds on Kafka)
    # is not ingest time.
    elapsed = timed.last_committed_at - (timed.first_taken_at or timed.last_committed_at)
    recorded = Update.objects.count() - before
    if stats.by_status.get("buffered") != count or recorded != count:
        raise RuntimeError(f"expected {count} buffered updates, got {stats.by_status} ({recorded} rows)")
    latencies = sorted(timed.latencies)
    return {
        "envelopes": count,
        "batch_size": batch_size,
        "batches": stats.batches,
        "seconds": elapsed,
        "envelopes_per_s": count / elapsed,
        "latency_ms_p50": 1000 * statistics.median(latencies),
        "latency_ms_p99": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "sql_statements_per_envelope": statements[0] / count,
    }


def _produce_kafka(bus_settings: Any, records: Sequence[tuple[str, bytes]]) -> dict[str, Any]:
    """The producer alone: every record produced with the bus's producer settings (idempotent, acks=all), then one
    flush; these are the records the worker then reads."""
    from confluent_kafka import Producer

    from fednested.messaging import Topic
    from fednested.messaging.kafka import client_config

    producer = Producer({**client_config(bus_settings), "enable.idempotence": True, "acks": "all", "linger.ms": 5})
    name = bus_settings.topics.physical_name(Topic.UPDATES)
    # Connected, with the topic's metadata and its idempotent producer id, before the clock starts (as a
    # long-running producer is): the first record goes out alone and untimed (acquiring the producer id took up to
    # half a second, which is not throughput).
    producer.list_topics(name, timeout=10)
    first_key, first_raw = records[0]
    producer.produce(name, value=first_raw, key=first_key.encode())
    if producer.flush(60):
        raise RuntimeError(f"Kafka did not acknowledge the first record to {name} within 60 s")
    timed = records[1:]
    started = time.perf_counter()
    for key, raw in timed:
        producer.produce(name, value=raw, key=key.encode())
        producer.poll(0)
    if producer.flush(60):
        raise RuntimeError(f"Kafka did not acknowledge every record to {name} within 60 s")
    elapsed = time.perf_counter() - started
    return {
        "envelopes": len(timed),
        "seconds": elapsed,
        "envelopes_per_s": len(timed) / elapsed,
        "mean_record_bytes": statistics.fmean(len(raw) for _, raw in records),
    }


def _publish_embedded(bus_settings: Any, records: Sequence[tuple[str, bytes]]) -> None:
    from fednested.messaging import Topic
    from fednested.messaging.embedded import write_raw_record

    name = bus_settings.topics.physical_name(Topic.UPDATES)
    for key, raw in records:
        write_raw_record(bus_settings.path, name, key, raw)


def _delete_topics(bus_settings: Any) -> None:
    from confluent_kafka.admin import AdminClient

    from fednested.messaging import Topic
    from fednested.messaging.kafka import client_config

    admin = AdminClient(client_config(bus_settings))
    futures = admin.delete_topics([bus_settings.topics.physical_name(topic) for topic in Topic])
    for future in futures.values():
        future.result(timeout=30)


def run_benchmark(settings: IngestBenchSettings, out: Path) -> dict[str, Any]:
    started = time.perf_counter()
    prefix = f"bench-ingest-{uuid.uuid4().hex[:8]}."
    _setup_django(prefix)
    from datetime import timedelta

    from django.test import override_settings
    from django.utils import timezone

    from apps.federation.events import bus_settings as configured_bus
    from apps.federation.services import open_round
    from fednested.messaging import EmbeddedBusSettings, KafkaBusSettings, TopicsConfig, bootstrap_topics
    from tests.federation_world import enroll

    kafka = configured_bus()
    if not isinstance(kafka, KafkaBusSettings):
        raise SystemExit("bench-ingest measures Kafka: FEDNESTED_BUS must be kafka")
    bootstrap_topics(kafka)
    created = [kafka]
    report: dict[str, Any] = {"benchmark": "ingest", "settings": asdict(settings), "machine": machine(1)}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-ingest-") as folder, _database():
            root = Path(folder) / "artifacts"
            with override_settings(FEDNESTED_ARTIFACT_ROOT=root):
                world = _build_world(root)
                window = open_round(
                    base_version=world.base,
                    buffer_size_k=10_000,
                    deadline_at=timezone.now() + timedelta(hours=1),
                    actor=world.engineer,
                )
                devices = [enroll(world, f"bench-car-{index:04d}") for index in range(settings.devices)]
                made = time.perf_counter()
                batched = _envelopes(world, devices, settings.envelopes, window.round_id, seed=0)
                unbatched = _envelopes(world, devices, settings.unbatched_envelopes, window.round_id, seed=10**6)
                report["envelope_build_seconds"] = time.perf_counter() - made

                # A topic of its own per run, so that each consumer group reads exactly its run's records.
                single_topics = kafka.model_copy(update={"topics": TopicsConfig(prefix=f"{prefix}single.")})
                batched_topics = kafka.model_copy(update={"topics": TopicsConfig(prefix=f"{prefix}batched.")})
                created.extend([single_topics, batched_topics])
                bootstrap_topics(single_topics)
                bootstrap_topics(batched_topics)
                _produce_kafka(single_topics, unbatched)
                producer = _produce_kafka(batched_topics, batched)
                one_at_a_time = _run_worker(single_topics, "bench-ingest-single", len(unbatched), 1)
                batches = _run_worker(batched_topics, "bench-ingest-batches", len(batched), settings.batch_size)
                report["producer"] = producer
                report["kafka_batch_size_1"] = one_at_a_time
                report["kafka_batched"] = batches
                if settings.embedded:
                    embedded = EmbeddedBusSettings(
                        path=Path(folder) / "bus.sqlite3", topics=TopicsConfig(prefix=prefix)
                    )
                    bootstrap_topics(embedded)
                    records = _envelopes(world, devices, settings.envelopes, window.round_id, seed=2 * 10**6)
                    _publish_embedded(embedded, records)
                    report["embedded_batched"] = _run_worker(
                        embedded, "bench-ingest-embedded", len(records), settings.batch_size
                    )
    finally:
        for topics in created:
            _delete_topics(topics)
    report["envelopes_per_s"] = report["kafka_batched"]["envelopes_per_s"]
    report["ratio_to_producer"] = report["envelopes_per_s"] / report["producer"]["envelopes_per_s"]
    report["speedup_over_batch_size_1"] = report["envelopes_per_s"] / report["kafka_batch_size_1"]["envelopes_per_s"]
    report["sql_statements_per_envelope"] = report["kafka_batched"]["sql_statements_per_envelope"]
    if settings.embedded:
        report["embedded_envelopes_per_s"] = report["embedded_batched"]["envelopes_per_s"]
    report["target"] = {
        "envelopes_per_s": settings.target_envelopes_per_s,
        "met": report["envelopes_per_s"] >= settings.target_envelopes_per_s,
    }
    return write_report(report, out, started=started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS_PATH)
    parser.add_argument("--envelopes", type=int, default=IngestBenchSettings.envelopes)
    parser.add_argument("--unbatched-envelopes", type=int, default=IngestBenchSettings.unbatched_envelopes)
    parser.add_argument("--batch-size", type=int, default=IngestBenchSettings.batch_size)
    parser.add_argument("--devices", type=int, default=IngestBenchSettings.devices)
    parser.add_argument("--no-embedded", action="store_true", help="skip the embedded-bus run")
    args = parser.parse_args(argv)
    settings = IngestBenchSettings(
        envelopes=args.envelopes,
        unbatched_envelopes=args.unbatched_envelopes,
        batch_size=args.batch_size,
        devices=args.devices,
        embedded=not args.no_embedded,
    )
    report = run_benchmark(settings, args.out)
    keys = ("envelopes_per_s", "ratio_to_producer", "speedup_over_batch_size_1", "sql_statements_per_envelope")
    summary = {key: report[key] for key in keys}
    summary["embedded_envelopes_per_s"] = report.get("embedded_envelopes_per_s")
    summary["target_met"] = report["target"]["met"]
    summary["wall_seconds"] = report["wall_seconds"]
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
