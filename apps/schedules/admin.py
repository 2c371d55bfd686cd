"""Admin of the schedules: the periodic tasks themselves are django-celery-beat's admin (its own app section, where
operators edit, enable and disable them); here, read-only, what each one's last run did."""

from django.contrib import admin

from apps.governance.admin_mixins import ReadOnlyAdminMixin
from apps.schedules.models import ScheduleOutcome


@admin.register(ScheduleOutcome)
class ScheduleOutcomeAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("periodic_task", "status", "ran_at", "consecutive_errors", "training_task", "detail")
    list_filter = ("status",)
    search_fields = ("periodic_task__name", "periodic_task__task", "detail")
