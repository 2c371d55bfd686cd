"""The outbox relay against real PostgreSQL and Kafka: an approval made while Kafka is down commits and its event
goes out once Kafka is back, exactly once; a relay killed between publishing and marking the row sent publishes it
again and the edge client drops the copy; a poison row is parked without blocking the rows behind it; a duplicate
Celery delivery of a training task is a no-op."""

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml
from django.db import connection
from django.utils import timezone

from apps.accounts.choices import Role
from apps.accounts.models import User
from apps.accounts.services import create_user_with_role
from apps.federation.choices import TaskKind, TaskStatus
from apps.federation.events import bus_settings
from apps.federation.models import TrainingTask
from apps.federation.services import create_training_task
from apps.governance.actors import Actor
from apps.governance.models import AuditEvent
from apps.governance.services import approve_version, request_approval
from apps.outbox.choices import OutboxKind
from apps.outbox.handlers import Delivery
from apps.outbox.models import OutboxEvent
from apps.outbox.services import enqueue
from fednested.messaging import KafkaBusSettings, Message, ModelAvailable, Topic, bootstrap_topics, make_bus
from tests.federation_world import WorkerWorld
from workers.aggregation import aggregate_round_task
from workers.relay.relay import CRASH_POINT_ENV, relay_batch

pytestmark = [pytest.mark.kafka, pytest.mark.services, pytest.mark.timeout(300)]
REPO = Path(__file__).resolve().parents[2]


def kafka_servers() -> str:
    servers = os.environ.get("FEDNESTED_KAFKA_BOOTSTRAP", "")
    if not servers:
        if os.environ.get("FEDNESTED_REQUIRE_SERVICES") == "1":
            pytest.fail("FEDNESTED_REQUIRE_SERVICES=1 but FEDNESTED_KAFKA_BOOTSTRAP is not set: Kafka is not running")
        pytest.skip("Kafka not running: `scripts/services.sh start && source var/services/env.sh`")
    return servers


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on: a broker that is down."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture
def kafka(settings: Any) -> Iterator[KafkaBusSettings]:
    """The control plane's bus on the real Kafka, under topics of this test's own."""
    settings.FEDNESTED_BUS = "kafka"
    settings.FEDNESTED_KAFKA_BOOTSTRAP = kafka_servers()
    settings.FEDNESTED_TOPIC_PREFIX = f"relay-{uuid.uuid4().hex[:8]}."
    bus = bus_settings()
    assert isinstance(bus, KafkaBusSettings)
    bootstrap_topics(bus)
    yield bus
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bus.bootstrap_servers})
    for future in admin.delete_topics([bus.topics.physical_name(topic) for topic in Topic]).values():
        future.result(timeout=30)


def control_events(bus: KafkaBusSettings, *, expected: int) -> list[Message]:
    """Every record on control.federation_rounds (read until `expected` arrived and one more second is quiet)."""
    messages: list[Message] = []
    with make_bus(bus) as opened, opened.consumer(f"relay-test-{uuid.uuid4().hex[:8]}", [Topic.CONTROL_ROUNDS]) as c:
        quiet = 0
        while quiet < (1 if len(messages) >= expected else 30):
            message = c.poll(1.0)
            if message is None:
                quiet += 1
                continue
            quiet = 0
            messages.append(message)
    return messages


@pytest.fixture
def officer() -> User:
    return create_user_with_role(username="olga-officer", role=Role.OFFICER, actor=Actor.automation("tests"))


