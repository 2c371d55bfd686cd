"""Ingest loop: one bus message → one database transaction → one offset commit, in that order.

Every envelope ends in exactly one of: buffered (valid, waiting for aggregation), rejected (an Update row with the
rejection code and message), or refused (no row can be tied to an enrolled device's new update:
`record_refused_update` writes an audit event saying why).
The offset is committed only after the transaction has committed, so a worker killed in between reprocesses the
message; the Update row's unique update id then turns the second pass into a recorded replay, never a second apply.
"""

import argparse
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Literal

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.utils import timezone

from apps.accounts.models import ApiToken
from apps.federation.choices import DeviceStatus, RoundStatus, TaskKind, TaskStatus
from apps.federation.events import bus_settings
from apps.federation.models import EdgeDevice, Round, StagedPayload, TrainingTask, Update
from apps.federation.services import (
    buffer_update,
    create_training_task,
    mark_update_validated,
    receive_update,
    record_refused_update,
    reject_update,
)
from apps.registry.models import ModelVersion
from fednested.aggregation import RejectionCode, UpdateRejected, validate_update
from fednested.checkpoints import CheckpointError
from fednested.messaging import Consumer, Message, Topic, UpdateEnvelope, make_bus
from workers.payloads import adapter_config_of, decode_adapters, fetch_payload
from workers.rounds import (
    buffer_policy,
    buffered_updates,
    champion_version,
    round_settings,
    staleness_of,
    version_manifest,
)

logger = logging.getLogger(__name__)

ACTOR_LABEL = "worker:ingest"
DEFAULT_GROUP = "fednested-ingest"
# Test hook: "after_db_commit" makes the worker SIGKILL itself after a message's transaction committed and before its
# offset is committed — the window the at-least-once design must survive.
CRASH_POINT_ENV = "FEDNESTED_INGEST_CRASH_POINT"
CRASH_POINTS = ("after_db_commit",)
# How often an idle worker looks for rounds whose deadline passed.
DEADLINE_CHECK_INTERVAL_S = 5.0
# A round whose aggregation failed this often (it was reopened each time) gets no further automatic attempt.
MAX_AUTOMATIC_AGGREGATION_ATTEMPTS = 3

OutcomeStatus = Literal["buffered", "rejected", "refused"]


@dataclass(frozen=True)
class IngestOutcome:
    """What became of one message: buffered, rejected (Update row kept with the reason), or refused (audit only)."""

    where: str
    status: OutcomeStatus
    update_id: str | None = None
    client_id: str | None = None
    code: RejectionCode | None = None
    message: str = ""
    aggregation_task_pk: int | None = None


@dataclass
class IngestStats:
    """Counts of one run of the loop, by outcome."""

    messages: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    aggregation_tasks: list[int] = field(default_factory=list)

    def add(self, outcome: IngestOutcome) -> None:
        self.messages += 1
        self.by_status[outcome.status] = self.by_status.get(outcome.status, 0) + 1
        if outcome.aggregation_task_pk is not None:
            self.aggregation_tasks.append(outcome.aggregation_task_pk)


def device_signing_keys(device: EdgeDevice) -> list[bytes]:
    """The HMAC keys a device may sign envelopes with: the SHA-256 (hex) of each of its live API tokens.

    The database keeps only token hashes, so the hash is the shared secret: the device computes it from its token.
    """
    hashes = ApiToken.objects.filter(user_id=device.user_id, revoked_at__isnull=True).values_list(
        "key_sha256", flat=True
    )
    return [value.encode("ascii") for value in hashes]


def _refuse(
    message: Message, outcome_code: RejectionCode, text: str, *, envelope: UpdateEnvelope | None
) -> IngestOutcome:
    record_refused_update(
        code=outcome_code.value,
        message=text,
        where=message.where(),
        key=message.key,
        update_id=str(envelope.update_id) if envelope is not None else None,
        client_id=envelope.client_id if envelope is not None else None,
        actor_label=ACTOR_LABEL,
    )
    logger.warning("refused %s (%s): %s", message.where(), outcome_code.value, text)
    return IngestOutcome(
        where=message.where(),
        status="refused",
        update_id=str(envelope.update_id) if envelope is not None else None,
        client_id=envelope.client_id if envelope is not None else None,
        code=outcome_code,
        message=text,
    )


