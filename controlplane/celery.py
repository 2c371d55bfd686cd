"""The Celery app `controlplane`: configured from Django settings (CELERY_*), one queue per job kind."""

import os

from celery import Celery
from celery.signals import worker_init
from kombu.entity import Queue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")

# One queue per worker module (workers/<queue>.py), so a deployment can give aggregation and evaluation workers of
# different sizes; apps/federation/jobs.py names the tasks these modules define. `schedules` takes the outer loop's
# periodic tasks (apps/schedules/services.py names them), which `celery beat` sends.
JOB_QUEUES = ("aggregation", "evaluation", "schedules", "training")

app = Celery("controlplane")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.task_queues = tuple(Queue(name, routing_key=name) for name in JOB_QUEUES)  # type: ignore[no-untyped-call]
# A task declared in workers/<kind>.py goes to the queue of its kind unless it names one itself.
app.conf.task_routes = {f"workers.{name}.*": {"queue": name} for name in JOB_QUEUES}
for _module in JOB_QUEUES:
    # workers/ has one module per job kind (workers/training.py, …), not Django's tasks.py convention.
    app.autodiscover_tasks(["workers"], related_name=_module)

# Task run times and states, and the worker's metrics port (FEDNESTED_CELERY_METRICS_PORT).
import controlplane.metrics.celery_signals  # noqa: F401, E402


@worker_init.connect  # type: ignore[untyped-decorator]
def _trace_worker(**_: object) -> None:
    """A Celery worker process traces its task runs, continuing the trace of each message's headers. Set up in the
    worker's main process: the SDK restarts its export thread in prefork children."""
    from controlplane.observability import setup_tracing
    from fednested.observability.tracing import WORKER_CELERY

    setup_tracing(WORKER_CELERY, celery=True)
