"""The fault-injection harness: a private set of services, the control plane's worker processes under a small
supervisor, asynchronous windows of K=2 real updates, and the invariants checked after every fault.

Private services: PostgreSQL, Redis and Kafka are started by `scripts/services.sh` under a state directory of the
suite's own (FEDNESTED_SERVICES_STATE), on ports of their own, so restarting them disturbs nobody using the shared
ones. This test process talks to the private PostgreSQL by pointing Django's default connection at it for the
suite's duration (`database_at`); the workers get its URL in their environment.

Supervisor: a worker that exits — killed by a trial, or stopping on an infrastructure error such as PostgreSQL going
away, as the ingest worker does by design — is started again at once, as systemd's Restart=always would.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from confluent_kafka import Consumer, TopicPartition
from django.db import InterfaceError, OperationalError, connections

from apps.demo.processes import ManagedProcess, start_process
from apps.federation.choices import RoundStatus, TaskKind, UpdateStatus
from apps.federation.models import Round, TrainingTask, Update
from apps.governance.services import reject_version, request_approval
from apps.registry.choices import LineageKind
from apps.registry.management.commands.check_store import check_store
from apps.registry.models import LineageEdge, ModelVersion
from fednested.messaging import KafkaBusSettings, Topic, UpdateEnvelope, make_bus
from tests.federation_world import (
    LAYER0_DOWN,
    LAYER1_UP,
    Device,
    WorkerWorld,
    random_adapters,
    signed_envelope,
    write_payload,
)

REPO = Path(__file__).resolve().parents[2]
SERVICES_SCRIPT = REPO / "scripts" / "services.sh"
# A window of two devices' updates: the smallest that still sums more than one update.
K = 2
# How long an aggregation may run before the deadline check (beat's aggregation-deadlines schedule) presumes it
# lost (its worker died): the production default is hours; here a tiny model's aggregation takes a few seconds.
AGGREGATION_TIMEOUT_S = 10
TRIAL_TIMEOUT_S = 120.0
READY_MARKERS = {
    "ingest-worker": "ingest worker consuming",
    "celery-worker": " ready.",
    "celery-beat": "beat: Starting...",
    "relay": "outbox relay started",
}
T = TypeVar("T")


class ServicesUnavailable(RuntimeError):
    """The private services could not be started (no PostgreSQL binaries, no Java, jars not fetched, …)."""


@dataclass
class PrivateServices:
    """PostgreSQL, Redis and Kafka of the suite's own, started and restarted by scripts/services.sh."""

    state: Path
    env: dict[str, str]

    def _run(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SERVICES_SCRIPT), *arguments],
            cwd=REPO,
            env={**os.environ, "FEDNESTED_SERVICES_STATE": str(self.state)},
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )

    @classmethod
    def start(cls, state: Path) -> "PrivateServices":
        services = cls(state=state, env={})
        started = services._run("start")
        if started.returncode != 0:
            services.stop()
            raise ServicesUnavailable(f"scripts/services.sh start (state {state}) failed:\n{started.stderr[-3000:]}")
        services.env = parse_env_file(state / "env.sh")
        return services

    def restart(self, service: str) -> float:
        """Restart `service` on its port with its data; returns the seconds it took."""
        begun = time.monotonic()
        restarted = self._run("restart", service)
        if restarted.returncode != 0:
            raise AssertionError(f"scripts/services.sh restart {service} failed:\n{restarted.stderr[-3000:]}")
        return time.monotonic() - begun

    def stop(self) -> None:
        self._run("stop")


def parse_env_file(path: Path) -> dict[str, str]:
    """`export NAME='value'` lines of a services env.sh."""
    values = {}
    for line in path.read_text().splitlines():
        if line.startswith("export ") and "=" in line:
            name, _, value = line.removeprefix("export ").partition("=")
            values[name] = value.strip("'")
    return values