def _check_identity(envelope: UpdateEnvelope) -> EdgeDevice:
    device = EdgeDevice.objects.filter(client_id=envelope.client_id).first()
    if device is None:
        raise UpdateRejected(RejectionCode.UNKNOWN_CLIENT, f"no enrolled device has client id {envelope.client_id!r}")
    if device.status != DeviceStatus.ACTIVE:
        raise UpdateRejected(RejectionCode.REVOKED_CLIENT, f"device {device.client_id!r} is {device.status}")
    if not any(envelope.verify_hmac_sha256(key) for key in device_signing_keys(device)):
        raise UpdateRejected(
            RejectionCode.BAD_SIGNATURE,
            f"update {envelope.update_id}: signature {envelope.signature[:20]!r}… does not verify under any live key "
            f"of device {device.client_id!r}",
        )
    _check_staged_payload(envelope, device)
    return device


def _check_staged_payload(envelope: UpdateEnvelope, device: EdgeDevice) -> None:
    """The envelope's claim check must be this device's own upload for this update id, exactly as it was stored.

    Without this a device could point its envelope at any file in the artifact store (another device's payload, a
    model version's weights) and have it checked and aggregated as its own.
    """
    staged = StagedPayload.objects.filter(update_id=str(envelope.update_id)).select_related("device").first()
    if staged is None:
        raise UpdateRejected(
            RejectionCode.MALFORMED,
            f"payload uri {envelope.payload.uri!r}: device {device.client_id!r} uploaded no payload for update id "
            f"{envelope.update_id} (upload it before publishing the envelope)",
        )
    if staged.device_id != device.pk:
        raise UpdateRejected(
            RejectionCode.MALFORMED,
            f"update id {envelope.update_id} was uploaded by device {staged.device.client_id!r}, "
            f"not {device.client_id!r}",
        )
    claimed = (envelope.payload.uri, envelope.payload.sha256, envelope.payload.size_bytes)
    stored = (staged.uri, staged.sha256, staged.size_bytes)
    if claimed != stored:
        raise UpdateRejected(
            RejectionCode.MALFORMED,
            f"payload uri {envelope.payload.uri!r} (sha256 {envelope.payload.sha256}, {envelope.payload.size_bytes} "
            f"bytes) is not the upload of update id {envelope.update_id} ({staged.uri}, sha256 {staged.sha256}, "
            f"{staged.size_bytes} bytes)",
        )


def _check_references(envelope: UpdateEnvelope) -> tuple[ModelVersion, Round | None]:
    existing = Update.objects.filter(update_id=str(envelope.update_id)).first()
    if existing is not None:
        same = existing.envelope == envelope.model_dump(mode="json")
        raise UpdateRejected(
            RejectionCode.REPLAYED,
            f"update {envelope.update_id} was already received ({existing.status})"
            + ("" if same else "; this envelope differs from the recorded one"),
        )
    base = ModelVersion.objects.filter(version_id=envelope.base_version).first()
    if base is None:
        raise UpdateRejected(
            RejectionCode.UNKNOWN_BASE_VERSION, f"model version {envelope.base_version!r} is not registered"
        )
    if envelope.round_id is None:
        return base, None
    round_ = Round.objects.filter(round_id=envelope.round_id).first()
    if round_ is None:
        raise UpdateRejected(RejectionCode.MALFORMED, f"round {envelope.round_id!r} does not exist")
    if round_.status != RoundStatus.OPEN:
        raise UpdateRejected(
            RejectionCode.TOO_STALE, f"round {round_.round_id!r} is {round_.status}; join the next round"
        )
    if round_.base_version_id != base.pk:
        raise UpdateRejected(
            RejectionCode.MALFORMED,
            f"round {round_.round_id!r} trains {round_.base_version.version_id!r}, "
            f"the update is on {base.version_id!r}",
        )
    return base, round_


