"""Live console: decisions and new candidates pushed to every open console page through the Channels group.

`broadcast_audit_event` follows `apps.governance.signals.audit_recorded` (connected in ConsoleConfig.ready()): for
the verbs an open page shows, it builds a small message inside the service's transaction and sends it to the group
only once that transaction commits, so no page ever shows a decision that rolled back. A broadcast that fails (Redis
down) is logged and dropped: the decision is already committed and a reload shows it; it never fails the decision.
"""

import asyncio
import concurrent.futures
import logging
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.db import models, transaction

from apps.governance.models import ApprovalRequest, AuditEvent, GateOverride
from apps.registry.models import Alias, ModelVersion

logger = logging.getLogger(__name__)
# Sends scheduled on a running loop, held until done (the loop keeps only weak references to its tasks).
_pending: set[asyncio.Task[None]] = set()
# The loop this process's sockets run on, noted by the consumer. The in-memory layer (the demo) keeps its queues in
# that loop, and asyncio queues are not thread-safe: a send from another thread (a job the demo runs in a thread of
# the web process) must run there, not in a loop of its own that async_to_sync would make.
_socket_loop: asyncio.AbstractEventLoop | None = None


def note_socket_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Called by ConsoleConsumer on connect: where in-memory sends from other threads must run."""
    global _socket_loop
    _socket_loop = loop


# One group for every signed-in console page: the console serves one control plane and officers watch all of it.
CONSOLE_GROUP = "console"
# The message type the consumer handles (Channels maps "console.event" to ConsoleConsumer.console_event).
EVENT_TYPE = "console.event"
# Verbs an open page reacts to: decisions, override steps, new versions and their status changes, alias moves.
LIVE_VERB_PREFIXES = (
    "governance.approval.",
    "governance.gate.",
    "registry.version.registered",
    "registry.version.status_changed",
    "registry.alias.moved",
)


def live_message(event: AuditEvent, target: models.Model | None) -> dict[str, Any] | None:
    """The message for `event`, or None for a verb no page shows. Only identifiers and statuses travel: reasons and
    notes stay on the pages that check who may read them."""
    if not event.verb.startswith(LIVE_VERB_PREFIXES):
        return None
    message: dict[str, Any] = {
        "verb": event.verb,
        "actor": event.actor_label,
        "at": event.created_at.isoformat(),
    }
    if isinstance(target, ApprovalRequest):
        version = target.version
        message |= {
            "approval": target.pk,
            "approval_status": target.status,
            "requested_by": target.requested_by.get_username(),
        }
    elif isinstance(target, GateOverride):
        version = target.request.version
        message |= {"approval": target.request_id}
    elif isinstance(target, ModelVersion):
        version = target
    elif isinstance(target, Alias):
        version = target.version
        message["alias"] = target.name
    else:
        return None
    message |= {"version_id": version.version_id, "version_status": version.status}
    return message


def _report(message: dict[str, Any], error: BaseException) -> None:
    # The decision committed already; losing the push only means open pages learn of it on their next load.
    logger.error(
        "live console: could not broadcast %s of %s (open pages show it on their next load): %s: %s",
        message["verb"],
        message["version_id"],
        type(error).__name__,
        error,
    )


def _failed(message: dict[str, Any], done: "asyncio.Future[None] | concurrent.futures.Future[None]") -> None:
    error = None if done.cancelled() else done.exception()
    if error is not None:
        _report(message, error)


def _send(message: dict[str, Any]) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    envelope = {"type": EVENT_TYPE, "event": message}
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is not None:
        # A service called from a thread that runs an event loop (async code using sync_to_async's thread-sensitive
        # mode does not, but a test driver may): async_to_sync cannot run here, so the send becomes a task of it.
        task = loop.create_task(layer.group_send(CONSOLE_GROUP, envelope))
        task.add_done_callback(lambda done: _failed(message, done))
        _pending.add(task)
        task.add_done_callback(_pending.discard)
        return
    if isinstance(layer, InMemoryChannelLayer) and _socket_loop is not None and _socket_loop.is_running():
        sent = asyncio.run_coroutine_threadsafe(layer.group_send(CONSOLE_GROUP, envelope), _socket_loop)
        sent.add_done_callback(lambda done: _failed(message, done))
        return
    try:
        async_to_sync(layer.group_send)(CONSOLE_GROUP, envelope)
    except Exception as error:
        _report(message, error)


def broadcast_audit_event(sender: Any, *, event: AuditEvent, target: models.Model | None = None, **_: Any) -> None:
    """audit_recorded receiver: queue the live message to go out after the service's transaction commits."""
    try:
        message = live_message(event, target)
    except Exception:
        # Building the message reads the target's relations; a receiver must never fail the service that sent it.
        logger.exception("live console: could not describe %s for the open pages", event.verb)
        return
    if message is not None:
        transaction.on_commit(lambda: _send(message))
