"""REST serializers of the schedules: a periodic task with its schedule in words, its params and its last outcome."""

import json
from typing import Any

from django_celery_beat.models import PeriodicTask
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from apps.schedules.models import ScheduleOutcome


class ScheduleOutcomeSerializer(serializers.ModelSerializer[ScheduleOutcome]):
    class Meta:
        model = ScheduleOutcome
        fields = ("ran_at", "status", "detail", "training_task", "consecutive_errors")
        read_only_fields = fields


class ScheduleSerializer(serializers.ModelSerializer[PeriodicTask]):
    """A django-celery-beat periodic task as the outer loop uses it (edited in the admin; read-only here)."""

    schedule = serializers.SerializerMethodField(help_text="When it fires, in words (cron times with their zone).")
    params = serializers.SerializerMethodField(
        help_text="The periodic task's kwargs: the params of the task it creates (null: not a JSON object)."
    )
    last_run_at = serializers.DateTimeField(
        read_only=True, allow_null=True, help_text="When beat last sent it (saved by beat every few minutes)."
    )
    outcome = serializers.SerializerMethodField(help_text="What its last run did; null before its first run.")

    class Meta:
        model = PeriodicTask
        fields = (
            "id",
            "name",
            "task",
            "schedule",
            "enabled",
            "params",
            "description",
            "last_run_at",
            "total_run_count",
            "outcome",
        )
        read_only_fields = fields

    def get_schedule(self, periodic: PeriodicTask) -> str:
        if periodic.crontab is not None:
            return str(periodic.crontab.human_readable)
        scheduler = periodic.scheduler
        return str(scheduler) if scheduler is not None else "no schedule"

    @extend_schema_field(OpenApiTypes.OBJECT)
    def get_params(self, periodic: PeriodicTask) -> dict[str, Any] | None:
        try:
            params = json.loads(periodic.kwargs or "{}")
        except ValueError:
            return None
        return params if isinstance(params, dict) else None

    @extend_schema_field(ScheduleOutcomeSerializer(allow_null=True))
    def get_outcome(self, periodic: PeriodicTask) -> dict[str, Any] | None:
        try:
            outcome = periodic.outcome  # selected with the periodic task (ScheduleViewSet.queryset)
        except ScheduleOutcome.DoesNotExist:
            return None
        return ScheduleOutcomeSerializer(outcome).data
