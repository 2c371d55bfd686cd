"""Starting Tier-1 jobs: a TrainingTask row is sent to its worker by Celery task name once the row is committed.

Apps never import workers (see ARCHITECTURE "Layout"): the task is named here and sent by name. Sending runs in an
on_commit callback, after the caller's work is committed: a failure there must not surface in the caller (an ingest
loop, an API request) as if its own work had failed, so it is recorded on the TrainingTask row instead.
"""

import logging
from functools import partial

from django.db import transaction

from apps.federation.choices import TaskKind

logger = logging.getLogger(__name__)

# TaskKind → (Celery task name, queue). The workers modules define tasks under exactly these names.
WORKER_TASKS: dict[str, tuple[str, str]] = {
    TaskKind.CORE_UPDATE: ("workers.training.run_core_update_task", "training"),
    TaskKind.EXPERT_AGGREGATION: ("workers.aggregation.aggregate_round_task", "aggregation"),
    TaskKind.EVALUATION: ("workers.evaluation.evaluate_version_task", "evaluation"),
}
ACTOR_LABEL = "system:jobs"


def send_training_task_on_commit(task_pk: int, kind: str) -> None:
    """After the current transaction commits, hand TrainingTask `task_pk` to the worker for `kind`."""
    name, queue = WORKER_TASKS[kind]
    transaction.on_commit(partial(_send, task_pk, name, queue))


def _fail(task_pk: int, message: str) -> None:
    from apps.federation.services import fail_training_task

    # A no-op when the task already recorded its own failure (it is no longer pending/running).
    fail_training_task(task_pk, error=message, actor_label=ACTOR_LABEL)


def _send(task_pk: int, name: str, queue: str) -> None:
    from controlplane.celery import app

    if not app.conf.task_always_eager:
        try:
            app.send_task(name, args=[task_pk], queue=queue)
        except Exception as error:
            # The broker is unreachable: the row says so, rather than staying pending with nobody to run it.
            logger.exception("training task %s could not be sent to queue %s", task_pk, queue)
            _fail(task_pk, f"could not be sent to queue {queue!r}: {type(error).__name__}: {error}")
        return
    # Broker-less mode: run the task here and now. send_task would only drop it into the in-memory broker.
    app.loader.import_default_modules()
    registered = app.tasks.get(name)
    if registered is None:
        message = f"no Celery task named {name!r} is registered (is the workers package installed?)"
        logger.error("training task %s not started: %s", task_pk, message)
        _fail(task_pk, message)
        return
    try:
        registered.apply_async(args=[task_pk], queue=queue)
    except Exception as error:
        # Eager tasks propagate their errors (CELERY_TASK_EAGER_PROPAGATES) into this on_commit callback; the caller
        # committed its own work already and must go on (e.g. the ingest loop with its next message).
        logger.exception("training task %s (%s) failed", task_pk, name)
        _fail(task_pk, f"{type(error).__name__}: {error}")
