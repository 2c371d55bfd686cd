"""Celery worker metrics: each task's run time and final state (from Celery's task signals), and the worker's
metrics port (FEDNESTED_CELERY_METRICS_PORT, 0 for none), opened once the worker is ready.

Imported by controlplane/celery.py, so every worker of the app connects these handlers. They observe only; no
business logic runs in a signal (house style). The solo and threads pools run tasks in the worker's own process,
whose port then shows them; the prefork pool runs them in children, whose metrics reach the port only through
prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, controlplane/metrics/exposition.py).
"""

import logging
import os
import threading
import time
from typing import Any

from celery import Task
from celery.signals import task_postrun, task_prerun, worker_process_shutdown, worker_ready
from django.conf import settings
from prometheus_client import multiprocess

from controlplane.metrics.exposition import multiprocess_directory, serve_metrics
from controlplane.metrics.families import CELERY_TASK_DURATION, CELERY_TASKS

logger = logging.getLogger(__name__)

# task id → perf_counter at its start; a threads pool runs several at once.
_started: dict[str, float] = {}
_started_lock = threading.Lock()


@task_prerun.connect  # type: ignore[untyped-decorator]  # celery ships no type hints
def _task_started(task_id: str | None = None, **_: Any) -> None:
    if task_id is not None:
        with _started_lock:
            _started[task_id] = time.perf_counter()


@task_postrun.connect  # type: ignore[untyped-decorator]  # celery ships no type hints
def _task_finished(task_id: str | None = None, task: Task | None = None, state: str | None = None, **_: Any) -> None:
    with _started_lock:
        started = _started.pop(task_id, None) if task_id is not None else None
    # A task name is one the worker registered (an unknown name is never run), so the label stays bounded.
    name = str(task.name) if task is not None else "unknown"
    CELERY_TASKS.labels(name, (state or "unknown").lower()).inc()
    if started is not None:
        CELERY_TASK_DURATION.labels(name).observe(time.perf_counter() - started)


@worker_ready.connect  # type: ignore[untyped-decorator]  # celery ships no type hints
def _serve_worker_metrics(sender: Any = None, **_: Any) -> None:
    port: int = settings.FEDNESTED_CELERY_METRICS_PORT
    if not port:
        return
    pool = type(getattr(sender, "pool", None)).__module__
    if pool.endswith(".prefork") and multiprocess_directory() is None:
        logger.warning(
            "celery worker: the prefork pool runs tasks in child processes whose metrics this port cannot see; "
            "run with --pool solo (or threads), or set PROMETHEUS_MULTIPROC_DIR (docs/operations/production.md)"
        )
    serve_metrics(port, settings.FEDNESTED_METRICS_ADDRESS, process="celery worker")


@worker_process_shutdown.connect  # type: ignore[untyped-decorator]  # celery ships no type hints
def _child_exited(pid: int | None = None, **_: Any) -> None:
    # Multiprocess mode keeps a dead child's gauges unless told; its counters and histograms stay summed in.
    if multiprocess_directory() is not None:
        multiprocess.mark_process_dead(pid if pid is not None else os.getpid())  # type: ignore[no-untyped-call]
