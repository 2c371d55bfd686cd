"""Data engine models: the per-domain signals devices report, the rules that watch them, the triggers rules fire, and
the telemetry the consumer refused."""

from django.db import models

from apps.dataengine.choices import RuleKind, TriggerStatus
from apps.federation.choices import TaskKind


class DeviceSignal(models.Model):
    """One domain's share of one local training run, as a device reported it on telemetry.edge.

    `report_sha256` is the digest of the record's bytes: a record delivered twice (at-least-once) hits the unique
    (report_sha256, domain) pair and is stored once, even after a topic was recreated and its offsets restarted.
    """

    device = models.ForeignKey("federation.EdgeDevice", on_delete=models.PROTECT, related_name="signals")
    client_id = models.CharField(max_length=128, help_text="The reporting device's client id, as on the wire.")
    domain = models.CharField(max_length=100)
    loss = models.FloatField(null=True, blank=True, help_text="Edge training loss; None when not measured.")
    tokens = models.BigIntegerField(help_text="Tokens of this domain the run trained on.")
    version = models.CharField(max_length=200, help_text="The model version the device trained on.")
    round_id = models.CharField(max_length=200, blank=True)
    outcome = models.CharField(max_length=16, help_text="succeeded, failed or cancelled.")
    dp_noised = models.BooleanField(default=False, help_text="The loss carries differential-privacy noise.")
    schema_version = models.PositiveSmallIntegerField(help_text="Telemetry schema version of the report.")
    source = models.CharField(max_length=200, help_text="Bus position of the report: topic[partition]@offset.")
    report_sha256 = models.CharField(max_length=64, help_text="SHA-256 of the record as received.")
    reported_at = models.DateTimeField(help_text="When the device finished the run (its clock).")
    received_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ("-reported_at", "-id")
        constraints = (
            models.UniqueConstraint(fields=["report_sha256", "domain"], name="dataengine_signal_unique_report_domain"),
        )
        indexes = (
            # "The last N reports of domain D": what every rule reads.
            models.Index(fields=["domain", "-reported_at", "-id"], name="dataengine_signal_recent"),
        )

    def __str__(self) -> str:
        return f"{self.client_id} {self.domain} loss={self.loss} ({self.reported_at:%Y-%m-%d %H:%M})"


class DataEngineRule(models.Model):
    """A configurable rule: what to look for in a domain's signals (`kind` and `params`), and the training task to ask
    for when it fires (`task_kind`, `task_params`, overridden per domain by `domain_task_params`).

    `cooldown_s` debounces it: no second trigger of the same rule for the same domain while the last one's task is
    pending or running, or within the cool-down after it fired.
    """

    name = models.CharField(max_length=100, unique=True)
    kind = models.CharField(max_length=32, choices=RuleKind.choices)
    params = models.JSONField(default=dict, blank=True, help_text="Kind-specific; see docs/data-engine.md.")
    enabled = models.BooleanField(default=True, db_index=True)
    task_kind = models.CharField(max_length=32, choices=TaskKind.choices)
    task_params = models.JSONField(default=dict, blank=True, help_text="Params of the task it asks for.")
    domain_task_params = models.JSONField(
        default=dict, blank=True, help_text="domain → params merged over task_params (e.g. the domain's dataset)."
    )
    cooldown_s = models.PositiveIntegerField(default=3600)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ("name",)

    def __str__(self) -> str:
        return f"{self.name} ({self.kind}{'' if self.enabled else ', disabled'})"


class DataEngineTrigger(models.Model):
    """A rule that fired for a domain: the evidence (the signals and numbers that made it fire), the TrainingTask
    event it published on tasks.training, and what became of it (the task row, or why it was refused)."""

    rule = models.ForeignKey(DataEngineRule, on_delete=models.PROTECT, related_name="triggers")
    domain = models.CharField(max_length=100)
    evidence = models.JSONField(help_text="What made the rule fire: signal ids, values and the computed numbers.")
    task_id = models.CharField(max_length=200, unique=True, help_text="task_id of the published TrainingTask event.")
    task_kind = models.CharField(max_length=32, choices=TaskKind.choices)
    task_params = models.JSONField(default=dict, blank=True)
    status = models.CharField(
        max_length=16, choices=TriggerStatus.choices, default=TriggerStatus.PUBLISHED, db_index=True
    )
    training_task = models.OneToOneField(
        "federation.TrainingTask", null=True, blank=True, on_delete=models.SET_NULL, related_name="data_engine_trigger"
    )
    refusal = models.TextField(blank=True, help_text="Why the control plane refused the task.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ("-created_at", "-id")
        indexes = (models.Index(fields=["rule", "domain", "-created_at"], name="dataengine_trigger_recent"),)

    def __str__(self) -> str:
        return f"{self.rule.name} on {self.domain} → {self.task_kind} ({self.status})"


class TelemetryRejection(models.Model):
    """A telemetry.edge or tasks.training record the consumer refused, and why; the record itself is not kept (it
    came from a device), only its size and digest."""

    where = models.CharField(max_length=200, help_text="topic[partition]@offset")
    key = models.CharField(max_length=200, blank=True)
    client_id = models.CharField(max_length=128, blank=True)
    reason = models.TextField()
    size_bytes = models.PositiveIntegerField()
    sha256 = models.CharField(max_length=64)
    received_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ("-received_at", "-id")

    def __str__(self) -> str:
        return f"{self.where}: {self.reason[:60]}"
