"""`fednested tier1 aggregate-experts`: the update consumer and the aggregation of a data centre without the web
server, as a real process on the real database: one signed update envelope in (on the embedded bus; Kafka goes
through the same consumer, tested with the ingest worker), a window aggregated into a registered candidate and
evaluated; it stops cleanly on --max-seconds (SIGTERM) and refuses to start without a database."""

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml
from django.db import connection

from apps.federation.choices import TaskKind, TaskStatus, UpdateStatus
from apps.federation.models import TrainingTask, Update
from apps.registry.models import ModelVersion
from fednested.messaging import EmbeddedBusSettings, Topic, TopicsConfig, make_bus
from tests.federation_world import WorkerWorld, enroll
from tests.federation_world import base_template as base_template  # fixtures the world needs
from tests.federation_world import make_update as make_update
from tests.federation_world import world as world

REPO = Path(__file__).resolve().parents[3]
CLI = [sys.executable, "-c", "from fednested.cli import main; main()", "tier1", "aggregate-experts"]


def database_url() -> str:
    """pytest-django's test database, for the consumer process."""
    db = connection.settings_dict
    if connection.vendor != "postgresql":
        pytest.skip("the consumer process must share the test database: needs PostgreSQL (scripts/services.sh)")
    credentials = f"{quote(db['USER'])}:{quote(db['PASSWORD'])}@" if db["USER"] else ""
    return f"postgres://{credentials}{db['HOST']}:{db['PORT']}/{db['NAME']}"


def run_cli(config: Path, env: dict[str, str], *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "--config", str(config), *arguments],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.mark.services
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.django_db(transaction=True)
def test_aggregate_experts_consumes_an_update_and_registers_the_windows_candidate(
    world: WorkerWorld, make_update: Callable[..., Any], tmp_path: Path
) -> None:
    bus_settings = EmbeddedBusSettings(path=tmp_path / "bus.sqlite3", topics=TopicsConfig(prefix="dc."))
    round_ = world.open_round(k=1)
    device = enroll(world, "car-dc")
    envelope, _ = make_update(device, round_id=round_.round_id)
    with make_bus(bus_settings) as bus:
        bus.publish(Topic.UPDATES, envelope)
    config = tmp_path / "tier1.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "kind": "tier1",
                "storage": {"artifact_root": str(world.root)},
                "bus": {"kind": "embedded", "path": str(bus_settings.path), "topics": {"prefix": "dc."}},
            }
        ),
        encoding="utf-8",
    )
    # A broker in the environment is ignored: the command runs the aggregation in its own process.
    env = {**os.environ, "DATABASE_URL": database_url(), "CELERY_BROKER_URL": "redis://127.0.0.1:1/0"}
    result = run_cli(config, env, "--max-messages", "1", "--max-seconds", "180", "--poll-timeout", "0.2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert Update.objects.get(update_id=str(envelope.update_id)).status == UpdateStatus.APPLIED
    aggregation = TrainingTask.objects.get(kind=TaskKind.EXPERT_AGGREGATION, round=round_)
    assert (aggregation.status, aggregation.error) == (TaskStatus.SUCCEEDED, "")
    candidate = ModelVersion.objects.get(version_id=f"{round_.round_id}-candidate")
    assert candidate.parent == world.base
    assert (world.root / "versions" / candidate.version_id / "manifest.json").is_file()
    # Its evaluation ran in the same process, as the aggregation's next job.
    evaluation = TrainingTask.objects.get(kind=TaskKind.EVALUATION)
    assert (evaluation.params, evaluation.status) == ({"version_id": candidate.version_id}, TaskStatus.SUCCEEDED)


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_aggregate_experts_stops_on_max_seconds_and_needs_a_database(tmp_path: Path) -> None:
    config = tmp_path / "tier1.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "kind": "tier1",
                "storage": {"artifact_root": str(tmp_path / "artifacts")},
                "bus": {"kind": "embedded", "path": str(tmp_path / "bus.sqlite3")},
            }
        ),
        encoding="utf-8",
    )
    env = {**os.environ, "DATABASE_URL": database_url()}
    stopped = run_cli(config, env, "--max-seconds", "3", "--poll-timeout", "0.2")
    # SIGTERM after 3 s: the consumer leaves its group and exits 0, having handled nothing.
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "--max-seconds 3 reached: stopping the consumer" in stopped.stderr
    # (whether the signal came before the consumer was up or after, nothing was consumed)
    assert "ingest worker stopped after 0 messages" in stopped.stderr or "before it consumed anything" in stopped.stderr
    without = {name: value for name, value in os.environ.items() if name != "DATABASE_URL"}
    refused = run_cli(config, without)
    assert refused.returncode == 1
    assert "error: DATABASE_URL is not set" in refused.stderr