@pytest.mark.django_db
def test_an_approval_while_kafka_is_down_commits_and_its_event_goes_out_once_after_recovery(
    world: WorkerWorld, officer: User, kafka: KafkaBusSettings, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fednested.messaging.kafka

    # Down: the control plane's bus points at a port nothing listens on (the shared broker stays up for others).
    settings.FEDNESTED_KAFKA_BOOTSTRAP = f"127.0.0.1:{closed_port()}"
    monkeypatch.setattr(fednested.messaging.kafka, "METADATA_TIMEOUT_S", 2.0)
    approve_version(request_approval(world.base, actor=world.engineer), actor=officer, reason="baseline")
    assert world.base.aliases.filter(name="champion").exists()  # the approval committed
    row = OutboxEvent.objects.get(kind=OutboxKind.BUS_EVENT)
    with Delivery() as delivery:
        failed = relay_batch(delivery)
    assert (failed.sent, failed.retried, failed.parked) == (0, 1, 0)
    row.refresh_from_db()
    assert (row.sent_at, row.parked_at, row.attempts) == (None, None, 1)
    assert "BusError" in row.last_error
    assert settings.FEDNESTED_KAFKA_BOOTSTRAP in row.last_error
    assert row.next_attempt_at > timezone.now()  # backed off: not due again at once
    with Delivery() as delivery:
        assert relay_batch(delivery).sent == 0  # not due yet, so not tried

    # Recovery: the relay reaches the broker again; past the backoff the row goes out, once.
    settings.FEDNESTED_KAFKA_BOOTSTRAP = kafka.bootstrap_servers
    later = timezone.now() + timedelta(seconds=settings.FEDNESTED_OUTBOX_RETRY_MAX_S + 1)
    with Delivery() as delivery:
        assert relay_batch(delivery, now=lambda: later).sent == 1
    with Delivery() as delivery:
        assert relay_batch(delivery, now=lambda: later).sent == 0  # marked sent: never again
    row.refresh_from_db()
    assert row.sent_at is not None
    assert row.attempts == 2
    [message] = control_events(kafka, expected=1)
    assert isinstance(message.event, ModelAvailable)
    assert (message.event.version_id, message.event.event_id) == ("v1", row.event_id)


@pytest.mark.django_db
def test_a_rolled_back_change_leaves_no_outbox_row_and_publishes_nothing(
    world: WorkerWorld, kafka: KafkaBusSettings
) -> None:
    from django.core.exceptions import PermissionDenied

    request = request_approval(world.base, actor=world.engineer)
    # The engineer may not decide: approve_version raises inside its transaction, after nothing or something wrote.
    with pytest.raises(PermissionDenied):
        approve_version(request, actor=world.engineer)
    assert not OutboxEvent.objects.filter(kind=OutboxKind.BUS_EVENT).exists()
    with Delivery() as delivery:
        assert relay_batch(delivery).sent == 0
    assert control_events(kafka, expected=0) == []


@pytest.mark.django_db
def test_a_poison_row_is_parked_with_its_error_and_does_not_block_the_rows_behind_it(
    world: WorkerWorld, officer: User, kafka: KafkaBusSettings
) -> None:
    poison = enqueue(
        OutboxKind.BUS_EVENT,
        topic=Topic.CONTROL_ROUNDS.value,
        key="v1",
        payload={"schema": "ModelAvailable", "schema_version": 1, "version_id": "v1"},
    )
    unknown_kind = OutboxEvent.objects.create(
        kind="mlflow_call", payload={}, next_attempt_at=timezone.now() - timedelta(seconds=1)
    )
    approve_version(request_approval(world.base, actor=world.engineer), actor=officer, reason="baseline")
    with Delivery() as delivery:
        stats = relay_batch(delivery)
    assert (stats.sent, stats.parked, stats.retried) == (1, 2, 0)
    poison.refresh_from_db()
    unknown_kind.refresh_from_db()
    assert (poison.parked_at is not None, poison.sent_at) == (True, None)
    assert "invalid ModelAvailable v1" in poison.last_error
    assert "manifest_sha256" in poison.last_error
    assert "no handler delivers outbox rows of kind 'mlflow_call'" in unknown_kind.last_error
    with Delivery() as delivery:
        assert (relay_batch(delivery).parked, OutboxEvent.objects.filter(parked_at__isnull=False).count()) == (0, 2)
    [message] = control_events(kafka, expected=1)
    assert isinstance(message.event, ModelAvailable)


def shared_database_url() -> str:
    """The URL of pytest-django's test database, for the relay processes."""
    db = connection.settings_dict
    if connection.vendor != "postgresql":
        pytest.skip("the relay process must share the test database: needs PostgreSQL (scripts/services.sh)")
    credentials = f"{quote(db['USER'])}:{quote(db['PASSWORD'])}@" if db["USER"] else ""
    return f"postgres://{credentials}{db['HOST']}:{db['PORT']}/{db['NAME']}"


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_relay_killed_after_publishing_publishes_again_and_the_device_drops_the_copy(
    world: WorkerWorld, officer: User, kafka: KafkaBusSettings, tmp_path: Path
) -> None:
    from edge_client.runner import ClientRun, ClientSettings, RunOptions
    from edge_client.sidecar import AuditLog, Sidecar, example_policy, load_policy

    approve_version(request_approval(world.base, actor=world.engineer), actor=officer, reason="baseline")
    row = OutboxEvent.objects.get(kind=OutboxKind.BUS_EVENT)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DATABASE_URL": shared_database_url(),
        "FEDNESTED_BUS": "kafka",
        "FEDNESTED_KAFKA_BOOTSTRAP": kafka.bootstrap_servers,
        "FEDNESTED_TOPIC_PREFIX": kafka.topics.prefix,
        "CELERY_BROKER_URL": "",
    }
    argv = [sys.executable, "-m", "workers.relay", "--poll-interval", "0.1", "--idle-exit", "1"]
    killed = subprocess.run(
        argv, cwd=REPO, env={**env, CRASH_POINT_ENV: "after_publish"}, capture_output=True, text=True, timeout=120
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    row.refresh_from_db()
    assert row.sent_at is None  # published, but the relay died before it could say so
    again = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    row.refresh_from_db()
    assert row.sent_at is not None
    first, second = control_events(kafka, expected=2)
    assert first.raw == second.raw
    assert isinstance(first.event, ModelAvailable)
    assert first.event.event_id == row.event_id

    # The edge client's handling of the two copies: the second is recognised by its event id and ignored.
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(example_policy("http://127.0.0.1:1")))
    client = ClientRun(
        ClientSettings(
            client_id="edge-dedupe",
            control_plane_url="http://127.0.0.1:1",
            token_file=tmp_path / "token",
            state_dir=tmp_path / "state",
            policy_file=tmp_path / "policy.yaml",
            data_files=(),
            bus=kafka,
        ),
        RunOptions(),
    )
    audit_path = tmp_path / "audit.jsonl"
    sidecar = Sidecar(policy=load_policy(tmp_path / "policy.yaml"), audit=AuditLog(audit_path))
    client.handle_control(first, sidecar)
    client.announced.clear()
    client.champion_stale = False
    client.handle_control(second, sidecar)
    assert client.report.duplicate_events == 1
    assert (client.announced, client.champion_stale) == ({}, False)  # the copy changed nothing
    assert audit_path.read_text().count('"control.duplicate_event"') == 1


