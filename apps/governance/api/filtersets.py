"""Filters for governance's list endpoints."""

import django_filters

from apps.governance.choices import ActorKind, ApprovalStatus
from apps.governance.models import ApprovalRequest, AuditEvent
from controlplane.parsers import UtcIsoDateTimeFilter


class ApprovalRequestFilterSet(django_filters.FilterSet):  # type: ignore[misc]  # django-filter ships no type hints
    status = django_filters.ChoiceFilter(choices=ApprovalStatus.choices)
    version = django_filters.CharFilter(field_name="version__version_id")

    class Meta:
        model = ApprovalRequest
        fields = ("status", "version")


class AuditEventFilterSet(django_filters.FilterSet):  # type: ignore[misc]  # django-filter ships no type hints
    verb = django_filters.CharFilter()
    verb_prefix = django_filters.CharFilter(field_name="verb", lookup_expr="startswith")
    object_type = django_filters.CharFilter()
    object_id = django_filters.CharFilter()
    actor_label = django_filters.CharFilter()
    actor_kind = django_filters.ChoiceFilter(choices=ActorKind.choices)
    created_after = UtcIsoDateTimeFilter(field_name="created_at", lookup_expr="gte")
    created_before = UtcIsoDateTimeFilter(field_name="created_at", lookup_expr="lt")

    class Meta:
        model = AuditEvent
        fields = ("verb", "object_type", "object_id", "actor_label", "actor_kind")
