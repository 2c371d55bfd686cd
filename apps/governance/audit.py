"""The audit writer every service calls, inside its own transaction, for each state change it makes.

It only ever inserts: there is no service that updates or deletes an AuditEvent. Each event joins the tamper-evident
hash chain once its transaction commits (apps.governance.chain).
"""

from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.db import models

from apps.governance.actors import ActorLike, as_actor
from apps.governance.chain import schedule_seal
from apps.governance.models import AuditEvent
from apps.governance.signals import audit_recorded
from fednested.governance.pii import Redacted, redact_payload, redactor_for


def redact_for_storage(text: str, *, where: str) -> Redacted:
    """`text` with PII replaced (FEDNESTED_PII_REDACTION), for a free-text field a service stores on its own row
    (a rejection message, a reason, an error); pass the counts to the audit event as `redacted=`."""
    return redactor_for(settings.FEDNESTED_PII_REDACTION).redact_text(text, where=where)


def redact_audit_data(data: Mapping[str, Any], *, verb: str, redacted: Mapping[str, int] = {}) -> dict[str, Any]:
    """An audit payload with PII replaced and the counts under `_redacted` (adding `redacted`, the counts of the
    caller's own redactions); for rows built without `record_audit_event` (bulk inserts)."""
    return redact_payload(data, where=f"audit {verb} data", config=settings.FEDNESTED_PII_REDACTION, already=redacted)


def record_audit_event(
    *,
    actor: ActorLike,
    verb: str,
    target: models.Model | None = None,
    data: dict[str, Any] | None = None,
    redacted: Mapping[str, int] = {},
) -> AuditEvent:
    """Append one AuditEvent. `actor` is the acting party (apps.governance.actors.Actor); a user account is
    accepted too (services that take one pass it on) and stored as what it acts as.

    `data` is redacted of PII before the row is created, so the hash chain seals the redacted payload (redacting a
    sealed event would break its link); `redacted` are counts of redactions the caller already made.
    """
    party = as_actor(actor)
    object_type = f"{target._meta.app_label}.{target._meta.model_name}" if target is not None else ""
    event = AuditEvent.objects.create(
        actor=party.user,
        actor_label=party.label,
        actor_kind=party.kind,
        verb=verb,
        object_type=object_type,
        object_id=str(target.pk) if target is not None else "",
        data=redact_audit_data(data or {}, verb=verb, redacted=redacted),
    )
    schedule_seal()
    audit_recorded.send(sender=AuditEvent, event=event, target=target)
    return event