@contextmanager
def database_at(url: str) -> Iterator[None]:
    """Django's default connection pointed at PostgreSQL `url` for the block, then back where it was."""
    connection = connections["default"]
    if connection.vendor != "postgresql":
        raise ServicesUnavailable(f"the tests run on {connection.vendor}; the fault suite needs PostgreSQL")
    parts = urlsplit(url)
    saved = dict(connection.settings_dict)
    connection.close()
    connection.settings_dict.update(
        NAME=parts.path.lstrip("/"),
        USER=unquote(parts.username or ""),
        PASSWORD=unquote(parts.password or ""),
        HOST=parts.hostname or "127.0.0.1",
        PORT=str(parts.port or 5432),
    )
    try:
        yield
    finally:
        connection.close()
        connection.settings_dict.clear()
        connection.settings_dict.update(saved)


def relay_available() -> bool:
    """Whether this checkout has the outbox relay (workers/relay): the control plane's events and tasks then leave
    through it, and the suite runs it and kills it too."""
    return (REPO / "workers" / "relay" / "__main__.py").is_file()


@dataclass
class Worker:
    """One supervised worker process: how to start it, its current incarnation, and how often it was started."""

    name: str
    argv: list[str]
    extra_env: dict[str, str] = field(default_factory=dict)
    process: ManagedProcess | None = None
    log_offset: int = 0
    starts: int = 0


@dataclass
class TrialRow:
    """One line of the suite's table."""

    trial: str
    seed: int | None
    fault: str
    point: str
    outcome: str
    seconds: float


