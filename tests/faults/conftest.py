"""The fault suite's one running system, shared by its tests in file order: private services, a registered tiny v1,
two enrolled devices, an asynchronous series of K=2 windows, and the supervised workers. Its table of trials is
printed when the module ends."""

import os
import shutil
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.test import override_settings
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from apps.accounts.choices import Role
from apps.accounts.services import create_user_with_role
from apps.federation.services import open_round
from apps.governance.actors import Actor
from apps.schedules.services import CLOSE_DUE_WINDOWS_TASK
from fednested.messaging import KafkaBusSettings, TopicsConfig, bootstrap_topics
from tests.faults.harness import (
    AGGREGATION_TIMEOUT_S,
    REPO,
    Harness,
    K,
    PrivateServices,
    ServicesUnavailable,
    database_at,
    worker_commands,
)
from tests.federation_world import BaseTemplate, WorkerWorld, base_template, enroll, register_base_version

__all__ = ["artifact_store", "base_template", "harness"]
# Tables of the module's runs, printed at the end of the pytest run.
TABLES: list[str] = []


def _unavailable(problem: str) -> None:
    if os.environ.get("FEDNESTED_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{problem}; FEDNESTED_REQUIRE_SERVICES=1 says the services must be there")
    pytest.skip(f"{problem}: the fault suite starts PostgreSQL, Redis and Kafka of its own with scripts/services.sh")


@pytest.fixture(scope="module")
def harness(
    base_template: BaseTemplate, tmp_path_factory: pytest.TempPathFactory, django_db_blocker: Any
) -> Iterator[Harness]:
    root = tmp_path_factory.mktemp("faults")
    try:
        services = PrivateServices.start(root / "services")
    except ServicesUnavailable as error:
        _unavailable(str(error))
    try:
        with django_db_blocker.unblock(), database_at(services.env["DATABASE_URL"]):
            yield from _running_system(root, services, base_template)
    except ServicesUnavailable as error:
        _unavailable(str(error))
    finally:
        services.stop()


def _running_system(root: Path, services: PrivateServices, template: BaseTemplate) -> Iterator[Harness]:
    call_command("migrate", verbosity=0)
    store = root / "artifacts"
    shutil.copytree(template.root, store)
    bus_settings = KafkaBusSettings(
        bootstrap_servers=services.env["FEDNESTED_KAFKA_BOOTSTRAP"], topics=TopicsConfig(prefix="faults.")
    )
    bootstrap_topics(bus_settings)
    overrides = {
        "FEDNESTED_BUS": "kafka",
        "FEDNESTED_KAFKA_BOOTSTRAP": bus_settings.bootstrap_servers,
        "FEDNESTED_TOPIC_PREFIX": bus_settings.topics.prefix,
        "FEDNESTED_ARTIFACT_ROOT": store,
        "FEDNESTED_AGGREGATION_TIMEOUT_S": AGGREGATION_TIMEOUT_S,
    }
    env = {
        **os.environ,
        "DATABASE_URL": services.env["DATABASE_URL"],
        "REDIS_URL": services.env["REDIS_URL"],
        "CELERY_BROKER_URL": services.env["CELERY_BROKER_URL"],
        **{name: str(value) for name, value in overrides.items()},
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }
    with override_settings(**overrides):
        engineer = create_user_with_role(username="erin-engineer", role=Role.ENGINEER, actor=Actor.automation("faults"))
        officer = create_user_with_role(username="olivia-officer", role=Role.OFFICER, actor=Actor.automation("faults"))
        family, v1 = register_base_version(store, engineer)
        # The deadline check the beat process fires (tests/faults/harness.py): every second, whatever a flush of the
        # test database left of the migration's default schedule.
        every_second, _ = IntervalSchedule.objects.get_or_create(every=1, period=IntervalSchedule.SECONDS)
        PeriodicTask.objects.update_or_create(
            name="aggregation-deadlines",
            defaults={"task": CLOSE_DUE_WINDOWS_TASK, "interval": every_second, "crontab": None, "enabled": True},
        )
        world = WorkerWorld(root=store, shapes=template.shapes, engineer=engineer, family=family, base=v1)
        devices = [enroll(world, f"fault-car-{index}") for index in range(K)]
        open_round(
            base_version=v1,
            buffer_size_k=K,
            deadline_at=timezone.now() + timedelta(hours=1),
            actor=engineer,
            round_id="faults",
        )
        system = Harness(
            root=root,
            world=world,
            services=services,
            bus_settings=bus_settings,
            env=env,
            officer=officer,
            devices=devices,
        )
        for name, argv in worker_commands(sys.executable).items():
            system.add_worker(name, argv)
            system.start(name)
        try:
            system.wait_ready(timeout_s=180)
            yield system
        finally:
            system.stop_all()
            TABLES.append(f"fault-injection trials (worker logs under {root / 'logs'}):\n{system.table()}")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The table of trials, after the run's results (outside output capture, so a passing run shows it too)."""
    for table in TABLES:
        terminalreporter.section("fault injection")
        for line in table.splitlines():
            terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def artifact_store(harness: Harness) -> Iterator[Path]:
    """The suite's store, instead of tests/conftest.py's empty one per test: the workers and this process share it."""
    with override_settings(FEDNESTED_ARTIFACT_ROOT=harness.world.root):
        yield harness.world.root
