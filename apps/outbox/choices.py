"""Kinds of outbox rows: one per way out of the control plane (apps/outbox/handlers.py delivers each)."""

from django.db import models


class OutboxKind(models.TextChoices):
    """How a row leaves: an event on the bus, a Celery task sent to its queue (or run by the embedded mode), an MLflow
    run or registry call, or DataHub metadata change proposals."""

    BUS_EVENT = "bus_event", "bus event"
    CELERY_TASK = "celery_task", "Celery task"
    MLFLOW = "mlflow", "MLflow call"
    DATAHUB = "datahub", "DataHub metadata"
