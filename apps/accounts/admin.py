"""Admin of accounts: users with their role (role changes go through the audited service), API tokens read-only."""

from typing import Any

from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.db.models import QuerySet
from django.http import HttpRequest

from apps.accounts.models import ApiToken, User
from apps.accounts.services import revoke_api_token, set_user_role
from apps.governance.actors import Actor
from apps.governance.admin_mixins import ReadOnlyAdminMixin
from apps.governance.audit import record_audit_event


@admin.register(User)
class UserAdmin(DjangoUserAdmin):  # type: ignore[type-arg]
    list_display = ("username", "role", "email", "is_active", "is_staff", "last_login")
    list_filter = ("role", "is_active", "is_staff", "is_superuser")
    fieldsets = (*(DjangoUserAdmin.fieldsets or ()), ("Role", {"fields": ["role"]}))
    add_fieldsets = (*DjangoUserAdmin.add_fieldsets, ("Role", {"fields": ["role"]}))

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        # The role goes through its service so the change is audited like every other; the rest is Django's form.
        new_role = obj.role
        if change and "role" in form.changed_data:
            obj.role = form.initial.get("role", "")
        super().save_model(request, obj, form, change)
        if change and "role" in form.changed_data:
            set_user_role(obj, new_role, actor=Actor.of_request(request))
        changed = [field for field in form.changed_data if field not in {"role", "password"}]
        if not change or changed:
            record_audit_event(
                actor=Actor.of_request(request),
                verb="accounts.user.created_in_admin" if not change else "accounts.user.changed_in_admin",
                target=obj,
                data={"fields": changed if change else ["role"], "role": obj.role},
            )


@admin.register(ApiToken)
class ApiTokenAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("key_prefix", "user", "name", "created_at", "last_used_at", "revoked_at")
    list_filter = ("revoked_at", "created_at")
    search_fields = ("key_prefix", "user__username", "name")
    exclude = ("key_sha256",)
    actions = ("revoke_selected",)

    @admin.action(description="Revoke selected API tokens")
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet[ApiToken]) -> None:
        revoked = sum(revoke_api_token(token, actor=Actor.of_request(request)) for token in queryset)
        self.message_user(request, f"{revoked} token(s) revoked", messages.SUCCESS)