@dataclass
class Harness:
    """The running system of the suite: store, bus, workers, the people who operate it, and the table of trials."""

    root: Path
    world: WorkerWorld
    services: PrivateServices
    bus_settings: KafkaBusSettings
    env: dict[str, str]
    officer: Any
    devices: list[Device]
    workers: dict[str, Worker] = field(default_factory=dict)
    rows: list[TrialRow] = field(default_factory=list)
    published: list[str] = field(default_factory=list)
    restarts_by_supervisor: Counter[str] = field(default_factory=Counter)

    # --- processes ------------------------------------------------------------------------------------------------

    def add_worker(self, name: str, argv: list[str]) -> None:
        self.workers[name] = Worker(name=name, argv=argv)

    def start(self, name: str, **extra_env: str) -> None:
        worker = self.workers[name]
        worker.extra_env = extra_env
        log_path = self.root / "logs" / f"{name}.log"
        worker.log_offset = log_path.stat().st_size if log_path.exists() else 0
        worker.process = start_process(name, worker.argv, env={**self.env, **extra_env}, log_path=log_path, cwd=REPO)
        worker.starts += 1

    def kill(self, name: str) -> None:
        """SIGKILL to the worker's process group: no handler runs, nothing is flushed or acknowledged."""
        process = self.workers[name].process
        assert process is not None
        with suppress(ProcessLookupError):
            os.killpg(process.popen.pid, signal.SIGKILL)
        process.popen.wait(timeout=30)

    def running(self, name: str) -> bool:
        process = self.workers[name].process
        return process is not None and process.running

    def supervise(self) -> None:
        """Start again every worker that exited (Restart=always), without the crash hook it may have had."""
        for name, worker in self.workers.items():
            if worker.process is not None and not worker.process.running:
                self.restarts_by_supervisor[name] += 1
                self.start(name)

    def ready(self, name: str) -> bool:
        worker = self.workers[name]
        if worker.process is None or not worker.process.running:
            return False
        with worker.process.log_path.open("rb") as log:
            log.seek(worker.log_offset)
            return READY_MARKERS[name].encode() in log.read()

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        self.wait_for(
            "every worker to be ready",
            lambda: True if all(self.ready(n) for n in self.workers) else None,
            timeout_s=timeout_s,
        )

    def stop_all(self) -> None:
        for worker in reversed(list(self.workers.values())):
            if worker.process is not None:
                worker.process.stop(timeout_s=10)

    def wait_for(self, what: str, check: Callable[[], T | None], *, timeout_s: float = TRIAL_TIMEOUT_S) -> T:
        """Poll `check` (supervising the workers meanwhile) until it returns a value; a database that went away
        under the check (a restart) is reconnected to on the next poll."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.supervise()
            try:
                result = check()
            except (OperationalError, InterfaceError):
                connections["default"].close()
                result = None
            if result is not None:
                return result
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{self.log_tails()}")

    def log_tails(self, lines: int = 25) -> str:
        return "\n".join(
            f"--- {w.name} ({w.process.log_path}):\n{w.process.log_tail(lines)}"
            for w in self.workers.values()
            if w.process is not None
        )

    # --- rounds ---------------------------------------------------------------------------------------------------

    def open_window(self) -> Round:
        """The open window of the suite's series (each aggregation opens the next)."""
        window = Round.objects.filter(status=RoundStatus.OPEN).order_by("-sequence", "-id").first()
        assert window is not None, "no open window: the series stopped"
        return window

    def updates_for(self, window: Round, seed: int) -> list[UpdateEnvelope]:
        """K valid updates, one per device, their payloads uploaded as the devices upload them."""
        envelopes = []
        for index, device in enumerate(self.devices[:K]):
            update_id = str(uuid.uuid4())
            adapters = random_adapters(self.world.shapes, {LAYER0_DOWN: [1], LAYER1_UP: [2]}, seed * 10 + index)
            payload = write_payload(self.world, device, update_id, adapters)
            envelopes.append(signed_envelope(device, payload, round_id=window.round_id, update_id=update_id))
        return envelopes

    def publish(self, envelopes: list[UpdateEnvelope]) -> None:
        with make_bus(self.bus_settings) as bus:
            for envelope in envelopes:
                bus.publish(Topic.UPDATES, envelope, key=envelope.client_id)
        self.published.extend(str(envelope.update_id) for envelope in envelopes)

    def window_done(self, window: Round, envelopes: list[UpdateEnvelope]) -> ModelVersion | None:
        """The window's candidate once it is registered with every one of the window's updates applied in it."""
        window.refresh_from_db()
        if window.status != RoundStatus.CLOSED or window.candidate_id is None:
            return None
        ids = {str(envelope.update_id) for envelope in envelopes}
        applied = set(
            Update.objects.filter(
                update_id__in=ids, status=UpdateStatus.APPLIED, applied_in=window.candidate_id
            ).values_list("update_id", flat=True)
        )
        return window.candidate if applied == ids else None

    def decide(self, candidate: ModelVersion) -> None:
        """An officer rejects the candidate, so the next window may aggregate (one candidate awaits at a time)."""
        request = request_approval(candidate, actor=self.world.engineer)
        reject_version(request, actor=self.officer, reason="fault suite: decided so the next trial's window can go on")

    # --- invariants -----------------------------------------------------------------------------------------------

    def check_invariants(self) -> str:
        """Everything the suite promises after recovery; returns a short summary, raises AssertionError otherwise."""
        rows = dict(Update.objects.filter(update_id__in=self.published).values_list("update_id", "status"))
        missing = sorted(set(self.published) - set(rows))
        assert not missing, f"accepted updates lost (no row): {missing}"
        wrong = {
            uid: status for uid, status in rows.items() if status not in (UpdateStatus.APPLIED, UpdateStatus.BUFFERED)
        }
        assert not wrong, f"accepted updates neither applied nor buffered: {wrong}"
        # Applied exactly once: one version's lineage names each applied update, the one its row says.
        edges = Counter(LineageEdge.objects.filter(kind=LineageKind.UPDATE).values_list("source_ref", flat=True))
        twice = {uid: n for uid, n in edges.items() if n > 1}
        assert not twice, f"updates in more than one version: {twice}"
        for update_id, version_id in Update.objects.filter(status=UpdateStatus.APPLIED).values_list(
            "update_id", "applied_in__version_id"
        ):
            named = set(
                LineageEdge.objects.filter(kind=LineageKind.UPDATE, source_ref=update_id).values_list(
                    "version__version_id", flat=True
                )
            )
            assert named == {version_id}, f"update {update_id} applied in {version_id} but lineage says {named}"
        # No half-registered version: every registered file is there with its size and sha256, nothing unregistered
        # is left in the store (an aggregation's files without their registry row).
        report = check_store(self.world.root)
        assert not report.findings, "store and registry disagree:\n" + "\n".join(f.line() for f in report.findings)
        stuck = list(Round.objects.filter(status=RoundStatus.AGGREGATING).values_list("round_id", flat=True))
        assert not stuck, f"windows left aggregating: {stuck}"
        summary = f"{sum(1 for s in rows.values() if s == UpdateStatus.APPLIED)} applied, {report.versions} versions"
        if relay_available():
            summary += ", " + self.check_outbox()
        return summary

    def check_outbox(self) -> str:
        """Every outbox row sent (none parked or pending), and every bus event on the bus under its event id: copies
        (a relay killed after publishing, before marking) carry the same event, which consumers drop by id."""
        from apps.outbox.choices import OutboxKind
        from apps.outbox.models import OutboxEvent

        pending = self.wait_for(
            "the relay to send every outbox row",
            lambda: True if not OutboxEvent.objects.filter(sent_at__isnull=True).exists() else None,
            timeout_s=60,
        )
        assert pending
        events = list(OutboxEvent.objects.filter(kind=OutboxKind.BUS_EVENT).values_list("event_id", "topic"))
        seen: Counter[str] = Counter()
        bodies: dict[str, set[str]] = {}
        for topic in {topic for _, topic in events}:
            for raw in read_topic(self.bus_settings, self.bus_settings.topics.physical_name(Topic(topic))):
                body = json.loads(raw)
                event_id = str(body.get("event_id"))
                seen[event_id] += 1
                bodies.setdefault(event_id, set()).add(hashlib.sha256(raw).hexdigest())
        unpublished = [str(event_id) for event_id, _ in events if seen[str(event_id)] == 0]
        assert not unpublished, f"outbox events marked sent but not on the bus: {unpublished}"
        differing = {event_id: len(b) for event_id, b in bodies.items() if len(b) > 1}
        assert not differing, f"one event id carried different events: {differing}"
        copies = sum(seen[str(event_id)] - 1 for event_id, _ in events)
        return f"{len(events)} events once by id ({copies} duplicate deliveries dropped)"

    def record(self, row: TrialRow) -> None:
        self.rows.append(row)

    def table(self) -> str:
        header = f"{'trial':<28} {'seed':>6}  {'fault':<30} {'point':<44} {'s':>6}  outcome"
        lines = [header, "-" * len(header)]
        for row in self.rows:
            seed = "-" if row.seed is None else str(row.seed)
            lines.append(
                f"{row.trial:<28} {seed:>6}  {row.fault:<30} {row.point:<44} {row.seconds:>6.1f}  {row.outcome}"
            )
        return "\n".join(lines)


