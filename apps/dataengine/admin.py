"""Admin of the data engine: read-only lists (rules change through the API, whose service checks and audits them)."""

from django.contrib import admin

from apps.dataengine.models import DataEngineRule, DataEngineTrigger, DeviceSignal, TelemetryRejection
from apps.governance.admin_mixins import ReadOnlyAdminMixin


@admin.register(DeviceSignal)
class DeviceSignalAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("client_id", "domain", "loss", "tokens", "version", "outcome", "reported_at", "received_at")
    list_filter = ("domain", "outcome", "dp_noised")
    search_fields = ("client_id", "domain", "version")


@admin.register(DataEngineRule)
class DataEngineRuleAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("name", "kind", "enabled", "task_kind", "cooldown_s", "updated_at")
    list_filter = ("kind", "enabled", "task_kind")
    search_fields = ("name",)


@admin.register(DataEngineTrigger)
class DataEngineTriggerAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("rule", "domain", "task_kind", "status", "training_task", "created_at")
    list_filter = ("status", "task_kind", "domain")
    search_fields = ("domain", "task_id", "rule__name")


@admin.register(TelemetryRejection)
class TelemetryRejectionAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("where", "client_id", "reason", "size_bytes", "received_at")
    search_fields = ("where", "client_id", "reason")
