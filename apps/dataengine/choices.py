"""Choices of the data engine: kinds of rule and the states of a trigger."""

from django.db import models


class RuleKind(models.TextChoices):
    """What a rule looks for in a domain's signals (apps/dataengine/rules.py evaluates each)."""

    # The mean edge loss of the later half of the domain's last N reports exceeds the earlier half's by min_rise.
    RISING_LOSS = "rising_loss", "Rising edge loss"
    # The domain has edge traffic but no protected held-out evaluation set (the promotion gate cannot vouch for it).
    UNCOVERED_DOMAIN = "uncovered_domain", "Domain without a protected evaluation set"


class TriggerStatus(models.TextChoices):
    """A trigger publishes its TrainingTask event; the tasks consumer then creates the task or records the refusal."""

    PUBLISHED = "published", "Published on tasks.training"
    TASK_CREATED = "task_created", "Training task created"
    REFUSED = "refused", "Task refused"
