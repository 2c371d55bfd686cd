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


class ActorKind(models.TextChoices):
    """What kind of party acted in an audit event (apps.governance.actors.Actor).

    `anonymous` is a party the control plane could not identify: it only ever appears on refused access (a request
    with no or an unknown credential), never on a state change.
    """

    PERSON = "person", "Person"
    DEVICE = "device", "Edge device"
    AUTOMATION = "automation", "Automation"
    ANONYMOUS = "anonymous", "Unidentified"
