"""Federation models: enrolled edge devices, one-time enrollment tokens, rounds, Tier-1 tasks and edge updates."""

from django.conf import settings
from django.db import models

from apps.federation.choices import DeviceStatus, RoundStatus, TaskKind, TaskStatus, UpdateStatus


class EnrollmentToken(models.Model):
    """A one-time secret an engineer hands to a device to enroll with: stored as SHA-256, usable once, until expiry."""

    token_sha256 = models.CharField(max_length=64, unique=True)
    token_prefix = models.CharField(max_length=16, help_text="First characters, to tell tokens apart.")
    note = models.CharField(max_length=200, blank=True, help_text="Which device or person the token is for.")
    domain = models.CharField(max_length=100, blank=True, help_text="Domain the enrolled device will belong to.")
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)
    used_by_client_id = models.CharField(max_length=128, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ("-created_at", "-id")

    def __str__(self) -> str:
        return f"{self.token_prefix}… ({'used' if self.used_at else 'unused'})"


class EdgeDevice(models.Model):
    """An enrolled edge device. It authenticates as its own `user` (role device); `client_id` is its certificate CN."""

    client_id = models.CharField(max_length=128, unique=True)
    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="edge_device")
    display_name = models.CharField(max_length=200, blank=True)
    domain = models.CharField(max_length=100, blank=True, db_index=True, help_text="e.g. 'automotive', 'medical'.")
    labels = models.JSONField(default=list, blank=True, help_text="Free-form string labels.")
    status = models.CharField(max_length=16, choices=DeviceStatus.choices, default=DeviceStatus.ACTIVE, db_index=True)
    enrollment_token = models.OneToOneField(
        EnrollmentToken, null=True, blank=True, on_delete=models.SET_NULL, related_name="device"
    )
    enrolled_at = models.DateTimeField(auto_now_add=True)
    last_seen = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    current_version = models.ForeignKey(
        "registry.ModelVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ("client_id",)

    def __str__(self) -> str:
        return self.client_id


class Round(models.Model):
    """A federation round on one base version: it buffers edge updates until K arrive or the deadline passes."""

    round_id = models.CharField(max_length=64, unique=True)
    base_version = models.ForeignKey("registry.ModelVersion", on_delete=models.PROTECT, related_name="rounds")
    status = models.CharField(max_length=16, choices=RoundStatus.choices, default=RoundStatus.OPEN, db_index=True)
    buffer_size_k = models.PositiveIntegerField(help_text="Aggregate once this many validated updates are buffered.")
    deadline_at = models.DateTimeField(help_text="Aggregate what is buffered by this time, even if fewer than K.")
    config = models.JSONField(default=dict, blank=True, help_text="Aggregation settings (staleness, clipping, …).")
    opened_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    opened_at = models.DateTimeField(auto_now_add=True)
    closed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ("-opened_at", "-id")

    def __str__(self) -> str:
        return f"{self.round_id} ({self.status})"


class TrainingTask(models.Model):
    """A Tier-1 job (core update, expert aggregation, evaluation); a Celery task runs it by primary key."""

    kind = models.CharField(max_length=32, choices=TaskKind.choices, db_index=True)
    status = models.CharField(max_length=16, choices=TaskStatus.choices, default=TaskStatus.PENDING, db_index=True)
    params = models.JSONField(default=dict, blank=True)
    round = models.ForeignKey(Round, null=True, blank=True, on_delete=models.PROTECT, related_name="tasks")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ("-created_at", "-id")

    def __str__(self) -> str:
        return f"task {self.pk} {self.kind} ({self.status})"


class Update(models.Model):
    """One edge update envelope as received: the adapter delta lies in the artifact store at `payload_uri`.

    `update_id` is the idempotency key: receiving the same envelope again returns this row.
    """

    update_id = models.CharField(max_length=64, unique=True)
    device = models.ForeignKey(EdgeDevice, on_delete=models.PROTECT, related_name="updates")
    base_version = models.ForeignKey("registry.ModelVersion", on_delete=models.PROTECT, related_name="edge_updates")
    round = models.ForeignKey(Round, null=True, blank=True, on_delete=models.PROTECT, related_name="updates")
    status = models.CharField(max_length=16, choices=UpdateStatus.choices, default=UpdateStatus.RECEIVED, db_index=True)
    rejection_code = models.CharField(max_length=64, blank=True)
    rejection_message = models.TextField(blank=True)
    payload_uri = models.CharField(max_length=200)
    payload_sha256 = models.CharField(max_length=64)
    payload_bytes = models.BigIntegerField()
    examples = models.PositiveIntegerField(default=0)
    routed_tokens = models.JSONField(default=dict, blank=True, help_text="Tokens routed per expert ('layer.expert').")
    metrics = models.JSONField(default=dict, blank=True)
    envelope = models.JSONField(help_text="The envelope as validated, kept for audit and re-validation.")
    received_at = models.DateTimeField(auto_now_add=True, db_index=True)
    status_changed_at = models.DateTimeField(null=True, blank=True)
    applied_in = models.ForeignKey(
        "registry.ModelVersion", null=True, blank=True, on_delete=models.PROTECT, related_name="applied_updates"
    )

    class Meta:
        ordering = ("-received_at", "-id")

    def __str__(self) -> str:
        return f"{self.update_id} from {self.device_id} ({self.status})"


class StagedPayload(models.Model):
    """An update payload a device uploaded (claim check), stored before its envelope is published.

    Records which device owns the update id, so no other device can overwrite or claim it, and what was stored, so a
    retried upload of the same bytes is answered without a second copy.
    """

    update_id = models.CharField(max_length=64, unique=True)
    device = models.ForeignKey(EdgeDevice, on_delete=models.PROTECT, related_name="staged_payloads")
    uri = models.CharField(max_length=200, help_text="artifacts://updates/<client id>/<update id>.safetensors")
    sha256 = models.CharField(max_length=64)
    size_bytes = models.BigIntegerField()
    stored_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ("-stored_at", "-id")

    def __str__(self) -> str:
        return f"payload of {self.update_id} from {self.device_id}"
