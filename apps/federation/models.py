"""Federation models: enrolled edge devices, one-time enrollment tokens, rounds, Tier-1 tasks and edge updates."""

from django.conf import settings
from django.db import models

from apps.federation.choices import DeviceStatus, RoundMode, RoundStatus, TaskKind, TaskStatus, UpdateStatus


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


class DeviceKey(models.Model):
    """A public key a device proved it holds (its enrollment or renewal CSR), and the certificate the CA issued for it.

    Update envelopes verify against these keys; the control plane holds no private key of any device. Without a CA
    (the embedded demo) the key is registered with no certificate. A revoked key verifies nothing and its
    certificate is on the CRL.
    """

    device = models.ForeignKey(EdgeDevice, on_delete=models.PROTECT, related_name="keys")
    fingerprint = models.CharField(max_length=64, help_text="SHA-256 (hex) of the DER SubjectPublicKeyInfo.")
    public_key_pem = models.TextField()
    certificate_pem = models.TextField(blank=True, help_text="Empty when the control plane runs without a CA.")
    serial = models.CharField(max_length=40, blank=True, db_index=True, help_text="Certificate serial (hex).")
    not_after = models.DateTimeField(null=True, blank=True, help_text="Certificate expiry.")
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ("-created_at", "-id")
        constraints = (
            models.UniqueConstraint(
                fields=["serial"], condition=~models.Q(serial=""), name="federation_devicekey_unique_serial"
            ),
        )

    def __str__(self) -> str:
        return f"key {self.fingerprint[:12]}… of {self.device_id}" + (f" (cert {self.serial})" if self.serial else "")


class Round(models.Model):
    """An aggregation window: it buffers edge updates until they are ready (K, a deadline, or a full cohort), then
    one aggregation applies them to the current champion and produces a candidate.

    Asynchronous windows take updates on any ancestor of the champion within the staleness limit and form a series:
    aggregating one (or giving up on it after repeated failures) opens the next with the same settings.
    Synchronous rounds take their cohort's updates on `base_version` only.
    """

    round_id = models.CharField(max_length=64, unique=True)
    mode = models.CharField(max_length=8, choices=RoundMode.choices, default=RoundMode.ASYNC, db_index=True)
    base_version = models.ForeignKey(
        "registry.ModelVersion",
        on_delete=models.PROTECT,
        related_name="rounds",
        help_text="sync: the version the cohort trains; async: the champion when the window opened.",
    )
    series = models.CharField(
        max_length=64, db_index=True, help_text="Round id of the first window of an asynchronous series."
    )
    sequence = models.PositiveIntegerField(default=1, help_text="Position of this window in its series.")
    cohort = models.ManyToManyField(
        EdgeDevice, blank=True, related_name="cohort_rounds", help_text="sync: the devices expected to report."
    )
    status = models.CharField(max_length=16, choices=RoundStatus.choices, default=RoundStatus.OPEN, db_index=True)
    buffer_size_k = models.PositiveIntegerField(help_text="Aggregate once this many validated updates are buffered.")
    deadline_at = models.DateTimeField(help_text="Aggregate what is buffered by this time, even if fewer than K.")
    config = models.JSONField(default=dict, blank=True, help_text="Aggregation settings (staleness, clipping, …).")
    opened_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    opened_at = models.DateTimeField(auto_now_add=True)
    closed_at = models.DateTimeField(null=True, blank=True)
    candidate = models.ForeignKey(
        "registry.ModelVersion",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        help_text="The candidate this window's aggregation produced.",
    )
    record = models.JSONField(
        default=dict,
        blank=True,
        help_text="What the aggregation did: trigger, parent, staleness and weights per update, scaling, notes.",
    )

    class Meta:
        ordering = ("-opened_at", "-id")

    def __str__(self) -> str:
        return f"{self.round_id} ({self.mode}, {self.status})"


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
    traceparent = models.CharField(
        max_length=128,
        blank=True,
        help_text="W3C trace context of the code that created the task; its job's span continues that trace.",
    )
    policy_decisions = models.JSONField(
        default=list,
        blank=True,
        help_text="Dataset access decisions of its job (core_update), allowed or denied, each naming the deciding "
        "policy and item (fednested.governance.ranger.Decision.to_json).",
    )

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
    status = models.CharField(max_length=16, choices=UpdateStatus.choices, db_index=True)
    rejection_code = models.CharField(max_length=64, blank=True)
    rejection_message = models.TextField(blank=True)
    payload_uri = models.CharField(max_length=200)
    payload_sha256 = models.CharField(max_length=64)
    payload_bytes = models.BigIntegerField()
    examples = models.PositiveIntegerField(default=0)
    staleness = models.PositiveIntegerField(
        null=True, blank=True, help_text="τ: promotions between its base and the champion when last checked."
    )
    routed_tokens = models.JSONField(default=dict, blank=True, help_text="Tokens routed per expert ('layer.expert').")
    metrics = models.JSONField(default=dict, blank=True)
    envelope = models.JSONField(help_text="The envelope as validated, kept for audit and re-validation.")
    received_at = models.DateTimeField(auto_now_add=True, db_index=True)
    status_changed_at = models.DateTimeField(null=True, blank=True)
    applied_in = models.ForeignKey(
        "registry.ModelVersion", null=True, blank=True, on_delete=models.PROTECT, related_name="applied_updates"
    )
    traceparent = models.CharField(
        max_length=128,
        blank=True,
        help_text="W3C trace context of its ingestion (the device's trace); the aggregation applying it links to it.",
    )
    content_digest = models.CharField(
        max_length=64,
        blank=True,
        db_index=True,
        help_text="sha256 over its adapter factors, set when aggregated: the same update sent twice (from one "
        "device under a new id, or from several devices) is applied once.",
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
