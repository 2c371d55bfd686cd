"""The one owner of an edge update's way in: `submit_update` takes an envelope through every check once, outside any
transaction, then writes the outcome in one short transaction and decides whether its window is ready.

Every envelope ends in exactly one of:
- buffered: an `Update` row waiting in a window (or, when no window fits yet, waiting for the next one);
- rejected: an `Update` row with the rejection code and message (it names an enrolled device and a known base);
- refused: no row can be tied to an enrolled device's new update (unknown or revoked device, bad signature,
  another device's upload, a replay, an unknown base); an audit event says why;
- duplicate: the same device sent the identical envelope again; its row is returned unchanged.
The Kafka consumer and `POST /api/v1/updates/` are thin entry points around this module.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Count, QuerySet
from django.utils import timezone

from apps.federation.choices import DeviceStatus, RoundMode, RoundStatus, TaskKind, TaskStatus, UpdateStatus
from apps.federation.identity import device_public_keys
from apps.federation.models import EdgeDevice, Round, StagedPayload, TrainingTask, Update
from apps.federation.payloads import adapter_config_of, decode_adapters, fetch_payload
from apps.federation.services import (
    adopt_waiting_updates,
    continue_series,
    create_training_task,
    device_actor_label,
    fail_training_task,
    record_refused_update,
    reopen_round_after_failure,
)
from apps.federation.windows import (
    champion_version,
    round_settings,
    staleness_of,
    version_manifest,
    window_readiness,
)
from apps.governance.audit import record_audit_event
from apps.registry.choices import CHAMPION_ALIAS
from apps.registry.models import Alias, ModelVersion
from fednested.adapters.lora import layer_index
from fednested.aggregation import RejectionCode, UpdateRejected, expert_key, validate_update
from fednested.aggregation.settings import RoundAggregationSettings, RoundSettingsError
from fednested.checkpoints import CheckpointError, Manifest
from fednested.messaging import UpdateEnvelope

logger = logging.getLogger(__name__)

OutcomeStatus = Literal["buffered", "rejected", "refused", "duplicate"]
# A window whose aggregation failed this often (it was reopened each time) gets no further automatic attempt.
MAX_AUTOMATIC_AGGREGATION_ATTEMPTS = 3


@dataclass(frozen=True)
class UpdateOutcome:
    """What became of one envelope; `where` says where it came from (topic/partition/offset, or the API)."""

    where: str
    status: OutcomeStatus
    update_id: str | None = None
    client_id: str | None = None
    code: RejectionCode | None = None
    message: str = ""
    round_id: str | None = None
    staleness: int | None = None
    aggregation_task_pk: int | None = None
    update_pk: int | None = None


@dataclass(frozen=True)
class _Checked:
    """What the checks established: who sent it, on which base, for which window, and how stale it is."""

    device: EdgeDevice
    base: ModelVersion
    window: Round | None
    staleness: int | None
    notes: dict[str, Any]


def refuse_message(
    *, where: str, code: RejectionCode, message: str, actor_label: str, key: str | None = None
) -> UpdateOutcome:
    """Record a message that is no envelope at all (undecodable, another schema): audit only."""
    with transaction.atomic():
        record_refused_update(code=code.value, message=message, where=where, key=key, actor_label=actor_label)
    logger.warning("refused %s (%s): %s", where, code.value, message)
    return UpdateOutcome(where=where, status="refused", code=code, message=message)


def submit_update(
    envelope: UpdateEnvelope,
    *,
    where: str,
    actor_label: str,
    sender: EdgeDevice | None = None,
    key: str | None = None,
    now: Callable[[], datetime] = timezone.now,
) -> UpdateOutcome:
    """Check `envelope` once and record what became of it; never raises for anything the envelope or its payload
    holds. `sender` is the device an API request authenticated as (None on the bus, where the signature alone
    identifies it). Raises only when the control plane itself cannot go on (database or artifact store down)."""
    update_id, client_id = str(envelope.update_id), envelope.client_id
    try:
        device = _identify(envelope, sender)
        _check_freshness(envelope, now())
        existing = Update.objects.filter(update_id=update_id).first()
        if existing is not None:
            if existing.device_id == device.pk and _same_content(existing, envelope):
                return _duplicate(existing, where=where, actor_label=actor_label)
            raise UpdateRejected(
                RejectionCode.REPLAYED,
                f"update {update_id} was already received ({existing.status})"
                + ("" if existing.device_id == device.pk else " from another device")
                + "; this envelope differs from the recorded one",
            )
        _check_staged_payload(envelope, device)
        base = ModelVersion.objects.filter(version_id=envelope.base_version).first()
        if base is None:
            raise UpdateRejected(
                RejectionCode.UNKNOWN_BASE_VERSION, f"model version {envelope.base_version!r} is not registered"
            )
    except UpdateRejected as refusal:
        with transaction.atomic():
            record_refused_update(
                code=refusal.code.value,
                message=refusal.message,
                where=where,
                key=key,
                update_id=update_id,
                client_id=client_id,
                actor_label=actor_label,
            )
        logger.warning("refused update %s from %s at %s (%s): %s", update_id, client_id, where, refusal.code, refusal)
        return UpdateOutcome(
            where=where,
            status="refused",
            update_id=update_id,
            client_id=client_id,
            code=refusal.code,
            message=refusal.message,
        )
    window: Round | None = None
    staleness: int | None = None
    notes: dict[str, Any] = {}
    rejection: UpdateRejected | None = None
    try:
        window = _route(envelope, device, base)
        config = round_settings(window)
        staleness = _check_staleness(base, config)
        manifest = _base_manifest(base)
        _check_claims(envelope, manifest)
        notes = _check_payload(envelope, manifest, config)
    except UpdateRejected as error:
        rejection = error
    except RoundSettingsError as error:
        # The window's config was valid when it opened; one that no longer parses is the operators' to fix.
        rejection = UpdateRejected(RejectionCode.WINDOW_UNUSABLE, f"the window's settings are unusable: {error}")
    checked = _Checked(device=device, base=base, window=window, staleness=staleness, notes=notes)
    return _record(envelope, checked, rejection, where=where, actor_label=actor_label, now=now)


def _identify(envelope: UpdateEnvelope, sender: EdgeDevice | None) -> EdgeDevice:
    device = EdgeDevice.objects.filter(client_id=envelope.client_id).select_related("user").first()
    if device is None:
        raise UpdateRejected(RejectionCode.UNKNOWN_CLIENT, f"no enrolled device has client id {envelope.client_id!r}")
    if sender is not None and sender.pk != device.pk:
        raise UpdateRejected(
            RejectionCode.NOT_OWNER,
            f"envelope client_id {envelope.client_id!r} is not the authenticated device {sender.client_id!r}; "
            "a device submits updates for itself only",
        )
    if device.status != DeviceStatus.ACTIVE:
        raise UpdateRejected(RejectionCode.REVOKED_CLIENT, f"device {device.client_id!r} is {device.status}")
    if not any(envelope.verify(key) for key in device_public_keys(device, at=envelope.created_at)):
        raise UpdateRejected(
            RejectionCode.BAD_SIGNATURE,
            f"update {envelope.update_id}: signature {envelope.signature[:24]!r}… does not verify under any key of "
            f"device {device.client_id!r} that was live at {envelope.created_at.isoformat()}",
        )
    return device


def _same_content(existing: Update, envelope: UpdateEnvelope) -> bool:
    """The recorded envelope again, whatever its (verified) signature: a device that renewed its key in between
    signs the same update differently."""
    recorded = {name: value for name, value in existing.envelope.items() if name != "signature"}
    return recorded == envelope.model_dump(mode="json", exclude={"signature"})


def _check_freshness(envelope: UpdateEnvelope, now: datetime) -> None:
    """Replay window: besides its update id (accepted once), an envelope must have been made recently, and not in
    the future beyond clock skew; a replay of an old envelope whose row was pruned is refused here."""
    age = (now - envelope.created_at).total_seconds()
    if age > settings.FEDNESTED_UPDATE_MAX_AGE_S:
        raise UpdateRejected(
            RejectionCode.EXPIRED,
            f"update {envelope.update_id} was created {envelope.created_at.isoformat()}, more than "
            f"{settings.FEDNESTED_UPDATE_MAX_AGE_S} s ago",
        )
    if -age > settings.FEDNESTED_UPDATE_MAX_CLOCK_SKEW_S:
        raise UpdateRejected(
            RejectionCode.EXPIRED,
            f"update {envelope.update_id} claims to be created at {envelope.created_at.isoformat()}, "
            f"{-age:.0f} s in the future (device clock wrong?)",
        )


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
            RejectionCode.NOT_OWNER,
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


def _route(envelope: UpdateEnvelope, device: EdgeDevice, base: ModelVersion, *, lock: bool = False) -> Round | None:
    """The window the update joins, or None when none fits yet (it then waits for the next one that does).

    A named asynchronous window sends the update to its series' open window: in asynchronous mode a round id is a
    hint, never a reason to refuse (the window may have closed while the device trained). A named synchronous round
    must be open, have the device in its cohort, and train the update's base. With no name: the oldest open
    asynchronous window, else an open synchronous round of the device's cohort on that base.
    """
    rounds = Round.objects.select_for_update() if lock else Round.objects.all()
    if envelope.round_id is not None:
        named = rounds.filter(round_id=envelope.round_id).first()
        if named is None:
            raise UpdateRejected(RejectionCode.UNKNOWN_ROUND, f"round {envelope.round_id!r} does not exist")
        if named.mode == RoundMode.SYNC:
            if named.status != RoundStatus.OPEN:
                raise UpdateRejected(
                    RejectionCode.ROUND_CLOSED,
                    f"synchronous round {named.round_id!r} is {named.status}; train the current champion instead",
                )
            if not named.cohort.filter(pk=device.pk).exists():
                raise UpdateRejected(
                    RejectionCode.NOT_IN_COHORT,
                    f"device {device.client_id!r} is not in the cohort of synchronous round {named.round_id!r}",
                )
            if named.base_version_id != base.pk:
                raise UpdateRejected(
                    RejectionCode.NOT_ON_LINEAGE,
                    f"synchronous round {named.round_id!r} trains {named.base_version.version_id!r}, "
                    f"the update is on {base.version_id!r}",
                )
            return named
        in_series = _open_async(rounds).filter(series=named.series).order_by("sequence", "id").first()
        if in_series is not None:
            return in_series
    window = _open_async(rounds).order_by("opened_at", "id").first()
    if window is not None:
        return window
    return (
        rounds.filter(mode=RoundMode.SYNC, status=RoundStatus.OPEN, base_version=base, cohort=device)
        .order_by("opened_at", "id")
        .first()
    )


def _open_async(rounds: QuerySet[Round]) -> QuerySet[Round]:
    """Open asynchronous windows that still take updates: not those whose aggregation failed too often (they wait
    for an engineer; their series goes on in a successor)."""
    # A subquery rather than an annotation: the caller may lock the rows, and FOR UPDATE refuses GROUP BY.
    stuck = (
        TrainingTask.objects.filter(kind=TaskKind.EXPERT_AGGREGATION, status=TaskStatus.FAILED, round__isnull=False)
        .values("round")
        .annotate(failures=Count("id"))
        .filter(failures__gte=MAX_AUTOMATIC_AGGREGATION_ATTEMPTS)
        .values("round")
    )
    return rounds.filter(mode=RoundMode.ASYNC, status=RoundStatus.OPEN).exclude(pk__in=stuck)


def _check_staleness(base: ModelVersion, config: RoundAggregationSettings) -> int:
    champion = champion_version()
    staleness = staleness_of(base, champion)
    if staleness is None:
        on = champion.version_id if champion is not None else "none"
        raise UpdateRejected(
            RejectionCode.NOT_ON_LINEAGE,
            f"base version {base.version_id!r} is not the champion ({on}) or one of its ancestors",
        )
    if staleness > config.max_staleness:
        raise UpdateRejected(
            RejectionCode.TOO_STALE,
            f"base version {base.version_id!r} is τ={staleness} promotions behind the champion, "
            f"the limit is {config.max_staleness}",
        )
    return staleness


def _base_manifest(base: ModelVersion) -> Manifest:
    try:
        return version_manifest(base)
    except CheckpointError as error:
        raise UpdateRejected(
            RejectionCode.UNKNOWN_BASE_VERSION, f"base version cannot be used for checks: {error}"
        ) from None


def _check_claims(envelope: UpdateEnvelope, manifest: Manifest) -> None:
    """The device's own figures must fit together and the base: routed-token counts name experts of the base and,
    per layer, add up to at most top-k × the tokens it trained on (each token is routed to k experts; the edge
    client counts real tokens only, so an honest device meets this exactly); it trained on at least one token per
    example."""
    assert manifest.partition is not None  # _base_manifest required it
    experts = {
        expert_key(layer_index(name), expert)
        for name, entry in manifest.partition.fused_expert_params().items()
        for expert in range(int(entry.shape[0]))
    }
    unknown = sorted(set(envelope.routed_tokens) - experts)
    if unknown:
        raise UpdateRejected(
            RejectionCode.IMPLAUSIBLE_CLAIM,
            f"routed_tokens names experts {', '.join(unknown[:5])} the base ({len(experts)} experts in all) does not "
            "have",
        )
    trained = envelope.metrics.get("tokens")
    if trained is None:
        if envelope.routed_tokens:
            raise UpdateRejected(
                RejectionCode.IMPLAUSIBLE_CLAIM,
                "routed_tokens without a 'tokens' metric: say how many tokens the device trained on, so that the "
                "counts can be checked",
            )
        return
    if trained < envelope.examples:
        raise UpdateRejected(
            RejectionCode.IMPLAUSIBLE_CLAIM,
            f"{envelope.examples} examples cannot have been trained on {trained:.0f} tokens",
        )
    if not envelope.routed_tokens:
        return
    config = manifest.architecture.get("config") or {}
    top_k = config.get("num_experts_per_tok") if isinstance(config, dict) else None
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise UpdateRejected(
            RejectionCode.UNKNOWN_BASE_VERSION,
            f"the base's config has no usable num_experts_per_tok ({top_k!r}); routed tokens cannot be checked",
        )
    per_layer: dict[str, int] = {}
    for name, tokens in envelope.routed_tokens.items():
        layer = name.split(".")[0]
        per_layer[layer] = per_layer.get(layer, 0) + tokens
    ceiling = top_k * trained
    over = sorted((int(layer), total) for layer, total in per_layer.items() if total > ceiling)
    if over:
        layer_number, total = over[0]
        raise UpdateRejected(
            RejectionCode.IMPLAUSIBLE_CLAIM,
            f"routed_tokens of layer {layer_number} add up to {total}, but {trained:.0f} trained tokens routed to "
            f"top-{top_k} experts make at most {ceiling:.0f}",
        )


def _check_payload(envelope: UpdateEnvelope, manifest: Manifest, config: RoundAggregationSettings) -> dict[str, Any]:
    """The payload's tensors (names, dtype, shapes, finiteness, norms); returns notes for the audit record."""
    client_id = envelope.client_id
    adapter = adapter_config_of(envelope.adapter, client_id=client_id)
    raw = fetch_payload(
        envelope.payload.uri,
        sha256=envelope.payload.sha256,
        size_bytes=envelope.payload.size_bytes,
        max_bytes=config.limits.max_bytes,
        root=Path(settings.FEDNESTED_ARTIFACT_ROOT),
        client_id=client_id,
    )
    validated = validate_update(decode_adapters(raw, client_id=client_id), adapter, manifest, config.limits)
    ignored = sorted(set(envelope.routed_tokens) - set(validated.experts))
    # Counted by the device's routers but carrying no adapter (e.g. adapters on some layers only): those counts earn
    # no weight, since aggregation weights only the experts an update carries; the record says which were ignored.
    return {"routed_tokens_without_adapters": ignored[:50]} if ignored else {}


