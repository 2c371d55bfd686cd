"""The audit writer every service calls, inside its own transaction, for each state change it makes.

It only ever inserts: there is no service that updates or deletes an AuditEvent. Each event joins the tamper-evident
hash chain once its transaction commits (apps.governance.chain).
"""

from typing import Any

from django.db import models

from apps.governance.chain import schedule_seal
from apps.governance.models import AuditEvent

SYSTEM_ACTOR = "system"


def actor_label_for(actor: Any, fallback: str = SYSTEM_ACTOR) -> str:
    """How an actor is named in the trail: its username, or `fallback` for system work (a worker, a command)."""
    if actor is not None and getattr(actor, "is_authenticated", False):
        return str(actor.get_username())
    return fallback


def record_audit_event(
    *,
    actor: Any,
    verb: str,
    target: models.Model | None = None,
    data: dict[str, Any] | None = None,
    actor_label: str = "",
) -> AuditEvent:
    """Append one AuditEvent. `actor` is a user or None (system); `actor_label` overrides how it is named."""
    user = actor if actor is not None and getattr(actor, "is_authenticated", False) else None
    object_type = f"{target._meta.app_label}.{target._meta.model_name}" if target is not None else ""
    event = AuditEvent.objects.create(
        actor=user,
        actor_label=actor_label or actor_label_for(user),
        verb=verb,
        object_type=object_type,
        object_id=str(target.pk) if target is not None else "",
        data=data or {},
    )
    schedule_seal()
    return event
