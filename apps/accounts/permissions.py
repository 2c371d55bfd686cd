"""Role-based permission for every API view: each view says which roles may perform each of its actions."""

from collections.abc import Mapping
from typing import Any

from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from apps.accounts.choices import Role
from apps.accounts.roles import role_of

READ_ACTIONS = frozenset({"list", "retrieve", "metadata"})
EVERY_ROLE_BUT_DEVICE = frozenset({Role.OFFICER, Role.ENGINEER, Role.ADMIN})


class RolePermission(BasePermission):
    """Allows `view.action` when the user's role is in `view.action_roles[action]`; anything unlisted is refused.

    Admins may do everything the API offers; services still enforce their own rules (e.g. only officers decide).
    Object visibility (a device sees only its own records) is the view's `get_queryset`.
    """

    message = "your role may not do this"

    def has_permission(self, request: Request, view: Any) -> bool:
        role = role_of(request.user)
        if role is None:
            return False
        if role == Role.ADMIN:
            return True
        action_roles: Mapping[str, frozenset[Role]] = getattr(view, "action_roles", {})
        method = (request.method or "").lower()
        if hasattr(view, "action_map") and method not in view.action_map and method != "options":
            # A method the viewset does not offer: those who may read the resource learn that (405); others get 403.
            return role in action_roles.get("list", frozenset()) | action_roles.get("retrieve", frozenset())
        action = getattr(view, "action", None) or method
        if action == "metadata":
            # OPTIONS describes the endpoint; whoever may list it may ask.
            action = "list"
        return role in action_roles.get(action, frozenset())
