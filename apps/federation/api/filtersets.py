"""Filters for the federation app's list endpoints."""

import django_filters

from apps.federation.choices import DeviceStatus, RoundStatus, TaskKind, TaskStatus, UpdateStatus
from apps.federation.models import EdgeDevice, EnrollmentToken, Round, TrainingTask, Update
from controlplane.parsers import UtcIsoDateTimeFilter


class EdgeDeviceFilterSet(django_filters.FilterSet):  # type: ignore[misc]  # django-filter ships no type hints
    status = django_filters.ChoiceFilter(choices=DeviceStatus.choices)
    domain = django_filters.CharFilter()

    class Meta:
        model = EdgeDevice
        fields = ("status", "domain")


class EnrollmentTokenFilterSet(django_filters.FilterSet):  # type: ignore[misc]  # django-filter ships no type hints
    used = django_filters.BooleanFilter(field_name="used_at", lookup_expr="isnull", exclude=True)

    class Meta:
        model = EnrollmentToken
        fields = ("used", "domain")


class RoundFilterSet(django_filters.FilterSet):  # type: ignore[misc]  # django-filter ships no type hints
    status = django_filters.ChoiceFilter(choices=RoundStatus.choices)
    base_version = django_filters.CharFilter(field_name="base_version__version_id")

    class Meta:
        model = Round
        fields = ("status", "base_version")


class TrainingTaskFilterSet(django_filters.FilterSet):  # type: ignore[misc]  # django-filter ships no type hints
    kind = django_filters.ChoiceFilter(choices=TaskKind.choices)
    status = django_filters.ChoiceFilter(choices=TaskStatus.choices)
    round = django_filters.CharFilter(field_name="round__round_id")

    class Meta:
        model = TrainingTask
        fields = ("kind", "status", "round")


class UpdateFilterSet(django_filters.FilterSet):  # type: ignore[misc]  # django-filter ships no type hints
    status = django_filters.ChoiceFilter(choices=UpdateStatus.choices)
    client_id = django_filters.CharFilter(field_name="device__client_id")
    round = django_filters.CharFilter(field_name="round__round_id")
    base_version = django_filters.CharFilter(field_name="base_version__version_id")
    rejection_code = django_filters.CharFilter()
    received_after = UtcIsoDateTimeFilter(field_name="received_at", lookup_expr="gte")

    class Meta:
        model = Update
        fields = ("status", "client_id", "round", "base_version", "rejection_code")
