"""Choices of the governance app."""

from django.db import models


class ApprovalStatus(models.TextChoices):
    """Where an approval request stands; only `pending` can change, and only once."""

    PENDING = "pending", "Pending"
    APPROVED = "approved", "Approved"
    REJECTED = "rejected", "Rejected"


class Decision(models.TextChoices):
    """An officer's decision on an approval request."""

    APPROVED = "approved", "Approved"
    REJECTED = "rejected", "Rejected"
