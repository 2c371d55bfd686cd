"""REST serializers of governance: approval requests with their decision, and audit events."""

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from apps.accounts.models import User
from apps.governance.choices import ApprovalStatus
from apps.governance.gate import gate_verdict
from apps.governance.models import ApprovalDecision, ApprovalRequest, AuditEvent, GateOverride
from apps.registry.models import ForgettingReport, ModelVersion


class ApprovalDecisionSerializer(serializers.ModelSerializer[ApprovalDecision]):
    decided_by = serializers.SlugRelatedField[User](slug_field="username", read_only=True)

    class Meta:
        model = ApprovalDecision
        fields = ("decision", "reason", "decided_by", "decided_at")
        read_only_fields = fields


class GateBreachSerializer(serializers.Serializer[dict[str, Any]]):
    """One threshold of the promotion gate a candidate is past (apps.governance.gate.Breach)."""

    domain = serializers.CharField()
    against = serializers.ChoiceField(choices=["parent", "champion", "candidate"])
    reference = serializers.CharField(allow_null=True, help_text="The version compared with.")
    limit = serializers.ChoiceField(
        choices=["max_increase_nats", "max_increase_fraction", "not_evaluated", "no_reference_score"]
    )
    allowed = serializers.FloatField(allow_null=True)
    loss = serializers.FloatField(allow_null=True, help_text="The candidate's held-out loss (nats).")
    reference_loss = serializers.FloatField(allow_null=True)
    change = serializers.FloatField(allow_null=True, help_text="loss − reference loss (nats).")
    relative_change = serializers.FloatField(allow_null=True)
    message = serializers.CharField()


class GateOverrideSerializer(serializers.ModelSerializer[GateOverride]):
    """An override of the gate: asked for by one officer, granted (or not yet) by a second."""

    requested_by = serializers.SlugRelatedField[User](slug_field="username", read_only=True)
    granted_by = serializers.SlugRelatedField[User](slug_field="username", read_only=True, allow_null=True)
    breaches = GateBreachSerializer(many=True, read_only=True)

    class Meta:
        model = GateOverride
        fields = (
            "id",
            "requested_by",
            "reason",
            "breaches",
            "requested_at",
            "granted_by",
            "grant_reason",
            "granted_at",
        )
        read_only_fields = fields


class GateVerdictSerializer(serializers.Serializer[dict[str, Any]]):
    """The promotion gate's verdict on a candidate now (apps.governance.gate.GateVerdict)."""

    configured = serializers.BooleanField(help_text="False: no thresholds are configured (no gate).")
    held = serializers.BooleanField(help_text="True: approve answers 409 unless a granted override covers it.")
    error = serializers.CharField(allow_blank=True, help_text="Why the thresholds file is refused, if it is.")
    breaches = GateBreachSerializer(many=True)


class GateHeldSerializer(serializers.Serializer[dict[str, Any]]):
    """409 of approve: the gate holds the candidate; `breaches` are the domains and figures."""

    detail = serializers.CharField()
    code = serializers.ChoiceField(choices=["gate_held"])
    version = serializers.CharField()
    error = serializers.CharField(allow_blank=True)
    breaches = GateBreachSerializer(many=True)


class ApprovalRequestSerializer(serializers.ModelSerializer[ApprovalRequest]):
    version = serializers.SlugRelatedField[ModelVersion](slug_field="version_id", queryset=ModelVersion.objects.all())
    requested_by = serializers.SlugRelatedField[User](slug_field="username", read_only=True)
    decision = serializers.SerializerMethodField()
    gate = serializers.SerializerMethodField()
    overrides = GateOverrideSerializer(source="gate_overrides", many=True, read_only=True)

    class Meta:
        model = ApprovalRequest
        fields = ("id", "version", "note", "status", "requested_by", "created_at", "decision", "gate", "overrides")
        read_only_fields = ("id", "status", "requested_by", "created_at", "decision", "gate", "overrides")
        # One pending request per version is request_approval's check, with a message naming the version.
        validators = ()

    @extend_schema_field(ApprovalDecisionSerializer(allow_null=True))
    def get_decision(self, request: ApprovalRequest) -> dict[str, Any] | None:
        decision = getattr(request, "decision", None)
        return dict(ApprovalDecisionSerializer(decision).data) if decision is not None else None

    @extend_schema_field(GateVerdictSerializer(allow_null=True))
    def get_gate(self, request: ApprovalRequest) -> dict[str, Any] | None:
        """The gate's verdict while the request is pending; a decided request's gate is history (see `overrides`)."""
        if request.status != ApprovalStatus.PENDING:
            return None
        return gate_verdict(request.version).to_json()


class OverrideInputSerializer(serializers.Serializer[dict[str, Any]]):
    reason = serializers.CharField(
        max_length=2000,
        help_text="Why the candidate should be approved despite the gate; recorded in the audit trail.",
        error_messages={
            "required": "a gate override needs a written reason (it is recorded in the audit trail)",
            "blank": "a gate override needs a written reason (it is recorded in the audit trail)",
        },
    )


class ForgettingReportSerializer(serializers.ModelSerializer[ForgettingReport]):
    """A candidate's forgetting report (docs/forgetting-and-promotion-gate.md describes `report`)."""

    version = serializers.SlugRelatedField[ModelVersion](slug_field="version_id", read_only=True)

    class Meta:
        model = ForgettingReport
        fields = (
            "version",
            "average_forgetting",
            "backward_transfer",
            "heldout",
            "computed_by_label",
            "computed_at",
            "report",
        )
        read_only_fields = fields


class DecisionInputSerializer(serializers.Serializer[dict[str, Any]]):
    reason = serializers.CharField(max_length=2000, required=False, default="", allow_blank=True)


class AuditEventSerializer(serializers.ModelSerializer[AuditEvent]):
    class Meta:
        model = AuditEvent
        fields = (
            "id",
            "created_at",
            "actor_label",
            "actor_kind",
            "verb",
            "object_type",
            "object_id",
            "data",
            "seq",
            "prev_hash",
            "entry_hash",
        )
        read_only_fields = fields