@pytest.mark.django_db
def test_a_training_task_sent_twice_runs_once(
    world: WorkerWorld, kafka: KafkaBusSettings, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.FEDNESTED_JOBS_IN_PROCESS = False
    task = create_training_task(kind=TaskKind.EXPERT_AGGREGATION, actor=world.engineer, round_=world.open_round())
    row = OutboxEvent.objects.get(kind=OutboxKind.CELERY_TASK, key=str(task.pk))
    sent: list[tuple[str, list[int], str]] = []

    from controlplane.celery import app

    def send_task(name: str, *, args: list[int], task_id: str, **options: Any) -> None:
        sent.append((name, args, task_id))

    # What the broker does with it is Celery's (and Redis is shared with other test runs, whose workers could take
    # the task); what matters here is what the relay hands Celery: the task, its pk, and the row's id as task id.
    monkeypatch.setattr(app, "send_task", send_task)
    with Delivery() as delivery:
        assert relay_batch(delivery).sent == 2  # the window's RoundStart and the task
    assert sent == [("workers.aggregation.aggregate_round_task", [task.pk], str(row.event_id))]
    # Two deliveries of that one message (a relay that died before marking it sent, or the broker redelivering):
    # the first claims the task, the second finds it claimed and does nothing.
    aggregate_round_task(task.pk)
    assert aggregate_round_task(task.pk) is None
    assert TrainingTask.objects.get(pk=task.pk).status == TaskStatus.SUCCEEDED
    verbs = list(AuditEvent.objects.filter(verb__startswith="federation.task.").values_list("verb", flat=True))
    assert sorted(verbs) == ["federation.task.created", "federation.task.running", "federation.task.succeeded"]
