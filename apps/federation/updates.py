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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric import ec
from django.conf import settings
from django.db import DatabaseError, IntegrityError, InterfaceError, OperationalError, transaction
from django.db.models import Count, Q, QuerySet
from django.utils import timezone

from apps.federation.choices import DeviceStatus, RoundMode, RoundStatus, TaskKind, TaskStatus, UpdateStatus
from apps.federation.models import DeviceKey, EdgeDevice, Round, StagedPayload, TrainingTask, Update
from apps.federation.payloads import adapter_config_of, decode_adapters, fetch_payload
from apps.federation.services import (
    adopt_waiting_updates,
    continue_series,
    create_training_task,
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
from apps.governance.actors import Actor
from apps.governance.audit import record_audit_event, redact_for_storage
from apps.governance.chain import schedule_seal
from apps.governance.models import AuditEvent
from apps.registry.choices import CHAMPION_ALIAS
from apps.registry.models import Alias, ModelVersion
from fednested.adapters.lora import layer_index
from fednested.aggregation import RejectionCode, UpdateRejected, expert_key, validate_update
from fednested.aggregation.settings import RoundAggregationSettings, RoundSettingsError
from fednested.checkpoints import CheckpointError, Manifest
from fednested.governance.pii import REDACTED_KEY, Redacted
from fednested.identity.keys import load_public_key
from fednested.messaging import UpdateEnvelope
from fednested.observability.tracing import current_traceparent

logger = logging.getLogger(__name__)

OutcomeStatus = Literal["buffered", "rejected", "refused", "duplicate"]
# A window whose aggregation failed this often (it was reopened each time) gets no further automatic attempt.
MAX_AUTOMATIC_AGGREGATION_ATTEMPTS = 3
# Errors that mean the control plane cannot go on (database unreachable, artifact store unreadable): never recorded
# as an envelope's fault; the caller leaves the messages to be handled again.
INFRASTRUCTURE_ERRORS = (OperationalError, InterfaceError, OSError)


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
class Arrival:
    """One message for `submit_updates`: the envelope the bus decoded, or (no envelope) what was wrong with it."""

    where: str
    key: str | None = None
    envelope: UpdateEnvelope | None = None
    problem: str = ""
    # W3C trace context of the message's ingestion (fednested.observability.tracing), kept on its Update row.
    traceparent: str = ""


@dataclass
class _Checked:
    """An envelope that passed identity and references: who sent it, on which base, for which window, how stale it
    is, and the rejection its further checks ended in (None: it is to be buffered)."""

    arrival: Arrival
    envelope: UpdateEnvelope
    device: EdgeDevice
    base: ModelVersion
    window: Round | None = None
    staleness: int | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    rejection: UpdateRejected | None = None
    # The rejection message redacted of PII, made once for both the update row and its audit row.
    redacted_message: Redacted | None = None


@dataclass(frozen=True)
class _Refused:
    """An arrival no row can be made for: it is recorded as an audit event only."""

    arrival: Arrival
    code: RejectionCode
    message: str
    update_id: str | None = None
    client_id: str | None = None


@dataclass(frozen=True)
class _Resent:
    """The identical envelope of a recorded update again."""

    arrival: Arrival
    existing: Update


_Step = _Checked | _Refused | _Resent


def submit_update(
    envelope: UpdateEnvelope,
    *,
    where: str,
    actor: Actor,
    sender: EdgeDevice | None = None,
    key: str | None = None,
    now: Callable[[], datetime] = timezone.now,
) -> UpdateOutcome:
    """Check `envelope` once and record what became of it; never raises for anything the envelope or its payload
    holds. `sender` is the device an API request authenticated as (None on the bus, where the signature alone
    identifies it). Raises only when the control plane itself cannot go on (database or artifact store down), or on
    a defect of ours (the API answers 500; the bus entry `submit_updates` records it as a refusal instead)."""
    arrival = Arrival(where=where, key=key, envelope=envelope)
    return _submit([arrival], actor=actor, sender=sender, now=now, contain_errors=False)[0]


def submit_updates(
    arrivals: Sequence[Arrival], *, actor: Actor, now: Callable[[], datetime] = timezone.now
) -> list[UpdateOutcome]:
    """The bus's entry: every arrival of a batch through the same checks as `submit_update`, then one transaction
    for the whole batch; returns one outcome per arrival, in order.

    What a batch shares is read once (devices and their keys, recorded update ids, uploads, base versions and their
    manifests, the champion, the windows; the window rows are locked once), and the rows are written with one
    statement per table. An envelope whose row the database refuses (a value it cannot store, an update id recorded
    meanwhile) costs the batch its fast path, not its other envelopes: the batch is then written envelope by
    envelope, each under its own savepoint. A defect of ours that one arrival triggers is recorded as its refusal.
    Raises only when the database or artifact store is unusable: then nothing of the batch is committed.
    """
    return _submit(arrivals, actor=actor, sender=None, now=now, contain_errors=True)


def _submit(
    arrivals: Sequence[Arrival],
    *,
    actor: Actor,
    sender: EdgeDevice | None,
    now: Callable[[], datetime],
    contain_errors: bool,
) -> list[UpdateOutcome]:
    lookups = _Lookups([arrival.envelope for arrival in arrivals if arrival.envelope is not None])
    steps: list[_Step] = []
    for arrival in arrivals:
        try:
            steps.append(_check(arrival, lookups, sender, now()))
        except INFRASTRUCTURE_ERRORS:
            raise
        except Exception as error:
            if not contain_errors:
                raise
            steps.append(_contained(arrival, error))
    outcomes = _record(steps, actor=actor, now=now, contain_errors=contain_errors)
    for outcome in outcomes:
        if outcome.status in ("refused", "rejected"):
            code = outcome.code.value if outcome.code is not None else "?"
            logger.warning(
                "%s update %s from %s at %s (%s): %s",
                outcome.status,
                outcome.update_id,
                outcome.client_id,
                outcome.where,
                code,
                outcome.message,
            )
    return outcomes


def _contained(arrival: Arrival, error: Exception) -> _Refused:
    """A refusal for an arrival that made our code raise: no message may stop ingestion for every device."""
    envelope = arrival.envelope
    if isinstance(error, DatabaseError):
        # A value the database refuses (it passed every check we know of): the message is bad, not the worker.
        logger.exception("message at %s broke a database constraint", arrival.where)
        message = f"the database refused it: {error}"
    else:
        logger.exception("message at %s: unexpected error", arrival.where)
        message = f"could not be processed ({type(error).__name__}: {str(error)[:300]}); reported to operators"
    return _Refused(
        arrival,
        RejectionCode.MALFORMED,
        message,
        update_id=str(envelope.update_id) if envelope is not None else None,
        client_id=envelope.client_id if envelope is not None else None,
    )


class _Lookups:
    """What a batch reads once rather than once per envelope: devices and their live keys, recorded update ids,
    staged uploads and base versions (one query each, for every envelope of the batch), then lazily the champion,
    each base's manifest and staleness, and the windows. Only for the checks, outside the transaction, which
    re-reads under lock what may move meanwhile (the device's standing, the window)."""

    def __init__(self, envelopes: Sequence[UpdateEnvelope]) -> None:
        client_ids = sorted({envelope.client_id for envelope in envelopes})
        update_ids = sorted({str(envelope.update_id) for envelope in envelopes})
        self.devices = {
            device.client_id: device
            for device in EdgeDevice.objects.filter(client_id__in=client_ids).select_related("user")
        }
        self._keys: dict[int, list[DeviceKey]] = {}
        if self.devices:
            # identity.live_keys' rule (not revoked, certificate valid at the envelope's making), for the whole batch
            # at its earliest moment; each envelope then keeps the keys still valid at its own.
            earliest = min(envelope.created_at for envelope in envelopes)
            for key in DeviceKey.objects.filter(
                Q(not_after__isnull=True) | Q(not_after__gte=earliest),
                device__in=[device.pk for device in self.devices.values()],
                revoked_at__isnull=True,
            ).order_by("pk"):
                self._keys.setdefault(key.device_id, []).append(key)
        self._public_keys: dict[int, ec.EllipticCurvePublicKey] = {}
        self.recorded = {
            update.update_id: update
            for update in Update.objects.filter(update_id__in=update_ids).select_related("device", "round")
        }
        self.staged = {
            staged.update_id: staged
            for staged in StagedPayload.objects.filter(update_id__in=update_ids).select_related("device")
        }
        self.versions = {
            version.version_id: version
            for version in ModelVersion.objects.filter(
                version_id__in=sorted({envelope.base_version for envelope in envelopes})
            )
        }
        self._champion: tuple[ModelVersion | None] | None = None
        self._staleness: dict[int, int | None] = {}
        self._manifests: dict[int, Manifest | UpdateRejected] = {}
        self.windows = _Windows(lock=False)

    def public_keys(self, device: EdgeDevice, at: datetime) -> list[ec.EllipticCurvePublicKey]:
        """The keys an envelope the device made at `at` may be signed with."""
        keys = []
        for key in self._keys.get(device.pk, []):
            if key.not_after is not None and key.not_after < at:
                continue
            if key.pk not in self._public_keys:
                self._public_keys[key.pk] = load_public_key(key.public_key_pem, where=f"key {key.pk}")
            keys.append(self._public_keys[key.pk])
        return keys

    def champion(self) -> ModelVersion | None:
        if self._champion is None:
            self._champion = (champion_version(),)
        return self._champion[0]

    def staleness(self, base: ModelVersion) -> int | None:
        if base.pk not in self._staleness:
            self._staleness[base.pk] = staleness_of(base, self.champion())
        return self._staleness[base.pk]

    def manifest(self, base: ModelVersion) -> Manifest:
        """The base's manifest, parsed once per batch; raises UpdateRejected when it cannot be used for checks."""
        if base.pk not in self._manifests:
            try:
                self._manifests[base.pk] = version_manifest(base)
            except CheckpointError as error:
                self._manifests[base.pk] = UpdateRejected(
                    RejectionCode.UNKNOWN_BASE_VERSION, f"base version cannot be used for checks: {error}"
                )
        manifest = self._manifests[base.pk]
        if isinstance(manifest, UpdateRejected):
            raise manifest
        return manifest


def _check(arrival: Arrival, lookups: _Lookups, sender: EdgeDevice | None, now: datetime) -> _Step:
    """Every check of one arrival, outside any transaction."""
    envelope = arrival.envelope
    if envelope is None:
        return _Refused(arrival, RejectionCode.MALFORMED, arrival.problem or "the message holds no update envelope")
    update_id, client_id = str(envelope.update_id), envelope.client_id
    try:
        device = _identify(envelope, sender, lookups)
        _check_freshness(envelope, now)
        existing = lookups.recorded.get(update_id)
        if existing is not None:
            if existing.device_id == device.pk and _same_content(existing, envelope):
                return _Resent(arrival, existing)
            raise UpdateRejected(
                RejectionCode.REPLAYED,
                f"update {update_id} was already received ({existing.status})"
                + ("" if existing.device_id == device.pk else " from another device")
                + "; this envelope differs from the recorded one",
            )
        _check_staged_payload(envelope, device, lookups.staged.get(update_id))
        base = lookups.versions.get(envelope.base_version)
        if base is None:
            raise UpdateRejected(
                RejectionCode.UNKNOWN_BASE_VERSION, f"model version {envelope.base_version!r} is not registered"
            )
    except UpdateRejected as refusal:
        return _Refused(arrival, refusal.code, refusal.message, update_id=update_id, client_id=client_id)
    checked = _Checked(arrival=arrival, envelope=envelope, device=device, base=base)
    try:
        checked.window = lookups.windows.route(envelope, device, base)
        config = round_settings(checked.window)
        checked.staleness = _check_staleness(base, config, lookups)
        manifest = lookups.manifest(base)
        _check_claims(envelope, manifest)
        checked.notes = _check_payload(envelope, manifest, config)
    except UpdateRejected as error:
        checked.rejection = error
    except RoundSettingsError as error:
        # The window's config was valid when it opened; one that no longer parses is the operators' to fix.
        checked.rejection = UpdateRejected(
            RejectionCode.WINDOW_UNUSABLE, f"the window's settings are unusable: {error}"
        )
    return checked


def _identify(envelope: UpdateEnvelope, sender: EdgeDevice | None, lookups: _Lookups) -> EdgeDevice:
    device = lookups.devices.get(envelope.client_id)
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
    if not any(envelope.verify(key) for key in lookups.public_keys(device, envelope.created_at)):
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


def _check_staged_payload(envelope: UpdateEnvelope, device: EdgeDevice, staged: StagedPayload | None) -> None:
    """The envelope's claim check must be this device's own upload for this update id, exactly as it was stored.

    Without this a device could point its envelope at any file in the artifact store (another device's payload, a
    model version's weights) and have it checked and aggregated as its own.
    """
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


class _Windows:
    """Which window an update joins, remembered for the batch: the rounds a batch names, the open window of each
    series and the oldest open asynchronous window are each read once (and, with `lock`, locked once)."""

    def __init__(self, *, lock: bool) -> None:
        self._lock = lock
        self._named: dict[str, Round | None] = {}
        self._cohorts: dict[int, set[int]] = {}
        self._series: dict[str, Round | None] = {}
        self._oldest: tuple[Round | None] | None = None

    def _rounds(self) -> QuerySet[Round]:
        return Round.objects.select_for_update() if self._lock else Round.objects.all()

    def route(self, envelope: UpdateEnvelope, device: EdgeDevice, base: ModelVersion) -> Round | None:
        """The window the update joins, or None when none fits yet (it then waits for the next one that does).

        A named asynchronous window sends the update to its series' open window: in asynchronous mode a round id is
        a hint, never a reason to refuse (the window may have closed while the device trained). A named synchronous
        round must be open, have the device in its cohort, and train the update's base. With no name: the oldest
        open asynchronous window, else an open synchronous round of the device's cohort on that base.
        """
        if envelope.round_id is not None:
            if envelope.round_id not in self._named:
                self._named[envelope.round_id] = self._rounds().filter(round_id=envelope.round_id).first()
            named = self._named[envelope.round_id]
            if named is None:
                raise UpdateRejected(RejectionCode.UNKNOWN_ROUND, f"round {envelope.round_id!r} does not exist")
            if named.mode == RoundMode.SYNC:
                return self._sync_round(named, device, base)
            if named.series not in self._series:
                self._series[named.series] = (
                    _open_async(self._rounds()).filter(series=named.series).order_by("sequence", "id").first()
                )
            in_series = self._series[named.series]
            if in_series is not None:
                return in_series
        if self._oldest is None:
            self._oldest = (_open_async(self._rounds()).order_by("opened_at", "id").first(),)
        if self._oldest[0] is not None:
            return self._oldest[0]
        return (
            self._rounds()
            .filter(mode=RoundMode.SYNC, status=RoundStatus.OPEN, base_version=base, cohort=device)
            .order_by("opened_at", "id")
            .first()
        )

    def _sync_round(self, named: Round, device: EdgeDevice, base: ModelVersion) -> Round:
        if named.status != RoundStatus.OPEN:
            raise UpdateRejected(
                RejectionCode.ROUND_CLOSED,
                f"synchronous round {named.round_id!r} is {named.status}; train the current champion instead",
            )
        if named.pk not in self._cohorts:
            self._cohorts[named.pk] = set(named.cohort.values_list("pk", flat=True))
        if device.pk not in self._cohorts[named.pk]:
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


def _check_staleness(base: ModelVersion, config: RoundAggregationSettings, lookups: _Lookups) -> int:
    staleness = lookups.staleness(base)
    if staleness is None:
        champion = lookups.champion()
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


def _record(
    steps: Sequence[_Step], *, actor: Actor, now: Callable[[], datetime], contain_errors: bool
) -> list[UpdateOutcome]:
    """The one short transaction of a batch: the Update rows (buffered or rejected) and their audit rows, the audit
    rows of refusals and resent envelopes, and the decision of each window that took updates."""
    outcomes: dict[int, UpdateOutcome] = {}
    with transaction.atomic():
        checked = [(index, step) for index, step in enumerate(steps) if isinstance(step, _Checked)]
        if checked:
            outcomes |= _record_checked(checked, actor=actor, now=now, contain_errors=contain_errors)
        for index, step in enumerate(steps):
            if isinstance(step, _Refused):
                outcomes[index] = _refuse(step, actor=actor)
            elif isinstance(step, _Resent):
                outcomes[index] = _resend(step.existing, where=step.arrival.where, actor=actor)
    return [outcomes[index] for index in range(len(steps))]


def _record_checked(
    checked: list[tuple[int, _Checked]], *, actor: Actor, now: Callable[[], datetime], contain_errors: bool
) -> dict[int, UpdateOutcome]:
    # Locks in one order everywhere (the champion's alias, then the devices, then the window): enqueue_if_ready
    # takes the same.
    Alias.objects.select_for_update().filter(name=CHAMPION_ALIAS).first()
    # Re-read under lock what may have moved since the checks: the devices' standing and the window (a window
    # claimed for aggregation meanwhile takes nothing more; the update then goes to its successor or waits).
    statuses = dict(
        EdgeDevice.objects.select_for_update()
        .filter(pk__in=sorted({item.device.pk for _, item in checked}))
        .order_by("pk")
        .values_list("pk", "status")
    )
    windows = _Windows(lock=True)
    for _, item in checked:
        status = statuses.get(item.device.pk)
        if status != DeviceStatus.ACTIVE:
            item.rejection = UpdateRejected(
                RejectionCode.REVOKED_CLIENT, f"device {item.device.client_id!r} is {status}"
            )
        if item.rejection is None:
            try:
                item.window = windows.route(item.envelope, item.device, item.base)
            except UpdateRejected as error:
                item.rejection = error
    moment = now()
    outcomes: dict[int, UpdateOutcome] = {}
    try:
        # The fast path: every row of the batch in one statement per table, under a savepoint of its own.
        with transaction.atomic():
            updates = Update.objects.bulk_create([_update_row(item, moment) for _, item in checked])
            AuditEvent.objects.bulk_create(
                [_audit_row(item, update) for (_, item), update in zip(checked, updates, strict=True)]
            )
            schedule_seal()
        for (index, item), update in zip(checked, updates, strict=True):
            outcomes[index] = _recorded(item, update)
    except INFRASTRUCTURE_ERRORS:
        raise
    except Exception:
        # Some row was refused (an update id recorded meanwhile, a value the database cannot store): write the
        # batch envelope by envelope, so that one bad envelope costs only itself.
        for index, item in checked:
            outcomes[index] = _record_one(item, moment, actor=actor, contain_errors=contain_errors)
    seen = sorted({item.device.pk for index, item in checked if outcomes[index].status in ("buffered", "rejected")})
    if seen:
        EdgeDevice.objects.filter(pk__in=seen).update(last_seen=moment)
    # Each window that took updates decides its readiness once, with all of them in; the aggregation task (if any)
    # is reported on the batch's last update into that window.
    last_into: dict[int, tuple[int, Round]] = {}
    for index, item in checked:
        if outcomes[index].status == "buffered" and item.window is not None:
            last_into[item.window.pk] = (index, item.window)
    for index, window in last_into.values():
        task_pk = enqueue_if_ready(window, moment)
        if task_pk is not None:
            outcomes[index] = replace(outcomes[index], aggregation_task_pk=task_pk)
    return outcomes


def _update_row(item: _Checked, moment: datetime) -> Update:
    rejection, envelope = item.rejection, item.envelope
    return Update(
        update_id=str(envelope.update_id),
        device=item.device,
        base_version=item.base,
        round=item.window if rejection is None else None,
        status=UpdateStatus.BUFFERED if rejection is None else UpdateStatus.REJECTED,
        rejection_code=rejection.code.value if rejection is not None else "",
        # A rejection may quote what the device sent (a field, an id): stored redacted of PII, like its audit row.
        rejection_message=_redacted_rejection(item).text if rejection is not None else "",
        staleness=item.staleness,
        payload_uri=envelope.payload.uri,
        payload_sha256=envelope.payload.sha256,
        payload_bytes=envelope.payload.size_bytes,
        examples=envelope.examples,
        routed_tokens=dict(envelope.routed_tokens),
        metrics=dict(envelope.metrics),
        envelope=envelope.model_dump(mode="json"),
        status_changed_at=moment,
        # Through the API there is no bus message: the request's own span stands for the ingestion.
        traceparent=item.arrival.traceparent or current_traceparent(),
    )


def _audit_row(item: _Checked, update: Update) -> AuditEvent:
    """The audit row `record_audit_event` writes for a recorded update, built for a bulk insert."""
    rejection = item.rejection
    data: dict[str, Any] = {
        "update_id": update.update_id,
        "where": item.arrival.where,
        "base_version": item.base.version_id,
        "staleness": item.staleness,
        "round": item.window.round_id if item.window is not None and rejection is None else None,
        "payload_sha256": item.envelope.payload.sha256,
        **item.notes,
    }
    if rejection is not None:
        # Only the message is free text: the other fields are ids, digests and numbers the checks validated, so the
        # batch (which holds its locks while these rows are built) pays for redaction only on rejected updates.
        redacted = _redacted_rejection(item)
        data |= {"code": rejection.code.value, "message": redacted.text}
        if redacted.entities:
            data[REDACTED_KEY] = dict(redacted.entities)
    # The row record_audit_event(actor=device.user, target=update, ...) writes, unsaved, so a batch inserts all
    # of them in one statement.
    party = Actor.device(item.device.client_id, item.device.user)
    return AuditEvent(
        actor=party.user,
        actor_label=party.label,
        actor_kind=party.kind,
        verb=f"federation.update.{update.status}",
        object_type=f"{Update._meta.app_label}.{Update._meta.model_name}",
        object_id=str(update.pk),
        data=data,
    )


def _redacted_rejection(item: _Checked) -> Redacted:
    if item.redacted_message is None:
        message = item.rejection.message if item.rejection is not None else ""
        item.redacted_message = redact_for_storage(message, where=f"update {item.envelope.update_id} rejection_message")
    return item.redacted_message


def _recorded(item: _Checked, update: Update) -> UpdateOutcome:
    rejection = item.rejection
    return UpdateOutcome(
        where=item.arrival.where,
        status="buffered" if rejection is None else "rejected",
        update_id=update.update_id,
        client_id=item.device.client_id,
        code=rejection.code if rejection is not None else None,
        message=rejection.message if rejection is not None else "",
        round_id=item.window.round_id if item.window is not None and rejection is None else None,
        staleness=item.staleness,
        update_pk=update.pk,
    )


def _record_one(item: _Checked, moment: datetime, *, actor: Actor, contain_errors: bool) -> UpdateOutcome:
    """One envelope's rows under a savepoint of their own (the batch's slow path)."""
    update_id, device, where = str(item.envelope.update_id), item.device, item.arrival.where
    try:
        with transaction.atomic():
            update = _update_row(item, moment)
            update.save(force_insert=True)
            _audit_row(item, update).save(force_insert=True)
        return _recorded(item, update)
    except IntegrityError:
        # The same update id was recorded by a concurrent submission between our check and this insert, or by an
        # earlier envelope of this batch.
        existing = Update.objects.select_related("device", "round").get(update_id=update_id)
        if existing.device_id == device.pk and _same_content(existing, item.envelope):
            return _resend(existing, where=where, actor=actor)
        refusal = _Refused(
            item.arrival,
            RejectionCode.REPLAYED,
            f"update {update_id} was recorded concurrently with another envelope",
            update_id=update_id,
            client_id=device.client_id,
        )
    except INFRASTRUCTURE_ERRORS:
        raise
    except Exception as error:
        if not contain_errors:
            raise
        refusal = _contained(item.arrival, error)
    return _refuse(refusal, actor=actor)


def _refuse(refusal: _Refused, *, actor: Actor) -> UpdateOutcome:
    record_refused_update(
        code=refusal.code.value,
        message=refusal.message,
        where=refusal.arrival.where,
        key=refusal.arrival.key,
        update_id=refusal.update_id,
        client_id=refusal.client_id,
        actor=actor,
    )
    return UpdateOutcome(
        where=refusal.arrival.where,
        status="refused",
        update_id=refusal.update_id,
        client_id=refusal.client_id,
        code=refusal.code,
        message=refusal.message,
    )


def _resend(existing: Update, *, where: str, actor: Actor) -> UpdateOutcome:
    record_audit_event(
        actor=actor,
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
            continue_series(locked, base_version=champion_version() or locked.base_version, actor=Actor.automation())
        return None
    readiness = window_readiness(locked, round_settings(locked), now)
    _note_waiting(locked, readiness.waiting)
    if not readiness.ready:
        return None
    task = create_training_task(
        kind=TaskKind.EXPERT_AGGREGATION,
        actor=Actor.automation(),
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
            if not fail_training_task(task.pk, error=error, actor=Actor.automation()):
                continue
            assert task.round is not None
            if reopen_round_after_failure(
                task.round, reason=f"task {task.pk}: {error}", actor=Actor.automation(), task_pk=task.pk
            ):
                reopened.append(task.round.round_id)
        logger.warning("aggregation task %s %s", task.pk, error)
    for task in aggregations.filter(status=TaskStatus.PENDING, created_at__lt=cutoff):
        error = f"presumed lost: not started {timeout} s after it was created (its message never reached a worker)"
        if fail_training_task(task.pk, error=error, actor=Actor.automation()):
            logger.warning("aggregation task %s %s", task.pk, error)
    live = aggregations.filter(status__in=[TaskStatus.PENDING, TaskStatus.RUNNING]).values("round")
    for orphan in Round.objects.filter(status=RoundStatus.AGGREGATING).exclude(pk__in=live):
        with transaction.atomic():
            if reopen_round_after_failure(
                orphan, reason="no aggregation task holds it any more", actor=Actor.automation()
            ):
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
            adopt_waiting_updates(oldest, actor=Actor.automation())
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
