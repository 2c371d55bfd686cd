"""Admin of governance: the audit trail and approvals, read-only (officers decide through the API/UI)."""

from django.contrib import admin

from apps.governance.admin_mixins import ReadOnlyAdminMixin
from apps.governance.models import ApprovalDecision, ApprovalRequest, AuditEvent, GateOverride


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("created_at", "actor_label", "verb", "object_type", "object_id")
    list_filter = ("verb", "object_type", "created_at")
    search_fields = ("actor_label", "verb", "object_id")
    date_hierarchy = "created_at"


class ApprovalDecisionInline(ReadOnlyAdminMixin, admin.StackedInline):  # type: ignore[type-arg]
    model = ApprovalDecision


@admin.register(ApprovalRequest)
class ApprovalRequestAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("id", "version", "status", "requested_by", "created_at")
    list_filter = ("status", "created_at")
    search_fields = ("version__version_id", "requested_by__username", "note")
    inlines = (ApprovalDecisionInline,)


@admin.register(ApprovalDecision)
class ApprovalDecisionAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("request", "decision", "decided_by", "decided_at")
    list_filter = ("decision", "decided_at")
    search_fields = ("request__version__version_id", "decided_by__username", "reason")


@admin.register(GateOverride)
class GateOverrideAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    """Asked and granted through the audited services only (two officers, two reasons): read-only here."""

    list_display = ("request", "requested_by", "requested_at", "granted_by", "granted_at")
    list_filter = ("requested_at", "granted_at")
    search_fields = ("request__version__version_id", "requested_by__username", "reason", "grant_reason")