def _duplicate(existing: Update, *, where: str, actor_label: str) -> UpdateOutcome:
    with transaction.atomic():
        record_audit_event(
            actor=None,
            actor_label=actor_label,
            verb="federation.update.resent",
            target=existing,
            data={"update_id": existing.update_id, "where": where, "status": existing.status},
        )
    return UpdateOutcome(
        where=where,
        status="duplicate",
        update_id=existing.update_id,
        client_id=existing.device.client_id,
        message=f"update {existing.update_id} was already received ({existing.status}); nothing changed",
        round_id=existing.round.round_id if existing.round is not None else None,
        staleness=existing.staleness,
        update_pk=existing.pk,
    )


def _record(
    envelope: UpdateEnvelope,
    checked: _Checked,
    rejection: UpdateRejected | None,
    *,
    where: str,
    actor_label: str,
    now: Callable[[], datetime],
) -> UpdateOutcome:
    """The one short transaction: the Update row (buffered or rejected), its audit row, and the window decision."""
    update_id, device = str(envelope.update_id), checked.device
    task_pk = None
    with transaction.atomic():
        # Locks in one order everywhere (the champion's alias, then the window): enqueue_if_ready takes the same.
        Alias.objects.select_for_update().filter(name=CHAMPION_ALIAS).first()
        # Re-read under lock what may have moved since the checks: the device's standing and the window (a window
        # claimed for aggregation meanwhile takes nothing more; the update then goes to its successor or waits).
        status = EdgeDevice.objects.select_for_update().filter(pk=device.pk).values_list("status", flat=True).first()
        if status != DeviceStatus.ACTIVE:
            rejection = UpdateRejected(RejectionCode.REVOKED_CLIENT, f"device {device.client_id!r} is {status}")
        window = checked.window
        if rejection is None:
            try:
                window = _route(envelope, device, checked.base, lock=True)
            except UpdateRejected as error:
                rejection = error
        moment = now()
        try:
            with transaction.atomic():
                update = Update.objects.create(
                    update_id=update_id,
                    device=device,
                    base_version=checked.base,
                    round=window if rejection is None else None,
                    status=UpdateStatus.BUFFERED if rejection is None else UpdateStatus.REJECTED,
                    rejection_code=rejection.code.value if rejection is not None else "",
                    rejection_message=rejection.message if rejection is not None else "",
                    staleness=checked.staleness,
                    payload_uri=envelope.payload.uri,
                    payload_sha256=envelope.payload.sha256,
                    payload_bytes=envelope.payload.size_bytes,
                    examples=envelope.examples,
                    routed_tokens=dict(envelope.routed_tokens),
                    metrics=dict(envelope.metrics),
                    envelope=envelope.model_dump(mode="json"),
                    status_changed_at=moment,
                )
        except IntegrityError:
            # The same update id was recorded by a concurrent submission between our check and this insert.
            existing = Update.objects.select_related("device", "round").get(update_id=update_id)
            if existing.device_id == device.pk and _same_content(existing, envelope):
                return _duplicate(existing, where=where, actor_label=actor_label)
            record_refused_update(
                code=RejectionCode.REPLAYED.value,
                message=f"update {update_id} was recorded concurrently with another envelope",
                where=where,
                update_id=update_id,
                client_id=device.client_id,
                actor_label=actor_label,
            )
            return UpdateOutcome(
                where=where,
                status="refused",
                update_id=update_id,
                client_id=device.client_id,
                code=RejectionCode.REPLAYED,
                message=f"update {update_id} was recorded concurrently with another envelope",
            )
        EdgeDevice.objects.filter(pk=device.pk).update(last_seen=moment)
        data: dict[str, Any] = {
            "update_id": update_id,
            "where": where,
            "base_version": checked.base.version_id,
            "staleness": checked.staleness,
            "round": window.round_id if window is not None and rejection is None else None,
            "payload_sha256": envelope.payload.sha256,
            **checked.notes,
        }
        if rejection is not None:
            data |= {"code": rejection.code.value, "message": rejection.message}
        record_audit_event(
            actor=device.user,
            actor_label=device_actor_label(device.client_id),
            verb=f"federation.update.{update.status}",
            target=update,
            data=data,
        )
        if rejection is None and window is not None:
            task_pk = enqueue_if_ready(window, moment)
    if rejection is not None:
        logger.warning("rejected update %s (%s): %s", update_id, rejection.code.value, rejection.message)
    return UpdateOutcome(
        where=where,
        status="buffered" if rejection is None else "rejected",
        update_id=update_id,
        client_id=device.client_id,
        code=rejection.code if rejection is not None else None,
        message=rejection.message if rejection is not None else "",
        round_id=window.round_id if window is not None and rejection is None else None,
        staleness=checked.staleness,
        aggregation_task_pk=task_pk,
        update_pk=update.pk,
    )


