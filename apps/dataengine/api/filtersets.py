"""Filters for the data engine's list endpoints."""

import django_filters

from apps.dataengine.choices import RuleKind, TriggerStatus
from apps.dataengine.models import DataEngineRule, DataEngineTrigger, DeviceSignal
from controlplane.parsers import UtcIsoDateTimeFilter


class DeviceSignalFilterSet(django_filters.FilterSet):  # type: ignore[misc]  # django-filter ships no type hints
    domain = django_filters.CharFilter()
    client_id = django_filters.CharFilter()
    version = django_filters.CharFilter()
    reported_after = UtcIsoDateTimeFilter(field_name="reported_at", lookup_expr="gte")

    class Meta:
        model = DeviceSignal
        fields = ("domain", "client_id", "version", "reported_after")


class DataEngineRuleFilterSet(django_filters.FilterSet):  # type: ignore[misc]  # django-filter ships no type hints
    kind = django_filters.ChoiceFilter(choices=RuleKind.choices)
    enabled = django_filters.BooleanFilter()

    class Meta:
        model = DataEngineRule
        fields = ("kind", "enabled")


class DataEngineTriggerFilterSet(django_filters.FilterSet):  # type: ignore[misc]  # django-filter ships no type hints
    domain = django_filters.CharFilter()
    status = django_filters.ChoiceFilter(choices=TriggerStatus.choices)
    rule = django_filters.CharFilter(field_name="rule__name")

    class Meta:
        model = DataEngineTrigger
        fields = ("domain", "status", "rule")
