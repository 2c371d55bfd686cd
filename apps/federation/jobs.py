"""Starting Tier-1 jobs: a TrainingTask row is sent to its worker by Celery task name once the row is committed.

Apps never import workers (see ARCHITECTURE "Layout"): the task is named here and sent by name.
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


def send_training_task_on_commit(task_pk: int, kind: str) -> None:
    """After the current transaction commits, hand TrainingTask `task_pk` to the worker for `kind`."""
    name, queue = WORKER_TASKS[kind]
    transaction.on_commit(partial(_send, task_pk, name, queue))


def _send(task_pk: int, name: str, queue: str) -> None:
    from controlplane.celery import app

    if not app.conf.task_always_eager:
        app.send_task(name, args=[task_pk], queue=queue)
        return
    # Broker-less mode: run the task here and now. send_task would only drop it into the in-memory broker.
    app.loader.import_default_modules()
    registered = app.tasks.get(name)
    if registered is None:
        from apps.federation.services import fail_training_task

        message = f"no Celery task named {name!r} is registered (is the workers package installed?)"
        logger.error("training task %s not started: %s", task_pk, message)
        fail_training_task(task_pk, error=message)
        return
    registered.apply_async(args=[task_pk], queue=queue)