def enqueue_if_ready(round_: Round, now: datetime) -> int | None:
    """Create the window's aggregation task (sent after commit) when it is ready and none is pending; the caller
    holds the transaction. A window that is ready but must wait says why in its record."""
    # One decision at a time across processes (ingest workers, API requests): the champion's alias row is the lock,
    # so two windows never both decide they may aggregate onto the same champion.
    Alias.objects.select_for_update().filter(name=CHAMPION_ALIAS).first()
    locked = Round.objects.select_for_update().get(pk=round_.pk)
    if locked.status != RoundStatus.OPEN:
        return None
    aggregations = TrainingTask.objects.filter(round=locked, kind=TaskKind.EXPERT_AGGREGATION)
    if aggregations.filter(status__in=[TaskStatus.PENDING, TaskStatus.RUNNING]).exists():
        return None
    failed = list(aggregations.filter(status=TaskStatus.FAILED).order_by("-finished_at", "-id"))
    if len(failed) >= MAX_AUTOMATIC_AGGREGATION_ATTEMPTS:
        # A failure that repeats is not transient: an engineer starts the next attempt (POST /api/v1/tasks/) or
        # cancels the window. Meanwhile new updates go to the next window of its series, not into this one.
        _note_waiting(
            locked,
            f"aggregation failed {len(failed)} times (last: {failed[0].error[:300]}); an engineer retries it "
            "(POST /api/v1/tasks/) or cancels the window",
        )
        if not Round.objects.filter(series=locked.series, status=RoundStatus.OPEN, sequence__gt=locked.sequence):
            continue_series(locked, base_version=champion_version() or locked.base_version, actor_label="system")
        return None
    readiness = window_readiness(locked, round_settings(locked), now)
    _note_waiting(locked, readiness.waiting)
    if not readiness.ready:
        return None
    task = create_training_task(
        kind=TaskKind.EXPERT_AGGREGATION,
        actor=None,
        round_=locked,
        params={"round_id": locked.round_id, "trigger": readiness.trigger},
    )
    logger.info("window %s ready (%s): aggregation task %s", locked.round_id, readiness.trigger, task.pk)
    return task.pk


