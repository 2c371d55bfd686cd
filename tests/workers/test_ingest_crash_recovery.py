"""Kill the ingest worker between a batch's database commit and its offset commit: on restart the batch comes again,
and each update is recorded once — nothing lost, nothing applied twice. Real Kafka, real PostgreSQL, real processes."""

import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from django.db import connection

from apps.federation.choices import UpdateStatus
from apps.federation.models import Update
from apps.governance.models import AuditEvent
from fednested.messaging import KafkaBusSettings, Topic, TopicsConfig, bootstrap_topics, make_bus
from tests.federation_world import WorkerWorld, enroll
from workers.ingest.consumer import CRASH_POINT_ENV

pytestmark = [pytest.mark.kafka, pytest.mark.services, pytest.mark.slow, pytest.mark.timeout(300)]
REPO = Path(__file__).resolve().parents[2]


def kafka_servers() -> str:
    servers = os.environ.get("FEDNESTED_KAFKA_BOOTSTRAP", "")
    if not servers:
        if os.environ.get("FEDNESTED_REQUIRE_SERVICES") == "1":
            pytest.fail("FEDNESTED_REQUIRE_SERVICES=1 but FEDNESTED_KAFKA_BOOTSTRAP is not set: Kafka is not running")
        pytest.skip("Kafka not running: `scripts/services.sh start && source var/services/env.sh`")
    return servers


def shared_database_url() -> str:
    """The URL of the database this test writes to (pytest-django's test database), for the worker processes."""
    db = connection.settings_dict
    if connection.vendor != "postgresql":
        pytest.skip("the worker processes must share the test database: needs PostgreSQL (scripts/services.sh)")
    credentials = f"{quote(db['USER'])}:{quote(db['PASSWORD'])}@" if db["USER"] else ""
    return f"postgres://{credentials}{db['HOST']}:{db['PORT']}/{db['NAME']}"


def run_worker(env: dict[str, str], *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.ingest", "--group", env["TEST_GROUP"], *arguments],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.mark.django_db(transaction=True)
def test_worker_killed_after_db_commit_reprocesses_without_applying_twice(
    world: WorkerWorld, make_update: Callable[..., Any]
) -> None:
    bus_settings = KafkaBusSettings(
        bootstrap_servers=kafka_servers(), topics=TopicsConfig(prefix=f"ingest-crash-{uuid.uuid4().hex[:8]}.")
    )
    bootstrap_topics(bus_settings)
    round_ = world.open_round(k=10)
    device = enroll(world, "car-crash")
    envelopes = [make_update(device, seed=seed, round_id=round_.round_id)[0] for seed in range(3)]
    with make_bus(bus_settings) as bus:
        for envelope in envelopes:
            bus.publish(Topic.UPDATES, envelope)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DATABASE_URL": shared_database_url(),
        "FEDNESTED_BUS": "kafka",
        "FEDNESTED_KAFKA_BOOTSTRAP": bus_settings.bootstrap_servers,
        "FEDNESTED_TOPIC_PREFIX": bus_settings.topics.prefix,
        "FEDNESTED_ARTIFACT_ROOT": str(world.root),
        "CELERY_BROKER_URL": "",
        "TEST_GROUP": "ingest-crash",
    }

    crashed = run_worker({**env, CRASH_POINT_ENV: "after_db_commit"}, "--idle-exit", "60")
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    # The first batch's transaction committed before the kill (the first message, and whichever others had arrived
    # with it); its offsets did not.
    committed = list(Update.objects.order_by("id").values_list("update_id", "status"))
    ids = [str(envelope.update_id) for envelope in envelopes]
    assert committed
    assert committed == [(update_id, UpdateStatus.BUFFERED) for update_id in ids[: len(committed)]]

    restarted = run_worker(env, "--idle-exit", "5")
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    rows = dict(Update.objects.values_list("update_id", "status"))
    assert rows == {update_id: UpdateStatus.BUFFERED for update_id in ids}
    # The redelivered batch was recognised as the same envelopes again and recorded as such, once each.
    resent = [event.data for event in AuditEvent.objects.filter(verb="federation.update.resent").order_by("id")]
    assert [data["update_id"] for data in resent] == [update_id for update_id, _ in committed]
    assert not AuditEvent.objects.filter(verb="federation.update.refused").exists()
    assert AuditEvent.objects.filter(verb="federation.update.buffered").count() == 3

    # Everything is committed now: a third run finds nothing to do.
    again = run_worker(env, "--idle-exit", "3")
    assert again.returncode == 0, again.stderr[-3000:]
    assert AuditEvent.objects.filter(verb="federation.update.resent").count() == len(committed)
