"""REST serializers of governance: approval requests with their decision, and audit events."""

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from apps.accounts.models import User
from apps.governance.models import ApprovalDecision, ApprovalRequest, AuditEvent
from apps.registry.models import ModelVersion


class ApprovalDecisionSerializer(serializers.ModelSerializer[ApprovalDecision]):
    decided_by = serializers.SlugRelatedField[User](slug_field="username", read_only=True)

    class Meta:
        model = ApprovalDecision
        fields = ("decision", "reason", "decided_by", "decided_at")
        read_only_fields = fields


class ApprovalRequestSerializer(serializers.ModelSerializer[ApprovalRequest]):
    version = serializers.SlugRelatedField[ModelVersion](slug_field="version_id", queryset=ModelVersion.objects.all())
    requested_by = serializers.SlugRelatedField[User](slug_field="username", read_only=True)
    decision = serializers.SerializerMethodField()

    class Meta:
        model = ApprovalRequest
        fields = ("id", "version", "note", "status", "requested_by", "created_at", "decision")
        read_only_fields = ("id", "status", "requested_by", "created_at", "decision")
        # One pending request per version is request_approval's check, with a message naming the version.
        validators = ()

    @extend_schema_field(ApprovalDecisionSerializer(allow_null=True))
    def get_decision(self, request: ApprovalRequest) -> dict[str, Any] | None:
        decision = getattr(request, "decision", None)
        return dict(ApprovalDecisionSerializer(decision).data) if decision is not None else None


class DecisionInputSerializer(serializers.Serializer[dict[str, Any]]):
    reason = serializers.CharField(max_length=2000, required=False, default="", allow_blank=True)


class AuditEventSerializer(serializers.ModelSerializer[AuditEvent]):
    class Meta:
        model = AuditEvent
        fields = ("id", "created_at", "actor_label", "verb", "object_type", "object_id", "data")
        read_only_fields = fields
