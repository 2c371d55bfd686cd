"""Filters for the registry's list endpoints."""

import django_filters

from apps.registry.choices import VersionStatus
from apps.registry.models import ModelFamily, ModelVersion
from controlplane.parsers import UtcIsoDateTimeFilter


class ModelFamilyFilterSet(django_filters.FilterSet):  # type: ignore[misc]  # django-filter ships no type hints
    architecture = django_filters.CharFilter()

    class Meta:
        model = ModelFamily
        fields = ("architecture",)


class ModelVersionFilterSet(django_filters.FilterSet):  # type: ignore[misc]  # django-filter ships no type hints
    family = django_filters.CharFilter(field_name="family__name")
    parent = django_filters.CharFilter(field_name="parent__version_id")
    status = django_filters.ChoiceFilter(choices=VersionStatus.choices)
    created_after = UtcIsoDateTimeFilter(field_name="created_at", lookup_expr="gte")
    created_before = UtcIsoDateTimeFilter(field_name="created_at", lookup_expr="lt")

    class Meta:
        model = ModelVersion
        fields = ("family", "parent", "status")