def read_topic(settings: KafkaBusSettings, physical: str) -> list[bytes]:
    """Every record of a (single-partition) topic, from the beginning."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": f"faults-reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
        }
    )
    try:
        partition = TopicPartition(physical, 0, 0)
        _, high = consumer.get_watermark_offsets(partition, timeout=15)
        consumer.assign([partition])
        records: list[bytes] = []
        deadline = time.monotonic() + 30
        while len(records) < high and time.monotonic() < deadline:
            message = consumer.poll(1.0)
            if message is None or message.error() is not None:
                continue
            value = message.value()
            if value is not None:
                records.append(value)
        assert len(records) >= high, f"read {len(records)} of {high} records of {physical}"
        return records
    finally:
        consumer.close()


def worker_commands(python: str = sys.executable) -> dict[str, list[str]]:
    """The control plane's workers as a deployment runs them (the Celery worker takes the aggregation queue)."""
    commands = {
        "ingest-worker": [python, "-m", "workers.ingest", "--poll-timeout", "0.2"],
        "celery-worker": [
            python,
            "-m",
            "celery",
            "-A",
            "controlplane",
            "worker",
            "--pool",
            "solo",
            "--queues",
            # schedules: the deadline check that presumes a killed aggregation lost (apps/schedules).
            "aggregation,schedules",
            "--hostname",
            f"faults-{uuid.uuid4().hex[:8]}@%h",
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ],
    }
    # Fires the deadline check every 5 s (the aggregation-deadlines schedule the migrations create).
    commands["celery-beat"] = [python, "-m", "celery", "-A", "controlplane", "beat", "--loglevel", "INFO"]
    if relay_available():
        commands["relay"] = [python, "-m", "workers.relay", "--poll-interval", "0.2"]
    return commands


def task_state(window: Round) -> str:
    """The window's aggregation task statuses, e.g. 'running' or 'failed,pending' (none: '-')."""
    statuses = TrainingTask.objects.filter(round=window, kind=TaskKind.EXPERT_AGGREGATION).order_by("id")
    return ",".join(statuses.values_list("status", flat=True)) or "-"
