"""Choices of the federation app: statuses of devices, rounds, tasks and updates."""

import re

from django.db import models


class DeviceStatus(models.TextChoices):
    """Whether a device may still talk to the control plane."""

    ACTIVE = "active", "Active"
    REVOKED = "revoked", "Revoked"


class RoundMode(models.TextChoices):
    """How a round (aggregation window) takes updates: see docs/ARCHITECTURE.md, "Aggregation (middle loop)"."""

    # FedBuff: any update on an ancestor of the champion within max_staleness; the aggregate goes onto the champion
    # current at aggregation time; the next window opens when this one is aggregated (updates arriving meanwhile
    # wait for it).
    ASYNC = "async", "Asynchronous (buffered)"
    # A fixed cohort trains one fixed base; aggregation when every member reported, or at the deadline with enough.
    SYNC = "sync", "Synchronous (cohort)"


class RoundStatus(models.TextChoices):
    """A round collects updates while open, is claimed once for aggregation, then closes."""

    OPEN = "open", "Open"
    AGGREGATING = "aggregating", "Aggregating"
    CLOSED = "closed", "Closed"
    CANCELLED = "cancelled", "Cancelled"


class TaskKind(models.TextChoices):
    """Kinds of Tier-1 job (the same names as the TrainingTask wire schema)."""

    CORE_UPDATE = "core_update", "Core update"
    EXPERT_AGGREGATION = "expert_aggregation", "Expert aggregation"
    EVALUATION = "evaluation", "Evaluation"


# How a job's run is named wherever it is referred to: a version's RUN lineage edge (written by the workers), the
# MLflow run mirroring it and the DataHub DataProcessInstance. Declared once so the three stay one name: the mirrors
# find a version's producing job by parsing the edge its worker wrote.
TASK_RUN_PREFIX: dict[str, str] = {
    TaskKind.CORE_UPDATE: "core-update",
    TaskKind.EXPERT_AGGREGATION: "aggregation",
    TaskKind.EVALUATION: "evaluation",
}
TASK_RUN_REF = re.compile(rf"^({'|'.join(map(re.escape, TASK_RUN_PREFIX.values()))})-task-([0-9]{{1,18}})$")


def task_run_ref(kind: str, pk: int) -> str:
    """The run name of the task `pk` of `kind` ("<prefix>-task-<pk>", e.g. "core-update-task-7")."""
    try:
        return f"{TASK_RUN_PREFIX[kind]}-task-{pk}"
    except KeyError:
        raise ValueError(f"no run name for task kind {kind!r}: use one of {', '.join(TASK_RUN_PREFIX)}") from None


def parse_task_run_ref(ref: str) -> tuple[TaskKind, int] | None:
    """(kind, pk) of a run name `task_run_ref` made; None for any other name (a run no job of ours ran, such as the
    bootstrap's). The pk is bounded to 18 digits so a hostile edge cannot make an integer the database refuses."""
    match = TASK_RUN_REF.match(ref)
    if match is None:
        return None
    kind = next(kind for kind, prefix in TASK_RUN_PREFIX.items() if prefix == match[1])
    return TaskKind(kind), int(match[2])


class TaskStatus(models.TextChoices):
    """Job state; the database, not Celery's result backend, is its source of truth."""

    PENDING = "pending", "Pending"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


class UpdateStatus(models.TextChoices):
    """An edge update is recorded once it was checked: buffered (waiting for aggregation) or rejected with its
    reason; a buffered update is then applied in a candidate, or rejected when re-checked at aggregation."""

    REJECTED = "rejected", "Rejected"
    BUFFERED = "buffered", "Buffered"
    APPLIED = "applied", "Applied"
