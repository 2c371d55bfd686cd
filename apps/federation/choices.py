"""Choices of the federation app: statuses of devices, rounds, tasks and updates."""

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
