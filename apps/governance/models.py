"""Governance models: the audit trail (append-only) and approvals of model versions by officers."""

from django.conf import settings
from django.db import models

from apps.governance.choices import ActorKind, ApprovalStatus, Decision


class AuditEvent(models.Model):
    """One state change: who did what to which object, when. Append-only: no service updates or deletes a row."""

    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="audit_events"
    )
    # Kept even when the user row goes; names non-user actors too ("system", "device:<client id>", a worker).
    actor_label = models.CharField(max_length=200)
    # Person, device, automation or (refused access only) anonymous: apps.governance.actors.Actor. Hashed into the
    # chain; blank on events recorded before the column existed (their hashes do not cover it).
    actor_kind = models.CharField(max_length=16, choices=ActorKind.choices, blank=True, db_index=True)
    verb = models.CharField(max_length=100, db_index=True, help_text="Dotted action name, e.g. 'registry.alias.moved'.")
    object_type = models.CharField(max_length=100, blank=True, db_index=True, help_text="app_label.model")
    object_id = models.CharField(max_length=200, blank=True, db_index=True)
    data = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    # The hash chain (apps.governance.chain): set once when the event is sealed, right after its transaction commits.
    # `seq` is the event's place in the chain; `entry_hash` commits to the previous event's hash and to this event's
    # fields in canonical form, so editing, deleting or reordering sealed events breaks the chain where it happened.
    seq = models.BigIntegerField(null=True, blank=True, unique=True, help_text="Place in the audit hash chain.")
    prev_hash = models.CharField(max_length=64, blank=True, help_text="entry_hash of the event before (seq − 1).")
    entry_hash = models.CharField(max_length=64, blank=True, help_text="sha256 over prev_hash and this event.")

    class Meta:
        ordering = ("-created_at", "-id")
        indexes = (
            # Sealing reads the unsealed events in id order; the partial index keeps that cheap on a long trail.
            models.Index(fields=["id"], condition=models.Q(seq__isnull=True), name="governance_audit_unsealed"),
        )

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.actor_label} {self.verb} {self.object_type}:{self.object_id}"


class ApprovalRequest(models.Model):
    """A request that a governance officer approve a candidate version for promotion to champion."""

    version = models.ForeignKey("registry.ModelVersion", on_delete=models.PROTECT, related_name="approval_requests")
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="approval_requests"
    )
    note = models.TextField(blank=True)
    status = models.CharField(
        max_length=16, choices=ApprovalStatus.choices, default=ApprovalStatus.PENDING, db_index=True
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ("-created_at", "-id")
        constraints = (
            # At most one open request per version, so two officers never decide the same question twice.
            models.UniqueConstraint(
                fields=["version"],
                condition=models.Q(status="pending"),
                name="governance_one_pending_request_per_version",
            ),
        )

    def __str__(self) -> str:
        return f"approval #{self.pk} of {self.version_id} ({self.status})"


class ApprovalDecision(models.Model):
    """An officer's decision on one approval request, with the reason; one per request."""

    request = models.OneToOneField(ApprovalRequest, on_delete=models.PROTECT, related_name="decision")
    decided_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="decisions")
    decision = models.CharField(max_length=16, choices=Decision.choices)
    reason = models.TextField(blank=True)
    decided_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ("-decided_at", "-id")

    def __str__(self) -> str:
        return f"{self.decision} #{self.request_id} by {self.decided_by_id}"


class GateOverride(models.Model):
    """A request to approve a candidate the promotion gate holds, and a second officer's grant of it.

    Records the breaches it was asked for: a grant covers those breaches only, so a candidate evaluated again with a
    new breach is held again. Who may ask and who may grant is `apps.governance.gate`'s rule, enforced by the services.
    """

    request = models.ForeignKey(ApprovalRequest, on_delete=models.PROTECT, related_name="gate_overrides")
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    reason = models.TextField()
    breaches = models.JSONField(help_text="The gate's breaches when the override was asked for.")
    requested_at = models.DateTimeField(auto_now_add=True)
    granted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    grant_reason = models.TextField(blank=True)
    granted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ("-requested_at", "-id")
        constraints = (
            # One open (ungranted) override request per approval request: a second officer answers one question.
            models.UniqueConstraint(
                fields=["request"], condition=models.Q(granted_at__isnull=True), name="governance_one_open_override"
            ),
        )

    def __str__(self) -> str:
        state = f"granted by {self.granted_by_id}" if self.granted_at else "asked"
        return f"gate override of approval #{self.request_id} ({state})"
