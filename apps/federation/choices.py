"""Choices of the federation app: statuses of devices, rounds, tasks and updates."""

from django.db import models


class DeviceStatus(models.TextChoices):
    """Whether a device may still talk to the control plane."""

    ACTIVE = "active", "Active"
    REVOKED = "revoked", "Revoked"


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
    """An edge update's way through ingestion: received → validated → buffered → applied, or rejected."""

    RECEIVED = "received", "Received"
    VALIDATED = "validated", "Validated"
    REJECTED = "rejected", "Rejected"
    BUFFERED = "buffered", "Buffered"
    APPLIED = "applied", "Applied"
