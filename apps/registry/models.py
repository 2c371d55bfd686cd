"""Registry models: families, immutable versions, their files, lineage edges and aliases."""

from django.conf import settings
from django.db import models

from apps.registry.choices import ArtifactPartition, LineageKind, VersionStatus


class ModelFamily(models.Model):
    """A line of models sharing one architecture and base config (e.g. a tiny Mixtral-style MoE)."""

    name = models.SlugField(max_length=100, unique=True)
    architecture = models.CharField(max_length=100, help_text="transformers architecture, e.g. 'MixtralForCausalLM'.")
    config = models.JSONField(default=dict, blank=True, help_text="Model config (transformers config.json).")
    description = models.TextField(blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ("name",)
        verbose_name_plural = "model families"

    def __str__(self) -> str:
        return self.name


class ModelVersion(models.Model):
    """One immutable model snapshot: its manifest (and sha256) and files never change once registered.

    Only `status` changes; promotion moves an Alias, never the files.
    """

    version_id = models.CharField(max_length=128, unique=True)
    family = models.ForeignKey(ModelFamily, on_delete=models.PROTECT, related_name="versions")
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.PROTECT, related_name="children")
    manifest = models.JSONField()
    manifest_sha256 = models.CharField(max_length=64)
    artifact_uri = models.CharField(max_length=200, help_text="Where the version's files lie (folder or object URI).")
    status = models.CharField(
        max_length=16, choices=VersionStatus.choices, default=VersionStatus.CANDIDATE, db_index=True
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_by_label = models.CharField(max_length=200, help_text="Who registered it (user, worker, or 'system').")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ("-created_at", "-id")

    def __str__(self) -> str:
        return self.version_id

    def ancestors(self, *, limit: int = 1000) -> list["ModelVersion"]:
        """The parent chain, direct parent first, up to the root."""
        chain: list[ModelVersion] = []
        current = self.parent
        while current is not None and len(chain) < limit:
            chain.append(current)
            current = current.parent
        return chain


class VersionArtifact(models.Model):
    """One file of a model version, with the sha256 devices and workers verify on download."""

    version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="artifacts")
    file_name = models.CharField(max_length=255)
    sha256 = models.CharField(max_length=64)
    size_bytes = models.BigIntegerField()
    partition = models.CharField(max_length=16, choices=ArtifactPartition.choices)
    layer = models.PositiveIntegerField(null=True, blank=True, help_text="MoE layer, for expert files.")
    expert_index = models.PositiveIntegerField(null=True, blank=True, help_text="Expert index, for expert files.")

    class Meta:
        ordering = ("version", "file_name")
        constraints = (models.UniqueConstraint(fields=["version", "file_name"], name="registry_artifact_unique_name"),)

    def __str__(self) -> str:
        return f"{self.version.version_id}/{self.file_name}"


class LineageEdge(models.Model):
    """One thing a version derives from: its parent version, a dataset, a training run or an edge update."""

    version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="lineage_edges")
    kind = models.CharField(max_length=16, choices=LineageKind.choices)
    # Dataset name, run id or update id; for `parent`, the parent's version id.
    source_ref = models.CharField(max_length=200)
    source_version = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="derived_edges"
    )

    class Meta:
        ordering = ("version", "kind", "source_ref")
        constraints = (
            models.UniqueConstraint(fields=["version", "kind", "source_ref"], name="registry_lineage_unique_edge"),
        )

    def __str__(self) -> str:
        return f"{self.version.version_id} ← {self.kind}:{self.source_ref}"


class Alias(models.Model):
    """A movable name (e.g. `champion`, `candidate`) pointing at one version; moving it is promotion."""

    name = models.SlugField(max_length=64, unique=True)
    version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="aliases")
    updated_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ("name",)
        verbose_name_plural = "aliases"

    def __str__(self) -> str:
        return f"{self.name} → {self.version.version_id}"


class VersionEvaluation(models.Model):
    """A version's held-out loss on one domain, beside its parent's loss on the same held-out set (before/after).

    One row per (version, domain): evaluating a version again replaces its scores (the audit trail keeps each run).
    """

    version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="evaluations")
    domain = models.CharField(max_length=100)
    loss = models.FloatField(help_text="Mean next-token cross-entropy on the domain's held-out set.")
    perplexity = models.FloatField(null=True, blank=True, help_text="exp(loss); empty when that overflows a float.")
    tokens = models.PositiveIntegerField(help_text="Tokens scored.")
    records = models.PositiveIntegerField(default=0, help_text="Held-out records scored.")
    parent_version = models.ForeignKey(
        ModelVersion,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="Scored as 'before'.",
    )
    parent_loss = models.FloatField(null=True, blank=True, help_text="The parent's loss on the same held-out set.")
    parent_perplexity = models.FloatField(null=True, blank=True)
    heldout = models.CharField(max_length=500, blank=True, help_text="Which held-out set (folder or dataset name).")
    evaluated_by_label = models.CharField(max_length=200, help_text="Who scored it (a worker, a user).")
    evaluated_at = models.DateTimeField(db_index=True)

    class Meta:
        ordering = ("version", "domain")
        constraints = (models.UniqueConstraint(fields=["version", "domain"], name="registry_evaluation_unique_domain"),)

    def __str__(self) -> str:
        return f"{self.version.version_id} on {self.domain}: loss {self.loss:.4f}"

    @property
    def loss_change(self) -> float | None:
        """loss − parent loss (negative: the version is better on this domain); None without a parent score."""
        return None if self.parent_loss is None else self.loss - self.parent_loss


class ForgettingReport(models.Model):
    """A candidate's forgetting report: its per-domain held-out loss against its parent and the earlier champions of
    its line, with average forgetting and backward transfer (fednested.evaluation.forgetting). One per version;
    evaluating the version again replaces it, like its VersionEvaluation rows."""

    version = models.OneToOneField(ModelVersion, on_delete=models.CASCADE, related_name="forgetting_report")
    report = models.JSONField(
        help_text="ForgettingReport.to_json(): each compared version's losses and per-domain figures."
    )
    average_forgetting = models.FloatField(null=True, blank=True, help_text="Mean per-domain forgetting (nats).")
    backward_transfer = models.FloatField(null=True, blank=True, help_text="Mean backward transfer (nats; < 0 forgot).")
    heldout = models.CharField(max_length=500, blank=True, help_text="The held-out sets every loss was scored on.")
    computed_by_label = models.CharField(max_length=200)
    computed_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"forgetting report of {self.version.version_id}"