def _check_update(envelope: UpdateEnvelope, base: ModelVersion, round_: Round | None) -> None:
    """Staleness, payload and tensors; raises UpdateRejected with the first problem."""
    client_id = envelope.client_id
    round_config = round_settings(round_)
    staleness = staleness_of(base, champion_version())
    if staleness is None:
        raise UpdateRejected(
            RejectionCode.TOO_STALE,
            f"base version {base.version_id!r} is not on the champion's lineage",
            client_id=client_id,
        )
    if staleness > round_config.max_staleness:
        raise UpdateRejected(
            RejectionCode.TOO_STALE,
            f"base version {base.version_id!r} is {staleness} versions behind the champion, "
            f"the limit is {round_config.max_staleness}",
            client_id=client_id,
        )
    try:
        manifest = version_manifest(base)
    except CheckpointError as error:
        raise UpdateRejected(
            RejectionCode.UNKNOWN_BASE_VERSION, f"base version cannot be used for checks: {error}", client_id=client_id
        ) from None
    config = adapter_config_of(envelope.adapter, client_id=client_id)
    raw = fetch_payload(
        envelope.payload.uri,
        sha256=envelope.payload.sha256,
        size_bytes=envelope.payload.size_bytes,
        max_bytes=round_config.limits.max_bytes,
        root=Path(settings.FEDNESTED_ARTIFACT_ROOT),
        client_id=client_id,
    )
    validate_update(
        decode_adapters(raw, client_id=client_id), config, manifest, round_config.limits, client_id=client_id
    )


def _enqueue_if_ready(round_: Round, now: datetime) -> int | None:
    """Create the round's aggregation task (sent after commit) when its buffer is ready and none is pending."""
    locked = Round.objects.select_for_update().get(pk=round_.pk)
    if locked.status != RoundStatus.OPEN:
        return None
    aggregations = TrainingTask.objects.filter(round=locked, kind=TaskKind.EXPERT_AGGREGATION)
    if aggregations.filter(status__in=[TaskStatus.PENDING, TaskStatus.RUNNING]).exists():
        return None
    if aggregations.filter(status=TaskStatus.FAILED).count() >= MAX_AUTOMATIC_AGGREGATION_ATTEMPTS:
        # A failure that repeats is not transient: an engineer starts the next attempt (POST /api/v1/tasks/).
        return None
    updates = buffered_updates(locked)
    oldest = updates.values_list("received_at", flat=True).first()
    decision = buffer_policy(locked, round_settings(locked)).decide(
        buffered=updates.count(), oldest_received_at=oldest, now=now
    )
    if not decision.ready or decision.reason is None:
        return None
    task = create_training_task(
        kind=TaskKind.EXPERT_AGGREGATION,
        actor=None,
        round_=locked,
        params={"round_id": locked.round_id, "trigger": decision.reason.value},
    )
    logger.info("round %s ready (%s): aggregation task %s", locked.round_id, decision.reason.value, task.pk)
    return task.pk


def ingest_message(message: Message, *, now: Callable[[], datetime] = timezone.now) -> IngestOutcome:
    """Handle one message in one transaction; returns what became of it. Never raises for a bad envelope.

    Raises only when the worker itself cannot go on (database or artifact store unreachable, a round's config
    unreadable): the message is then left uncommitted and handled again after a restart.
    """
    if message.error is not None:
        with transaction.atomic():
            return _refuse(message, RejectionCode.MALFORMED, str(message.error), envelope=None)
    envelope = message.event
    if not isinstance(envelope, UpdateEnvelope):
        with transaction.atomic():
            kind = type(envelope).__name__
            return _refuse(message, RejectionCode.MALFORMED, f"expected an UpdateEnvelope, got {kind}", envelope=None)
    with transaction.atomic():
        try:
            device = _check_identity(envelope)
            base, round_ = _check_references(envelope)
            try:
                update, created = receive_update(envelope.model_dump(mode="json"), device=device)
            except (ValidationError, PermissionDenied) as error:
                # A race with another path (e.g. the REST API) after our checks: the service has the last word.
                raise UpdateRejected(RejectionCode.MALFORMED, f"receive_update refused it: {error}") from None
            if not created:
                raise UpdateRejected(RejectionCode.REPLAYED, f"update {update.update_id} was already received")
        except UpdateRejected as refusal:
            return _refuse(message, refusal.code, refusal.message, envelope=envelope)
        # An envelope without a round id may have joined the open round on its base version (receive_update).
        round_ = update.round
        try:
            _check_update(envelope, base, round_)
        except UpdateRejected as rejection:
            reject_update(update, rejection.code.value, rejection.message, actor_label=ACTOR_LABEL)
            logger.warning("rejected update %s (%s): %s", update.update_id, rejection.code.value, rejection.message)
            return IngestOutcome(
                where=message.where(),
                status="rejected",
                update_id=update.update_id,
                client_id=envelope.client_id,
                code=rejection.code,
                message=rejection.message,
            )
        mark_update_validated(update, actor_label=ACTOR_LABEL)
        buffer_update(update, actor_label=ACTOR_LABEL)
        task_pk = _enqueue_if_ready(round_, now()) if round_ is not None else None
        return IngestOutcome(
            where=message.where(),
            status="buffered",
            update_id=update.update_id,
            client_id=envelope.client_id,
            aggregation_task_pk=task_pk,
        )


