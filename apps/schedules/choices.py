"""Choices of the schedules app."""

from django.db import models


class OutcomeStatus(models.TextChoices):
    """What the last run of a periodic task came to."""

    # It ran and did its work (a task created, or windows checked; `detail` says what).
    OK = "ok", "OK"
    # It refused to act: bad params on the periodic task, no champion to evaluate, a task the registry refused.
    ERROR = "error", "Error"
