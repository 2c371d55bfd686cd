"""Choices of the accounts app: the roles that decide what a user may do."""

from django.db import models


class Role(models.TextChoices):
    """What a user is; a user without a role (an "outsider") may do nothing."""

    OFFICER = "officer", "Governance officer"
    ENGINEER = "engineer", "ML engineer"
    DEVICE = "device", "Edge device"
    ADMIN = "admin", "Administrator"
    # The control plane's own automation (workers): it requests approvals; it has no API rights and no credentials.
    SYSTEM = "system", "System (automation)"