def enqueue_due_rounds(now: datetime) -> list[int]:
    """Aggregation tasks for open rounds whose deadline passed while no update arrived to trigger the check."""
    created = []
    for round_ in Round.objects.filter(status=RoundStatus.OPEN).order_by("opened_at", "id"):
        with transaction.atomic():
            task_pk = _enqueue_if_ready(round_, now)
        if task_pk is not None:
            created.append(task_pk)
    return created


def _crash_if_asked(point: str) -> None:
    if os.environ.get(CRASH_POINT_ENV) == point:
        logger.warning("test hook %s=%s: killing this process", CRASH_POINT_ENV, point)
        os.kill(os.getpid(), signal.SIGKILL)


def run_ingest(
    consumer: Consumer,
    *,
    stop: threading.Event | None = None,
    max_messages: int | None = None,
    idle_exit_s: float | None = None,
    poll_timeout_s: float = 1.0,
) -> IngestStats:
    """Consume until `stop` is set, `max_messages` were handled, or nothing arrived for `idle_exit_s` seconds.

    Per message: `ingest_message` (one committed transaction), then the offset commit. Between messages, rounds past
    their deadline get their aggregation task.
    """
    stats = IngestStats()
    stop = stop or threading.Event()
    last_message_at = time.monotonic()
    last_deadline_check = 0.0
    while not stop.is_set() and (max_messages is None or stats.messages < max_messages):
        message = consumer.poll(poll_timeout_s)
        if message is not None:
            outcome = ingest_message(message)
            _crash_if_asked("after_db_commit")
            consumer.commit(message)
            stats.add(outcome)
            last_message_at = time.monotonic()
        elif idle_exit_s is not None and time.monotonic() - last_message_at >= idle_exit_s:
            break
        if time.monotonic() - last_deadline_check >= DEADLINE_CHECK_INTERVAL_S:
            stats.aggregation_tasks.extend(enqueue_due_rounds(timezone.now()))
            last_deadline_check = time.monotonic()
    return stats


def main(argv: list[str]) -> int:
    """Command line of `python -m workers.ingest`."""
    parser = argparse.ArgumentParser(prog="python -m workers.ingest", description=__doc__)
    parser.add_argument("--group", default=DEFAULT_GROUP, help="consumer group id (default: %(default)s)")
    parser.add_argument("--max-messages", type=int, default=None, help="exit after this many messages")
    parser.add_argument("--idle-exit", type=float, default=None, metavar="SECONDS", help="exit when idle this long")
    parser.add_argument("--poll-timeout", type=float, default=1.0, metavar="SECONDS")
    arguments = parser.parse_args(argv)
    point = os.environ.get(CRASH_POINT_ENV)
    if point and point not in CRASH_POINTS:
        parser.error(f"{CRASH_POINT_ENV}={point!r} is not one of {CRASH_POINTS}")
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        # Finish the message in hand (its transaction and offset commit), then leave the group cleanly.
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    with make_bus(bus_settings()) as bus, bus.consumer(arguments.group, [Topic.UPDATES]) as consumer:
        logger.info("ingest worker consuming %s as group %s", Topic.UPDATES.value, arguments.group)
        stats = run_ingest(
            consumer,
            stop=stop,
            max_messages=arguments.max_messages,
            idle_exit_s=arguments.idle_exit,
            poll_timeout_s=arguments.poll_timeout,
        )
    logger.info("ingest worker stopped after %d messages: %s", stats.messages, stats.by_status)
    return 0
