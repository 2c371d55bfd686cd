"""Choices of the registry app."""

from django.db import models


class VersionStatus(models.TextChoices):
    """Lifecycle of a model version; its files and manifest never change, only this status does."""

    CANDIDATE = "candidate", "Candidate"
    CHAMPION = "champion", "Champion"
    ARCHIVED = "archived", "Archived"
    REJECTED = "rejected", "Rejected"


class ArtifactPartition(models.TextChoices):
    """Which part of the model a file holds: every parameter is in exactly one of core, one expert, or the gate."""

    CORE = "core", "Core"
    EXPERT = "expert", "Expert"
    GATE = "gate", "Gate"
    TOKENIZER = "tokenizer", "Tokenizer"
    CONFIG = "config", "Config"
    MANIFEST = "manifest", "Manifest"
    # Not weights: what a device needs to train on the version safely (its Fisher, a replay set).
    SAFEGUARDS = "safeguards", "Safeguards"


class LineageKind(models.TextChoices):
    """What a version was derived from."""

    PARENT = "parent", "Parent version"
    DATASET = "dataset", "Dataset"
    RUN = "run", "Training run"
    UPDATE = "update", "Contributing edge update"


# Aliases that services move; `champion` moves only through an approved ApprovalRequest.
CHAMPION_ALIAS = "champion"
CANDIDATE_ALIAS = "candidate"
