"""Signals of the audit trail: what other parts of the control plane follow without the services knowing them.

Every state change a service makes is an audit event (apps/governance/audit.py), so `audit_recorded` is the one
place the evidence sinks (MLflow, DataHub) and the live console learn of changes. It is sent inside the service's
transaction, right after the event row is inserted: a receiver that writes (an outbox row) commits or rolls back
with the change; a receiver that reaches outside (a websocket broadcast) must wait with `transaction.on_commit`.
A receiver must not raise for an event it does not follow.
"""

from django.dispatch import Signal

# kwargs: event (the AuditEvent row), target (the changed model instance, or None).
audit_recorded = Signal()
