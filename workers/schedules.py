"""The outer loop's periodic tasks, fired by `celery beat` (django-celery-beat's DatabaseScheduler reading the
PeriodicTask rows) on the `schedules` queue, and the embedded mode's stand-in for beat: `serve_schedules`, a thread
of the ingest worker that reads the same rows through the same scheduler classes and runs the due tasks in-process.

The tasks are thin: what each run does and how its outcome is recorded is apps/schedules/services.py. A schedule's
name arrives in the `periodic_task_name` header django-celery-beat puts on every message it sends, so a run can record
its outcome on the schedule that fired it.
"""

import logging
import threading
from typing import Any

from celery import Task, shared_task
from celery.beat import SchedulingError
from django.db import InterfaceError, OperationalError, connections
from django_celery_beat.schedulers import DEFAULT_MAX_INTERVAL, DatabaseScheduler

from apps.schedules.services import (
    CLOSE_DUE_WINDOWS_TASK,
    EVALUATE_CHAMPION_TASK,
    START_CORE_UPDATE_TASK,
    close_due_windows,
    evaluate_champion,
    start_core_update,
)

logger = logging.getLogger(__name__)

# The header django-celery-beat's ModelEntry sets to the PeriodicTask's name on every message it sends.
SCHEDULE_HEADER = "periodic_task_name"
# Scheduled runs are cheap and fire again at their next time: a database outage is retried a few times, no more.
RETRY = {"autoretry_for": (OperationalError, InterfaceError), "retry_backoff": True, "max_retries": 3}


def schedule_of(task: Task) -> str | None:
    """The name of the periodic task that fired this run, or None for a run sent by hand. A worker exposes custom
    message headers as attributes of the request; `Task.apply` (the embedded scheduler) keeps them in `headers`."""
    request = task.request
    name = getattr(request, SCHEDULE_HEADER, None) or (getattr(request, "headers", None) or {}).get(SCHEDULE_HEADER)
    return name if isinstance(name, str) and name else None


@shared_task(bind=True, name=CLOSE_DUE_WINDOWS_TASK, **RETRY)  # type: ignore[untyped-decorator]
def close_due_windows_task(self: Task) -> list[int]:
    """Aggregation tasks for the windows whose deadline passed (or whose awaited candidate was decided)."""
    return close_due_windows(schedule=schedule_of(self))


@shared_task(bind=True, name=START_CORE_UPDATE_TASK, **RETRY)  # type: ignore[untyped-decorator]
def start_core_update_task(self: Task, **params: Any) -> int | None:
    """A core_update TrainingTask with the periodic task's kwargs as its params; None (and an error recorded on the
    schedule) when they are refused."""
    task = start_core_update(schedule=schedule_of(self), params=params)
    return task.pk if task is not None else None


@shared_task(bind=True, name=EVALUATE_CHAMPION_TASK, **RETRY)  # type: ignore[untyped-decorator]
def evaluate_champion_task(self: Task, **params: Any) -> int | None:
    """An evaluation TrainingTask for the current champion; the kwargs are its other params."""
    task = evaluate_champion(schedule=schedule_of(self), params=params)
    return task.pk if task is not None else None


class InProcessScheduler(DatabaseScheduler):  # type: ignore[misc]
    """django-celery-beat's DatabaseScheduler without a broker: the same PeriodicTask rows, schedules, last-run
    bookkeeping and change detection (an edit in the admin takes effect within DEFAULT_MAX_INTERVAL seconds), but a
    due entry runs here, synchronously, with `Task.apply` and the headers beat would have sent. The training tasks a
    run creates go to this process's job thread (apps/federation/jobs.py InProcessJobs), as any embedded job does."""

    @property
    def producer(self) -> None:
        # Beat's tick passes `self.producer` to apply_entry; the base class would connect to the broker for it.
        return None

    def apply_async(self, entry: Any, producer: Any = None, advance: bool = True, **kwargs: Any) -> Any:
        entry = self.reserve(entry) if advance else entry
        try:
            task = self.app.tasks.get(entry.task)
            if task is None:
                raise SchedulingError(f"schedule {entry.name!r}: no task named {entry.task!r} is registered")
            headers = {**(entry.options.get("headers") or {}), SCHEDULE_HEADER: entry.name}
            result = task.apply(args=list(entry.args), kwargs=dict(entry.kwargs), headers=headers)
            if result.failed():
                logger.error("schedule %r (%s) failed: %r", entry.name, entry.task, result.result)
            return result
        finally:
            self._tasks_since_sync += 1
            if self.should_sync():
                self._do_sync()


def serve_schedules(stop: threading.Event) -> None:
    """Run the schedule in this thread until `stop` is set: the embedded mode's beat (FEDNESTED_JOBS_IN_PROCESS).

    A database error is logged and the scheduler rebuilt after a pause, so an outage delays schedules, never ends
    them; the thread's own database connections are closed when it ends.
    """
    from controlplane.celery import app

    app.loader.import_default_modules()
    scheduler: InProcessScheduler | None = None
    try:
        while not stop.is_set():
            try:
                if scheduler is None:
                    scheduler = InProcessScheduler(app=app)
                delay = scheduler.tick()
            except Exception:
                logger.exception("embedded scheduler: tick failed; starting again in %s s", DEFAULT_MAX_INTERVAL)
                scheduler = None
                connections.close_all()
                delay = DEFAULT_MAX_INTERVAL
            stop.wait(delay)
    finally:
        if scheduler is not None:
            scheduler.close()
        connections.close_all()


def start_schedule_thread(stop: threading.Event) -> threading.Thread:
    """`serve_schedules` in a thread of its own (not a daemon: it saves the schedule's run times when stopped)."""
    thread = threading.Thread(target=serve_schedules, args=(stop,), name="fednested-schedules")
    thread.start()
    return thread
