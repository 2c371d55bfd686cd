"""Admin of the federation app: read-only lists; revoking devices is an admin action that calls the service."""

from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import HttpRequest

from apps.federation.models import EdgeDevice, EnrollmentToken, Round, StagedPayload, TrainingTask, Update
from apps.federation.services import revoke_device
from apps.governance.actors import Actor
from apps.governance.admin_mixins import ReadOnlyAdminMixin


@admin.register(EdgeDevice)
class EdgeDeviceAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("client_id", "display_name", "domain", "status", "enrolled_at", "last_seen", "current_version")
    list_filter = ("status", "domain")
    search_fields = ("client_id", "display_name")
    actions = ("revoke_selected",)

    @admin.action(description="Revoke selected devices")
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet[EdgeDevice]) -> None:
        for device in queryset:
            try:
                revoke_device(device, actor=Actor.of_request(request), reason="revoked in the admin")
            except ValidationError as exc:
                self.message_user(request, f"{device.client_id}: {'; '.join(exc.messages)}", messages.WARNING)
            else:
                self.message_user(request, f"{device.client_id} revoked", messages.SUCCESS)


@admin.register(EnrollmentToken)
class EnrollmentTokenAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("token_prefix", "note", "domain", "expires_at", "used_at", "used_by_client_id", "created_by")
    list_filter = ("domain", "expires_at", "used_at")
    search_fields = ("token_prefix", "note", "used_by_client_id")
    exclude = ("token_sha256",)


@admin.register(Round)
class RoundAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("round_id", "base_version", "status", "buffer_size_k", "deadline_at", "opened_at", "closed_at")
    list_filter = ("status", "opened_at")
    search_fields = ("round_id", "base_version__version_id")


@admin.register(TrainingTask)
class TrainingTaskAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("id", "kind", "status", "round", "created_by", "created_at", "started_at", "finished_at")
    list_filter = ("kind", "status")
    search_fields = ("id", "round__round_id", "error")


@admin.register(Update)
class UpdateAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("update_id", "device", "base_version", "round", "status", "rejection_code", "received_at")
    list_filter = ("status", "rejection_code", "received_at")
    search_fields = ("update_id", "device__client_id", "payload_sha256")


@admin.register(StagedPayload)
class StagedPayloadAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("update_id", "device", "size_bytes", "sha256", "stored_at")
    list_filter = ("stored_at",)
    search_fields = ("update_id", "device__client_id", "sha256")
