"""Schedules fire for real: `celery beat` with django-celery-beat's DatabaseScheduler sends the deadline check and a
core update with bad params through Redis to a real Celery worker process, and the embedded mode's scheduler thread
(no broker) fires the same PeriodicTask rows in-process. Both are bounded: periodic tasks every second, a wait of at
most WAIT_S."""

import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from django.conf import settings as django_settings

from apps.demo.processes import ManagedProcess, start_process
from apps.federation.choices import TaskKind, TaskStatus
from apps.federation.models import TrainingTask
from apps.schedules.choices import OutcomeStatus
from apps.schedules.models import ScheduleOutcome
from apps.schedules.services import CLOSE_DUE_WINDOWS_TASK, START_CORE_UPDATE_TASK
from tests.apps.schedules.conftest import AGGREGATION_TIMEOUT_S
from tests.test_end_to_end import child_database_url, private_broker_url, service_setting
from workers.schedules import serve_schedules

pytestmark = pytest.mark.django_db(transaction=True)

WAIT_S = 90.0
T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T | None], processes: list[ManagedProcess]) -> T:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for process in processes:
            assert process.running, process.failure(f"stopped while waiting for {what}")
        found = check()
        if found is not None:
            return found
        time.sleep(0.5)
    tails = "\n".join(f"--- {p.name}:\n{p.log_tail(30)}" for p in processes)
    raise AssertionError(f"timed out after {WAIT_S:.0f} s waiting for {what}\n{tails}")


def outcome_of(name: str, status: OutcomeStatus) -> ScheduleOutcome | None:
    return ScheduleOutcome.objects.filter(periodic_task__name=name, status=status).first()


def lost_task_failed(task: TrainingTask) -> TrainingTask | None:
    task.refresh_from_db()
    return task if task.status == TaskStatus.FAILED else None


def check_outcomes(lost: TrainingTask, bad: ScheduleOutcome) -> None:
    assert "presumed lost" in lost.error
    assert bad.detail.startswith("no core_update task created: "), bad.detail
    assert not TrainingTask.objects.filter(kind=TaskKind.CORE_UPDATE).exists()


@pytest.fixture
def beat_and_worker(tmp_path: Path) -> Iterator[Callable[[], list[ManagedProcess]]]:
    """Starts `celery beat` and a worker on the `schedules` queue against the test's database and a Redis database of
    their own; stops both."""
    broker = private_broker_url(service_setting("CELERY_BROKER_URL", scheme="redis"))
    env = {
        **os.environ,
        "DATABASE_URL": child_database_url(),
        "CELERY_BROKER_URL": broker,
        "FEDNESTED_AGGREGATION_TIMEOUT_S": str(AGGREGATION_TIMEOUT_S),
        "PYTHONPATH": os.pathsep.join([str(django_settings.BASE_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "PYTHONUNBUFFERED": "1",
    }
    celery = [sys.executable, "-m", "celery", "-A", "controlplane"]
    processes: list[ManagedProcess] = []

    def start() -> list[ManagedProcess]:
        for name, argv in (
            (
                "celery-worker",
                [
                    *celery,
                    "worker",
                    "--pool",
                    "solo",
                    "--queues",
                    "schedules",
                    "--hostname",
                    f"schedules-{uuid.uuid4().hex[:8]}@%h",
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                    "--loglevel",
                    "INFO",
                ],
            ),
            # As docs/operations/serving.md runs it (the scheduler is also the settings' CELERY_BEAT_SCHEDULER).
            (
                "celery-beat",
                [
                    *celery,
                    "beat",
                    "--scheduler",
                    "django_celery_beat.schedulers:DatabaseScheduler",
                    "--loglevel",
                    "INFO",
                ],
            ),
        ):
            processes.append(start_process(name, argv, env=env, log_path=tmp_path / f"{name}.log", cwd=tmp_path))
        return processes

    try:
        yield start
    finally:
        for process in reversed(processes):
            process.stop(timeout_s=15)


@pytest.mark.services
def test_beat_fires_the_deadline_check_and_a_bad_core_update_through_redis_to_a_worker(
    lost_aggregation: TrainingTask,
    every_second: Callable[..., Any],
    beat_and_worker: Callable[[], list[ManagedProcess]],
) -> None:
    every_second("test-deadlines", CLOSE_DUE_WINDOWS_TASK)
    every_second("test-core-update-bad", START_CORE_UPDATE_TASK, bogus=True)
    processes = beat_and_worker()
    lost = wait_for("the worker to fail the lost aggregation", lambda: lost_task_failed(lost_aggregation), processes)
    deadline_run = wait_for(
        "the deadline run's outcome", lambda: outcome_of("test-deadlines", OutcomeStatus.OK), processes
    )
    bad = wait_for(
        "the bad core update's error", lambda: outcome_of("test-core-update-bad", OutcomeStatus.ERROR), processes
    )
    check_outcomes(lost, bad)
    assert deadline_run.detail == "no window was due"
    # Beat sent them (its log says so) and the worker ran them: nothing ran in this process.
    beat_log = processes[1].log_path.read_text()
    assert "Sending due task test-deadlines (workers.schedules.close_due_windows_task)" in beat_log
    assert "workers.schedules.close_due_windows_task" in processes[0].log_path.read_text()


def test_the_embedded_scheduler_thread_fires_the_same_rows_without_a_broker(
    lost_aggregation: TrainingTask, every_second: Callable[..., Any]
) -> None:
    every_second("test-deadlines", CLOSE_DUE_WINDOWS_TASK)
    every_second("test-core-update-bad", START_CORE_UPDATE_TASK, bogus=True)
    stop = threading.Event()
    thread = threading.Thread(target=serve_schedules, args=(stop,))
    thread.start()
    try:
        lost = wait_for(
            "the embedded scheduler to fail the lost aggregation", lambda: lost_task_failed(lost_aggregation), []
        )
        bad = wait_for(
            "the bad core update's error", lambda: outcome_of("test-core-update-bad", OutcomeStatus.ERROR), []
        )
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive(), "the scheduler thread did not stop when asked"
    check_outcomes(lost, bad)
    assert outcome_of("test-deadlines", OutcomeStatus.OK) is not None
