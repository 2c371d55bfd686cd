"""The metrics each process records as things happen, declared once: the web server's requests, the updates taken in
by the ingest worker and the API, aggregation runs and Celery tasks.

Every label takes values from a fixed set (route names, status codes, outcome statuses, RejectionCode values, task
names), never from what a client sends, so no request can grow the number of series.
"""

import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, ParamSpec, Protocol, TypeVar

from prometheus_client import Counter, Histogram

if TYPE_CHECKING:
    from apps.federation.updates import UpdateOutcome

# Every metric name starts with this, so the dashboard test can tell ours from Prometheus' own.
PREFIX = "fednested_"

# Request durations from a cached list page (ms) to a 64 MiB payload upload over a slow link (a minute).
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Aggregation and evaluation of a window: seconds for the tiny demo model, up to the 2 h lost-task timeout.
JOB_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0)
# Methods Django serves; anything else a client invents is counted as "other".
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

HTTP_REQUESTS = Counter(
    "fednested_http_requests",
    "HTTP requests answered by the control plane, by route name, method and status code.",
    ["view", "method", "status"],
)
HTTP_REQUEST_DURATION = Histogram(
    "fednested_http_request_duration_seconds",
    "Time from the request reaching Django's middleware to its response, by route name.",
    ["view", "method"],
    buckets=REQUEST_BUCKETS,
)
UPDATES = Counter(
    "fednested_updates",
    "Update envelopes taken in, by entry point (bus: the ingest worker; api: POST /api/v1/updates/), outcome "
    "(buffered, duplicate, rejected, refused) and reason (a RejectionCode value; 'none' for buffered and duplicate).",
    ["source", "outcome", "reason"],
)
AGGREGATION_DURATION = Histogram(
    "fednested_aggregation_duration_seconds",
    "Runs of a window's aggregation (workers/aggregation.py aggregate_round), by outcome: candidate (a candidate "
    "version was registered), nothing_applied (every buffered update failed re-validation), not_claimed (another "
    "task had the window), failed (raised; the window was reopened).",
    ["outcome"],
    buckets=JOB_BUCKETS,
)
CELERY_TASKS = Counter(
    "fednested_celery_tasks",
    "Celery tasks run by this worker, by task name and final state (success, failure, retry, …).",
    ["task", "state"],
)
CELERY_TASK_DURATION = Histogram(
    "fednested_celery_task_duration_seconds",
    "Run time of Celery tasks on this worker, by task name.",
    ["task"],
    buckets=JOB_BUCKETS,
)


def record_request(view: str, method: str, status: int, duration_s: float) -> None:
    """Count one answered request; `view` must be a route name or pattern (bounded), never the raw path."""
    method = method if method in KNOWN_METHODS else "other"
    HTTP_REQUESTS.labels(view, method, str(status)).inc()
    HTTP_REQUEST_DURATION.labels(view, method).observe(duration_s)


def record_outcome(outcome: "UpdateOutcome", *, source: str) -> None:
    """Count what became of one envelope taken in from `source` ('bus' or 'api')."""
    reason = outcome.code.value if outcome.code is not None else "none"
    UPDATES.labels(source, outcome.status, reason).inc()


class _Aggregated(Protocol):
    """What an aggregation run returns when it claimed its window: the candidate's id, None when nothing passed."""

    @property
    def version_id(self) -> str | None: ...


P = ParamSpec("P")
R = TypeVar("R", bound=_Aggregated | None)


def timed_aggregation(function: Callable[P, R]) -> Callable[P, R]:
    """Observe each call of `function` (an aggregation run) in AGGREGATION_DURATION, labelled by its outcome.

    Timed where the aggregation runs rather than through Celery's signals, so the embedded mode's jobs (a thread of
    the web server, apps/federation/jobs.py) are measured too.
    """

    @functools.wraps(function)
    def timed(*args: P.args, **kwargs: P.kwargs) -> R:
        started = time.perf_counter()
        try:
            result = function(*args, **kwargs)
        except BaseException:
            AGGREGATION_DURATION.labels("failed").observe(time.perf_counter() - started)
            raise
        if result is None:
            outcome = "not_claimed"
        else:
            outcome = "candidate" if result.version_id is not None else "nothing_applied"
        AGGREGATION_DURATION.labels(outcome).observe(time.perf_counter() - started)
        return result

    return timed