def release_lost_aggregations(now: datetime) -> list[str]:
    """Aggregations presumed lost after FEDNESTED_AGGREGATION_TIMEOUT_S, so that one crash cannot hold up every
    window (only one aggregates at a time): a task still running that long (its worker died after claiming the
    window) is failed and its window reopened; a task never started that long (its message was lost) is failed; a
    window left aggregating with no live task is reopened. A released task that turns out to be alive cannot
    register its result (workers.aggregation checks that it still holds the window). Returns the windows reopened.
    """
    timeout = settings.FEDNESTED_AGGREGATION_TIMEOUT_S
    cutoff = now - timedelta(seconds=timeout)
    reopened = []
    aggregations = TrainingTask.objects.filter(kind=TaskKind.EXPERT_AGGREGATION, round__isnull=False)
    for task in aggregations.filter(status=TaskStatus.RUNNING, started_at__lt=cutoff).select_related("round"):
        error = f"presumed lost: still running {timeout} s after it started at {task.started_at:%Y-%m-%d %H:%M:%S} UTC"
        with transaction.atomic():
            if not fail_training_task(task.pk, error=error, actor_label="system"):
                continue
            assert task.round is not None
            if reopen_round_after_failure(
                task.round, reason=f"task {task.pk}: {error}", actor_label="system", task_pk=task.pk
            ):
                reopened.append(task.round.round_id)
        logger.warning("aggregation task %s %s", task.pk, error)
    for task in aggregations.filter(status=TaskStatus.PENDING, created_at__lt=cutoff):
        error = f"presumed lost: not started {timeout} s after it was created (its message never reached a worker)"
        if fail_training_task(task.pk, error=error, actor_label="system"):
            logger.warning("aggregation task %s %s", task.pk, error)
    live = aggregations.filter(status__in=[TaskStatus.PENDING, TaskStatus.RUNNING]).values("round")
    for orphan in Round.objects.filter(status=RoundStatus.AGGREGATING).exclude(pk__in=live):
        with transaction.atomic():
            if reopen_round_after_failure(orphan, reason="no aggregation task holds it any more", actor_label="system"):
                reopened.append(orphan.round_id)
    return reopened


def _note_waiting(round_: Round, waiting: str | None) -> None:
    if waiting != round_.record.get("waiting"):
        round_.record = round_.record | {"waiting": waiting}
        Round.objects.filter(pk=round_.pk).update(record=round_.record)


def enqueue_due_windows(now: datetime) -> list[int]:
    """Aggregation tasks for open windows that became ready without an arrival to trigger the check: a deadline
    passed, or the candidate they waited on was decided."""
    created = []
    release_lost_aggregations(now)
    # Updates that waited without a window (none was open when they came, or one opened while they were being
    # recorded) join the oldest open asynchronous window.
    with transaction.atomic():
        oldest = _open_async(Round.objects.select_for_update()).order_by("opened_at", "id").first()
        if oldest is not None:
            adopt_waiting_updates(oldest, actor_label="system")
    for round_ in Round.objects.filter(status=RoundStatus.OPEN).order_by("opened_at", "id"):
        try:
            with transaction.atomic():
                task_pk = enqueue_if_ready(round_, now)
        except RoundSettingsError as error:
            logger.error("window %s: %s", round_.round_id, error)
            continue
        if task_pk is not None:
            created.append(task_pk)
    return created
