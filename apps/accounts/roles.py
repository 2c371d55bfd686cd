"""`role_of(user)`: the one place that says which role a request's user acts in."""

from typing import Any

from apps.accounts.choices import Role
from apps.governance.actors import Actor


def role_of(user: Any) -> Role | None:
    """The user's role, or None for anonymous, inactive or role-less users (who may do nothing). An acting party
    (apps.governance.actors.Actor) has its account's role; a device or automation named only by label has none."""
    if isinstance(user, Actor):
        user = user.user
    if user is None or not getattr(user, "is_authenticated", False) or not getattr(user, "is_active", False):
        return None
    raw = getattr(user, "role", "")
    return Role(raw) if raw in Role.values else None
