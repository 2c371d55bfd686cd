"""Admin of the outbox: read-only, so operators can see what is pending, parked and why; only the relay writes."""

from django.contrib import admin

from apps.governance.admin_mixins import ReadOnlyAdminMixin
from apps.outbox.models import OutboxEvent


@admin.register(OutboxEvent)
class OutboxEventAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("created_at", "kind", "topic", "key", "event_id", "attempts", "sent_at", "parked_at")
    list_filter = ("kind", "topic", ("sent_at", admin.EmptyFieldListFilter), ("parked_at", admin.EmptyFieldListFilter))
    search_fields = ("event_id", "key", "topic", "last_error")
    date_hierarchy = "created_at"
