"""Federation services: enrollment, devices (revocation, heartbeats), rounds, training tasks, update payloads and
edge updates — each audited.

Claims (an enrollment token used once, a round aggregated once, an update moved along once, an update id's payload
owned by one device) are conditional updates or unique rows whose outcome is checked, so concurrent callers cannot
both win.
"""

import hashlib
import json
import logging
import os
import re
import tempfile
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from apps.accounts.choices import Role
from apps.accounts.models import ApiToken, User
from apps.accounts.services import deactivate_user, issue_api_token, revoke_api_token
from apps.accounts.tokens import new_secret, secret_sha256
from apps.federation.choices import DeviceStatus, RoundMode, RoundStatus, TaskStatus, UpdateStatus
from apps.federation.events import publish_round_start_on_commit
from apps.federation.identity import CheckedRequest, check_csr, register_device_key, revoke_device_keys
from apps.federation.jobs import checked_params, send_training_task_on_commit
from apps.federation.models import DeviceKey, EdgeDevice, EnrollmentToken, Round, StagedPayload, TrainingTask, Update
from apps.federation.privacy import check_round_budget
from apps.federation.safeguards import check_round_safeguards
from apps.federation.windows import champion_version, round_settings, staleness_of
from apps.governance.actors import Actor, ActorLike, as_actor
from apps.governance.audit import record_audit_event, redact_for_storage
from apps.governance.models import AuditEvent
from apps.registry.choices import VersionStatus
from apps.registry.models import ModelVersion
from apps.registry.services import SHA256_PATTERN
from apps.registry.storage import artifact_uri
from fednested.aggregation import RejectionCode
from fednested.aggregation.settings import ROUND_SETTING_KEYS, RoundAggregationSettings, RoundSettingsError
from fednested.messaging import SchemaError, UpdateEnvelope, decode
from fednested.messaging.schemas import CLIENT_ID_REGEX
from fednested.observability.tracing import current_traceparent

logger = logging.getLogger(__name__)

ENROLLMENT_TOKEN_PREFIX = "fne"
# The wire schemas' ClientId alphabet: a client id is also a certificate CN and a Kafka principal.
CLIENT_ID_PATTERN = re.compile(CLIENT_ID_REGEX)
ROUND_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
REJECTION_CODE_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
MAX_ENROLLMENT_TOKEN_TTL = timedelta(days=30)
MAX_ROUND_DURATION = timedelta(days=30)
MAX_BUFFER_SIZE_K = 10_000
PAYLOAD_CHUNK_BYTES = 1 << 20


_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def printable(text: str, limit: int) -> str:
    """`text` with control characters (NUL above all) shown as '?' and cut to `limit` characters."""
    cleaned = _UNPRINTABLE.sub("?", text)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


def device_username(client_id: str) -> str:
    """The device's account name; ':' (allowed in client ids, not in usernames) becomes '+', which client ids lack."""
    return "device-" + client_id.replace(":", "+")


# --- enrollment ----------------------------------------------------------------------------------------------------


@transaction.atomic
def issue_enrollment_token(
    *, actor: ActorLike, note: str = "", domain: str = "", ttl: timedelta | None = None
) -> tuple[EnrollmentToken, str]:
    """A one-time enrollment token: the row, and the plaintext (shown once, never stored)."""
    ttl = ttl if ttl is not None else timedelta(seconds=settings.FEDNESTED_ENROLLMENT_TOKEN_TTL_S)
    if ttl <= timedelta(0) or ttl > MAX_ENROLLMENT_TOKEN_TTL:
        raise ValidationError({"ttl": f"token lifetime must be between 1 s and {MAX_ENROLLMENT_TOKEN_TTL.days} days"})
    plaintext = new_secret(ENROLLMENT_TOKEN_PREFIX)
    token = EnrollmentToken.objects.create(
        token_sha256=secret_sha256(plaintext),
        token_prefix=plaintext[:12],
        note=note[:200],
        domain=domain[:100],
        expires_at=timezone.now() + ttl,
        created_by=as_actor(actor).user,
    )
    record_audit_event(
        actor=actor,
        verb="federation.enrollment_token.issued",
        target=token,
        data={"token_prefix": token.token_prefix, "expires_at": token.expires_at.isoformat(), "domain": domain},
    )
    return token, plaintext


@dataclass(frozen=True)
class Enrollment:
    """What enrolling returns: the device, its API token's plaintext (shown once) and its registered key (with the
    certificate when the control plane has a CA). `repeated` is true for a retried enrollment that got the same
    identity back."""

    device: EdgeDevice
    api_token: str
    key: DeviceKey
    repeated: bool = False


def _check_labels(labels: Iterable[Any]) -> list[str]:
    checked = list(labels)
    for position, label in enumerate(checked):
        if not isinstance(label, str) or not label.strip() or len(label) > 100:
            raise ValidationError(
                {"labels": f"labels[{position}] must be a non-empty string of at most 100 characters"}
            )
    return checked


def _token_used(row: EnrollmentToken) -> ValidationError:
    when = f" at {row.used_at:%Y-%m-%d %H:%M:%S} UTC" if row.used_at is not None else ""
    return ValidationError(
        {"token": ValidationError(f"enrollment token {row.token_prefix}… was already used{when}", code="token_used")}
    )


def _repeated_enrollment(
    row: EnrollmentToken, client_id: str, request: CheckedRequest, now: datetime
) -> Enrollment | None:
    """The identity a lost enrollment answer held, when this is the same device retrying: same token, same client
    id, the same key (the CSR proves possession), within FEDNESTED_ENROLLMENT_RETRY_S of the first attempt.

    The first answer's API token cannot be shown again (only its hash is kept): it is revoked and a new one issued,
    so the device ends with exactly one live token whichever answer it kept.
    """
    if row.used_at is None or now - row.used_at > timedelta(seconds=settings.FEDNESTED_ENROLLMENT_RETRY_S):
        return None
    device = (
        EdgeDevice.objects.select_for_update()
        .filter(enrollment_token=row, client_id=client_id, status=DeviceStatus.ACTIVE)
        .select_related("user")
        .first()
    )
    if device is None:
        return None
    key = DeviceKey.objects.filter(device=device, fingerprint=request.fingerprint, revoked_at__isnull=True).first()
    if key is None:
        return None
    party = Actor.device(client_id)
    for earlier in ApiToken.objects.filter(user=device.user, name="enrollment", revoked_at__isnull=True):
        revoke_api_token(earlier, actor=party)
    _, api_token = issue_api_token(device.user, actor=party, name="enrollment")
    record_audit_event(
        actor=party,
        verb="federation.device.enrollment_repeated",
        target=device,
        data={"client_id": client_id, "token_prefix": row.token_prefix, "fingerprint": key.fingerprint},
    )
    return Enrollment(device=device, api_token=api_token, key=key, repeated=True)


@transaction.atomic
def enroll_device(
    *, token: str, client_id: str, csr: str, display_name: str = "", domain: str = "", labels: Sequence[str] = ()
) -> Enrollment:
    """Enroll `client_id` with a one-time token and the device's CSR: creates its account, device record, API token
    and key (with a certificate from the federation's CA when one is configured).

    The token is claimed with a conditional update, so of two enrollments racing for one token exactly one wins;
    unknown, expired and used tokens are refused with a message saying which — except the same device repeating
    its enrollment (same token, client id and key, shortly after), which gets the same identity back.
    """
    if not CLIENT_ID_PATTERN.match(client_id):
        raise ValidationError(
            {"client_id": f"{client_id!r} must start with a letter or digit and use only A-Z a-z 0-9 . _ : - (≤128)"}
        )
    checked_labels = _check_labels(labels)
    row = EnrollmentToken.objects.filter(token_sha256=secret_sha256(token)).first()
    if row is None:
        raise ValidationError(
            {"token": ValidationError("unknown enrollment token; ask an engineer for a new one", code="token_invalid")}
        )
    request = check_csr(csr, client_id=client_id)
    now = timezone.now()
    if row.used_at is not None:
        repeated = _repeated_enrollment(row, client_id, request, now)
        if repeated is not None:
            return repeated
        raise _token_used(row)
    if row.expires_at <= now:
        expired = f"enrollment token {row.token_prefix}… expired at {row.expires_at:%Y-%m-%d %H:%M:%S} UTC"
        raise ValidationError({"token": ValidationError(expired, code="token_expired")})
    conflict: ValidationError | None = None
    if EdgeDevice.objects.filter(client_id=client_id).exists():
        conflict = ValidationError({"client_id": f"client id {client_id!r} is already enrolled"})
    elif DeviceKey.objects.filter(fingerprint=request.fingerprint).exists():
        conflict = ValidationError({"csr": ValidationError("this key belongs to another device", code="key_in_use")})
    if conflict is not None:
        # The device and key may be this very enrollment's, made by its first attempt after we read the token
        # (a retry racing it): that retry gets the first attempt's identity, anyone else the conflict.
        row.refresh_from_db()
        repeated = _repeated_enrollment(row, client_id, request, now)
        if repeated is not None:
            return repeated
        raise conflict
    claimed = EnrollmentToken.objects.filter(pk=row.pk, used_at__isnull=True, expires_at__gt=now).update(
        used_at=now, used_by_client_id=client_id
    )
    if claimed != 1:
        # Another enrollment claimed it between our read and our update: the same device's retry racing its first
        # attempt gets that attempt's identity (the claim waited for it to commit), anyone else "token used".
        row.refresh_from_db()
        repeated = _repeated_enrollment(row, client_id, request, now)
        if repeated is not None:
            return repeated
        raise _token_used(row)
    party = Actor.device(client_id)
    try:
        with transaction.atomic():
            user = User(username=device_username(client_id), role=Role.DEVICE)
            user.set_unusable_password()
            user.save()
            device = EdgeDevice.objects.create(
                client_id=client_id,
                user=user,
                display_name=display_name[:200],
                domain=(row.domain or domain)[:100],
                labels=checked_labels,
                enrollment_token=row,
                last_seen=now,
            )
    except IntegrityError as exc:
        raise ValidationError({"client_id": f"client id {client_id!r} is already enrolled"}) from exc
    key = register_device_key(device, request, now=now)
    _, api_token = issue_api_token(user, actor=party, name="enrollment")
    record_audit_event(
        actor=party,
        verb="federation.device.enrolled",
        target=device,
        data={
            "client_id": client_id,
            "domain": device.domain,
            "token_prefix": row.token_prefix,
            "fingerprint": key.fingerprint,
            "serial": key.serial,
        },
    )
    return Enrollment(device=device, api_token=api_token, key=key)


@transaction.atomic
def revoke_device(device: EdgeDevice, *, actor: ActorLike, reason: str) -> EdgeDevice:
    """Revoke a device: it can no longer authenticate or submit updates. Revoking twice is an error."""
    if not reason.strip():
        raise ValidationError({"reason": "say why the device is revoked"})
    now = timezone.now()
    revoked = EdgeDevice.objects.filter(pk=device.pk, status=DeviceStatus.ACTIVE).update(
        status=DeviceStatus.REVOKED, revoked_at=now
    )
    if revoked != 1:
        raise ValidationError({"status": f"device {device.client_id!r} is already revoked"})
    device.refresh_from_db()
    deactivate_user(device.user, actor=actor, reason=f"device revoked: {reason}")
    keys = revoke_device_keys(device, at=now)
    # Updates it sent before it was revoked are not trusted either: none of them may reach an aggregate.
    pending = list(Update.objects.filter(device=device, status=UpdateStatus.BUFFERED))
    for update in pending:
        reject_update(
            update,
            RejectionCode.REVOKED_CLIENT,
            f"device {device.client_id!r} was revoked before this update was aggregated: {printable(reason, 200)}",
            actor=as_actor(actor),
        )
    record_audit_event(
        actor=actor,
        verb="federation.device.revoked",
        target=device,
        data={
            "client_id": device.client_id,
            "reason": reason,
            "keys_revoked": keys,
            "updates_rejected": [update.update_id for update in pending],
        },
    )
    return device


def record_device_heartbeat(device: EdgeDevice, *, current_version: str) -> EdgeDevice:
    """A device reports the version it runs: sets current_version and last_seen.

    A change of version is audited; a repeated report of the same version only refreshes last_seen (bookkeeping),
    at most once per FEDNESTED_LAST_SEEN_RESOLUTION_S, with one conditional UPDATE and no lock: `device` as the
    request loaded it (with its current_version) says whether anything is to be done.
    """
    now = timezone.now()
    recorded = device.current_version if device.current_version_id is not None else None
    if device.status == DeviceStatus.ACTIVE and recorded is not None and recorded.version_id == current_version:
        fresh_after = now - timedelta(seconds=settings.FEDNESTED_LAST_SEEN_RESOLUTION_S)
        if device.last_seen is not None and device.last_seen > fresh_after:
            return device
        refreshed = EdgeDevice.objects.filter(
            pk=device.pk, status=DeviceStatus.ACTIVE, current_version_id=recorded.pk
        ).update(last_seen=now)
        if refreshed:
            device.last_seen = now
            return device
        # Revoked or moved to another version since the request loaded it: the locked path decides.
    return _record_reported_version(device, current_version=current_version, now=now)


@transaction.atomic
def _record_reported_version(device: EdgeDevice, *, current_version: str, now: datetime) -> EdgeDevice:
    """The heartbeat under the device's row lock: checks the device and the version, records both, audits a change."""
    device = (
        EdgeDevice.objects.select_for_update(of=("self",)).select_related("current_version", "user").get(pk=device.pk)
    )
    if device.status != DeviceStatus.ACTIVE:
        raise PermissionDenied(f"device {device.client_id!r} is {device.status} and may not report")
    version = ModelVersion.objects.filter(version_id=current_version).first()
    if version is None:
        raise ValidationError(
            {"current_version": f"unknown version {current_version!r}: the registry holds no version with that id"}
        )
    previous = device.current_version
    EdgeDevice.objects.filter(pk=device.pk).update(current_version=version, last_seen=now)
    device.current_version, device.last_seen = version, now
    if previous is None or previous.pk != version.pk:
        record_audit_event(
            actor=Actor.device(device.client_id, device.user),
            verb="federation.device.version_reported",
            target=device,
            data={
                "client_id": device.client_id,
                "from": previous.version_id if previous is not None else None,
                "to": version.version_id,
            },
        )
    return device


# --- rounds --------------------------------------------------------------------------------------------------------


def check_round_config(config: Mapping[str, Any]) -> RoundAggregationSettings:
    """The round's aggregation settings; a value the aggregation cannot use is a ValidationError naming its key.

    Keys the aggregation does not know pass: they are settings for the devices, broadcast in RoundStart.
    """
    try:
        return RoundAggregationSettings.from_mapping(config, where="config")
    except RoundSettingsError as error:
        message = str(error)
        culprit = next((key for key in ROUND_SETTING_KEYS if key in config and not _usable_alone(key, config)), None)
        if culprit is not None and repr(culprit) not in message:
            # Some checks (e.g. of the aggregation method) word their message without the key; say which it was.
            message = f"config key {culprit!r}: {message}"
        raise ValidationError({"config": message}) from error


def _usable_alone(key: str, config: Mapping[str, Any]) -> bool:
    try:
        RoundAggregationSettings.from_mapping({key: config[key]})
    except RoundSettingsError:
        return False
    return True


@transaction.atomic
def open_round(
    *,
    base_version: ModelVersion,
    buffer_size_k: int,
    deadline_at: datetime,
    actor: ActorLike,
    config: dict[str, Any] | None = None,
    round_id: str | None = None,
    mode: str = RoundMode.ASYNC,
    cohort: Sequence[EdgeDevice] = (),
) -> Round:
    """Open an aggregation window and announce it (RoundStart) once committed.

    Asynchronous (default): devices train the champion (`base_version` is the champion they start from); updates on
    any ancestor of the champion within `max_staleness` are taken, and the window starts a series that continues
    after each aggregation. Synchronous: `cohort` trains `base_version`; aggregation waits for all of them or the
    deadline with `min_cohort_fraction`. Updates that were waiting without a window and fit this one join it.
    """
    round_id = round_id or f"round-{uuid.uuid4().hex[:12]}"
    if not ROUND_ID_PATTERN.match(round_id):
        raise ValidationError({"round_id": f"{round_id!r} must use only A-Z a-z 0-9 . _ - (≤64)"})
    if mode not in RoundMode.values:
        raise ValidationError({"mode": f"mode must be one of {', '.join(RoundMode.values)}, got {mode!r}"})
    if buffer_size_k < 1 or buffer_size_k > MAX_BUFFER_SIZE_K:
        raise ValidationError({"buffer_size_k": f"K must lie in [1, {MAX_BUFFER_SIZE_K}], got {buffer_size_k}"})
    now = timezone.now()
    if deadline_at <= now:
        raise ValidationError({"deadline_at": f"deadline {deadline_at.isoformat()} is not in the future"})
    if deadline_at - now > MAX_ROUND_DURATION:
        raise ValidationError({"deadline_at": f"a window lasts at most {MAX_ROUND_DURATION.days} days"})
    if base_version.status in (VersionStatus.REJECTED, VersionStatus.ARCHIVED):
        raise ValidationError(
            {"base_version": f"version {base_version.version_id!r} is {base_version.status}; rounds need a live one"}
        )
    if config is not None and not isinstance(config, dict):
        raise ValidationError({"config": "config must be a JSON object"})
    settings_ = check_round_config(config or {})
    # What the devices will apply: refused now if a value is bad or base_version lacks the file it needs.
    check_round_safeguards(config or {}, base_version)
    if settings_.privacy is not None:
        # A round that would take the federation past its ε budget refuses to start, saying by how much.
        check_round_budget(settings_.privacy, planned=settings_.privacy.planned_aggregations)
    members = list(dict.fromkeys(cohort))
    if mode == RoundMode.SYNC:
        if not members:
            raise ValidationError({"cohort": "a synchronous round needs a cohort of at least one device"})
        champion = champion_version()
        if staleness_of(base_version, champion) is None:
            raise ValidationError(
                {
                    "base_version": f"version {base_version.version_id!r} is not the champion "
                    f"({champion.version_id if champion else 'none'}) or one of its ancestors: updates on it "
                    "could not be applied to the line of champions"
                }
            )
        inactive = [device.client_id for device in members if device.status != DeviceStatus.ACTIVE]
        if inactive:
            raise ValidationError({"cohort": f"devices {', '.join(inactive)} are revoked"})
    elif members:
        raise ValidationError({"cohort": "only synchronous rounds have a cohort; asynchronous windows take any device"})
    if Round.objects.filter(round_id=round_id).exists():
        raise ValidationError({"round_id": f"round {round_id!r} already exists"})
    round_ = _create_window(
        round_id=round_id,
        mode=mode,
        base_version=base_version,
        buffer_size_k=buffer_size_k,
        deadline_at=deadline_at,
        config=config or {},
        series=round_id,
        sequence=1,
        opened_by=as_actor(actor).user,
        cohort=members,
    )
    adopted = _adopt_waiting_updates(round_)
    record_audit_event(
        actor=actor,
        verb="federation.round.opened",
        target=round_,
        data={
            "round_id": round_id,
            "mode": mode,
            "base_version": base_version.version_id,
            "k": buffer_size_k,
            "cohort": [device.client_id for device in members],
            "adopted": adopted,
        },
    )
    return round_


def _create_window(*, cohort: Sequence[EdgeDevice] = (), **fields: Any) -> Round:
    round_ = Round.objects.create(**fields)
    if cohort:
        round_.cohort.set(cohort)
    publish_round_start_on_commit(
        round_id=round_.round_id,
        base_version=round_.base_version.version_id,
        deadline=round_.deadline_at,
        config=round_.config,
        started_at=round_.opened_at,
    )
    return round_


def _adopt_waiting_updates(round_: Round) -> list[str]:
    """Buffered updates without a window (they arrived while none fitted) that this window takes: all of them for
    an asynchronous window (staleness is counted at aggregation), those of its cohort on its base for a sync one."""
    waiting = Update.objects.filter(round__isnull=True, status=UpdateStatus.BUFFERED)
    if round_.mode == RoundMode.SYNC:
        waiting = waiting.filter(base_version=round_.base_version, device__in=round_.cohort.all())
    adopted = list(waiting.order_by("received_at", "id").values_list("update_id", flat=True))
    if adopted:
        Update.objects.filter(update_id__in=adopted).update(round=round_)
    return adopted


@transaction.atomic
def adopt_waiting_updates(round_: Round, *, actor: Actor) -> list[str]:
    """Move the buffered updates that wait without a window into `round_` (as open_round does), audited."""
    adopted = _adopt_waiting_updates(round_)
    if adopted:
        record_audit_event(
            actor=actor,
            verb="federation.round.adopted",
            target=round_,
            data={"round_id": round_.round_id, "adopted": adopted},
        )
    return adopted


def continue_series(round_: Round, *, base_version: ModelVersion, actor: Actor) -> Round | None:
    """Open the next window of an asynchronous series (same K, config and window length) once `round_` has been
    aggregated or cancelled by aggregation, so updates keep arriving; None for a synchronous round. Call it in the
    transaction that closes `round_`."""
    if round_.mode != RoundMode.ASYNC:
        return None
    if Round.objects.filter(series=round_.series, sequence__gt=round_.sequence).exists():
        # The series already went on (e.g. past a window whose aggregation kept failing): never fork it.
        return None
    settings_ = round_settings(round_)
    if settings_.privacy is not None:
        try:
            check_round_budget(settings_.privacy, planned=1)
        except ValidationError as error:
            # One more noised window would exceed the budget: the series stops, said in the audit trail and on
            # the window, rather than open a window whose aggregation must be refused.
            reason = "; ".join(error.messages)
            current = Round.objects.values_list("record", flat=True).get(pk=round_.pk)
            Round.objects.filter(pk=round_.pk).update(
                record=(current if isinstance(current, dict) else {}) | {"series_stopped": reason}
            )
            record_audit_event(
                actor=actor,
                verb="federation.series.stopped",
                target=round_,
                data={"round_id": round_.round_id, "series": round_.series, "reason": reason},
            )
            return None
    sequence = round_.sequence + 1
    round_id = f"{round_.series[:52]}.{sequence}"
    if Round.objects.filter(round_id=round_id).exists():
        round_id = f"{round_.series[:40]}.{sequence}-{uuid.uuid4().hex[:8]}"
    length = max(round_.deadline_at - round_.opened_at, timedelta(seconds=1))
    successor = _create_window(
        round_id=round_id,
        mode=round_.mode,
        base_version=base_version,
        buffer_size_k=round_.buffer_size_k,
        deadline_at=timezone.now() + length,
        config=round_.config,
        series=round_.series,
        sequence=sequence,
        opened_by=round_.opened_by,
    )
    adopted = _adopt_waiting_updates(successor)
    record_audit_event(
        actor=actor,
        verb="federation.round.opened",
        target=successor,
        data={
            "round_id": round_id,
            "mode": round_.mode,
            "continues": round_.round_id,
            "base_version": base_version.version_id,
            "k": round_.buffer_size_k,
            "adopted": adopted,
        },
    )
    return successor


@transaction.atomic
def claim_round_for_aggregation(round_: Round, *, actor: Actor, task_pk: int | None = None) -> bool:
    """open → aggregating, once: True for the one caller that claimed it, False for everyone else. The claiming
    task is recorded, so only it can close or reopen the window (a task released as lost cannot)."""
    locked = Round.objects.select_for_update().get(pk=round_.pk)
    claimed = 0
    if locked.status == RoundStatus.OPEN:
        claimed = Round.objects.filter(pk=round_.pk, status=RoundStatus.OPEN).update(
            status=RoundStatus.AGGREGATING, record=locked.record | {"claimed_by_task": task_pk}
        )
    round_.refresh_from_db(fields=["status", "record"])
    if claimed:
        record_audit_event(
            actor=actor,
            verb="federation.round.aggregating",
            target=round_,
            data={"task": task_pk},
        )
    return bool(claimed)


@transaction.atomic
def reopen_round_after_failure(round_: Round, *, reason: str, actor: Actor, task_pk: int | None = None) -> bool:
    """aggregating → open after a failed aggregation, so its buffered updates wait for the next attempt.

    False (and nothing changes) when the round is not aggregating, e.g. the failure came after it was closed, or
    (with `task_pk`) when another task holds it now. Updates that arrived meanwhile are adopted by the periodic
    check, into whichever window takes updates then.
    """
    if not reason.strip():
        raise ValidationError({"reason": "say why the aggregation failed"})
    locked = Round.objects.select_for_update().get(pk=round_.pk)
    reopened = 0
    owner = locked.record.get("claimed_by_task") if isinstance(locked.record, dict) else None
    if locked.status == RoundStatus.AGGREGATING and (task_pk is None or owner in (None, task_pk)):
        reopened = Round.objects.filter(pk=round_.pk, status=RoundStatus.AGGREGATING).update(
            status=RoundStatus.OPEN,
            record={key: value for key, value in locked.record.items() if key != "claimed_by_task"},
        )
    round_.refresh_from_db(fields=["status", "record"])
    if reopened:
        record_audit_event(
            actor=actor,
            verb="federation.round.reopened",
            target=round_,
            data={"round_id": round_.round_id, "reason": reason[:2000]},
        )
    return bool(reopened)


@transaction.atomic
def close_round(round_: Round, *, actor: ActorLike, status: str = RoundStatus.CLOSED, reason: str = "") -> Round:
    """Close (or cancel) an open or aggregating round."""
    if status not in (RoundStatus.CLOSED, RoundStatus.CANCELLED):
        raise ValidationError({"status": f"a round is closed as 'closed' or 'cancelled', not {status!r}"})
    closed = Round.objects.filter(pk=round_.pk, status__in=[RoundStatus.OPEN, RoundStatus.AGGREGATING]).update(
        status=status, closed_at=timezone.now()
    )
    round_.refresh_from_db()
    if closed != 1:
        raise ValidationError({"status": f"round {round_.round_id!r} is already {round_.status}"})
    record_audit_event(
        actor=actor,
        verb=f"federation.round.{status}",
        target=round_,
        data={"round_id": round_.round_id, "reason": reason},
    )
    return round_


# --- training tasks ------------------------------------------------------------------------------------------------


@transaction.atomic
def create_training_task(
    *, kind: str, actor: ActorLike, params: dict[str, Any] | None = None, round_: Round | None = None
) -> TrainingTask:
    """A pending Tier-1 job, handed to its worker once committed. Refused (ValidationError naming 'kind', 'params' or
    'round') unless a worker runs `kind` and its params, round and what they refer to let the job run."""
    params = {} if params is None else params
    checked_params(kind, params, round_)
    task = TrainingTask.objects.create(
        kind=kind,
        params=params,
        round=round_,
        created_by=as_actor(actor).user,
        traceparent=current_traceparent(),
    )
    record_audit_event(
        actor=actor,
        verb="federation.task.created",
        target=task,
        data={"kind": kind, "round": round_.round_id if round_ else None},
    )
    send_training_task_on_commit(task.pk, kind)
    return task


def _move_task(task_pk: int, *, to: str, from_statuses: Sequence[str], actor: Actor, **fields: Any) -> bool:
    error = fields.get("error", "")
    if error:
        # An error may quote a path, a host or a user's address: the task row keeps it redacted of PII; the audit
        # event gets the original, which record_audit_event redacts the same way and records the counts of.
        fields["error"] = redact_for_storage(error, where=f"training task {task_pk} error").text
    moved = TrainingTask.objects.filter(pk=task_pk, status__in=from_statuses).update(status=to, **fields)
    if moved:
        task = TrainingTask.objects.get(pk=task_pk)
        data = {"kind": task.kind, "error": error}
        record_audit_event(actor=actor, verb=f"federation.task.{to}", target=task, data=data)
    return bool(moved)


@transaction.atomic
def start_training_task(task_pk: int, *, actor: Actor) -> bool:
    """pending → running; False when another worker already claimed it (the caller then does nothing)."""
    return _move_task(
        task_pk,
        to=TaskStatus.RUNNING,
        from_statuses=[TaskStatus.PENDING],
        actor=actor,
        started_at=timezone.now(),
    )


@transaction.atomic
def finish_training_task(task_pk: int, *, actor: Actor, error: str = "") -> bool:
    """running → succeeded, or → failed with `error`."""
    return _move_task(
        task_pk,
        to=TaskStatus.FAILED if error else TaskStatus.SUCCEEDED,
        from_statuses=[TaskStatus.RUNNING],
        actor=actor,
        finished_at=timezone.now(),
        error=error,
    )


@transaction.atomic
def fail_training_task(task_pk: int, *, error: str, actor: Actor) -> bool:
    """pending/running → failed with `error` (e.g. the job could not even be started)."""
    if not error.strip():
        raise ValidationError({"error": "a failed task needs an error message"})
    return _move_task(
        task_pk,
        to=TaskStatus.FAILED,
        from_statuses=[TaskStatus.PENDING, TaskStatus.RUNNING],
        actor=actor,
        finished_at=timezone.now(),
        error=error,
    )


# --- edge updates --------------------------------------------------------------------------------------------------


def parse_update_envelope(envelope: Mapping[str, Any]) -> UpdateEnvelope:
    """Validate a JSON-shaped envelope against the UpdateEnvelope wire schema; errors name every bad field."""
    try:
        raw = json.dumps(envelope, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ValidationError({"envelope": f"envelope is not JSON-serialisable: {exc}"}) from exc
    try:
        event = decode(raw)
    except SchemaError as exc:
        raise ValidationError({"envelope": [exc.summary, *exc.problems]}) from exc
    if not isinstance(event, UpdateEnvelope):
        raise ValidationError({"envelope": f"expected an UpdateEnvelope, got a {event.SCHEMA} event"})
    return event


@transaction.atomic
def record_refused_update(
    *,
    code: str,
    message: str,
    where: str,
    actor: Actor,
    key: str | None = None,
    update_id: str | None = None,
    client_id: str | None = None,
) -> AuditEvent:
    """Record an envelope that cannot be tied to an enrolled device's new update (no Update row is made for it).

    `where` says where it came from (topic, partition, offset); the audit event points at the device when the
    envelope names an enrolled one.
    """
    if not REJECTION_CODE_PATTERN.match(code):
        raise ValidationError({"code": f"refusal code {code!r} must be a lowercase identifier like 'bad_signature'"})
    if not message.strip():
        raise ValidationError({"message": "a refusal needs a message saying what was wrong"})
    # What a hostile sender controls (its key, ids, and whatever the error message quotes) is kept printable and
    # bounded: a NUL cannot be stored in PostgreSQL's jsonb, and an audit row is no place for megabytes.
    message, where = printable(message, 2000), printable(where, 200)
    key = printable(key, 200) if key is not None else None
    update_id = printable(update_id, 200) if update_id is not None else None
    client_id = printable(client_id, 200) if client_id is not None else None
    device = EdgeDevice.objects.filter(client_id=client_id).first() if client_id is not None else None
    data: dict[str, Any] = {"code": code, "message": message, "where": where, "key": key}
    if update_id is not None or client_id is not None:
        data |= {"update_id": update_id, "client_id": client_id}
    return record_audit_event(actor=actor, verb="federation.update.refused", target=device, data=data)


def _move_update(
    update: Update, *, to: str, from_statuses: Sequence[str], actor: Actor, data: dict[str, Any], **fields: Any
) -> Update:
    moved = Update.objects.filter(pk=update.pk, status__in=from_statuses).update(
        status=to, status_changed_at=timezone.now(), **fields
    )
    previous = update.status
    update.refresh_from_db()
    if moved != 1:
        raise ValidationError(
            {"status": f"update {update.update_id} is {update.status}; only {'/'.join(from_statuses)} can become {to}"}
        )
    record_audit_event(
        actor=actor,
        verb=f"federation.update.{to}",
        target=update,
        data={"update_id": update.update_id, "from": previous, **data},
    )
    return update


@transaction.atomic
def mark_updates_applied(updates: Sequence[Update], *, version: ModelVersion, actor: Actor) -> None:
    """buffered → applied in `version`, for each of `updates`; all or nothing."""
    for update in updates:
        _move_update(
            update,
            to=UpdateStatus.APPLIED,
            from_statuses=[UpdateStatus.BUFFERED],
            actor=actor,
            data={"applied_in": version.version_id},
            applied_in=version,
        )


@transaction.atomic
def reject_update(update: Update, code: str, message: str, *, actor: Actor) -> Update:
    """Reject a buffered update (e.g. when aggregation re-checks it), with a machine code and a human message."""
    if not REJECTION_CODE_PATTERN.match(code):
        raise ValidationError({"code": f"rejection code {code!r} must be a lowercase identifier like 'stale_base'"})
    if not message.strip():
        raise ValidationError({"message": "a rejection needs a message saying what was wrong"})
    return _move_update(
        update,
        to=UpdateStatus.REJECTED,
        from_statuses=[UpdateStatus.BUFFERED],
        actor=actor,
        data={"code": code, "message": message},
        rejection_code=code,
        # Stored redacted of PII; the audit event's copy is redacted (and counted) by record_audit_event.
        rejection_message=redact_for_storage(message, where=f"update {update.update_id} rejection_message").text,
    )


# --- update payloads (claim checks) ---------------------------------------------------------------------------------


class ReadableBody(Protocol):
    """What an upload is read from: a request's input stream (HttpRequest.read) or a file."""

    def read(self, size: int, /) -> bytes: ...


class PayloadRefused(Exception):
    """An upload the control plane does not store; `code` is the protocol's machine code (device-protocol.md §3)."""

    def __init__(self, code: RejectionCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class PayloadReceipt:
    """Where a payload was stored and what was verified; `created` is False for a retry of stored bytes."""

    update_id: str
    uri: str
    sha256: str
    bytes: int
    created: bool


def payload_relative_path(client_id: str, update_id: str) -> str:
    """Where a device's payload lies in the artifact store; the client id in the path keeps devices apart."""
    return f"updates/{client_id}/{update_id}.safetensors"


def canonical_update_id(raw: str) -> str:
    """The update id as the envelope carries it (a UUID, lowercase and hyphenated); PayloadRefused otherwise."""
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise PayloadRefused(RejectionCode.INVALID_UPDATE_ID, f"update id {raw[:80]!r} is not a UUID") from None


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _receive_body(body: ReadableBody, directory: Path, update_id: str, *, max_bytes: int) -> tuple[Path, str, int]:
    """Stream the body into a temporary file beside its final place: (path, sha256, bytes); fsynced."""
    directory.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=directory, prefix=f".{update_id}.", suffix=".part")
    path = Path(name)
    digest, size = hashlib.sha256(), 0
    try:
        with os.fdopen(descriptor, "wb") as handle:
            while chunk := body.read(PAYLOAD_CHUNK_BYTES):
                size += len(chunk)
                if size > max_bytes:
                    raise PayloadRefused(
                        RejectionCode.OVERSIZED, f"payload is over the server's limit of {max_bytes} bytes"
                    )
                digest.update(chunk)
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path, digest.hexdigest(), size


def store_update_payload(
    device: EdgeDevice,
    update_id: str,
    body: ReadableBody,
    *,
    declared_sha256: str,
    content_length: int | None,
    max_bytes: int,
    root: Path,
) -> PayloadReceipt:
    """Store a device's update payload at `updates/<client id>/<update id>.safetensors` in the artifact store.

    The bytes are streamed to a temporary file, checked (size limit, `declared_sha256`), and renamed into place only
    when the update id is claimed for this device: a retry of the same bytes returns the stored receipt
    (created=False), other bytes under a claimed id are a `conflict`, another device's id is `not_owner`.
    """
    update_id = canonical_update_id(update_id)
    device.refresh_from_db(fields=["status"])
    if device.status != DeviceStatus.ACTIVE:
        raise PayloadRefused(RejectionCode.REVOKED_CLIENT, f"device {device.client_id!r} is {device.status}")
    declared = declared_sha256.strip().lower()
    if not SHA256_PATTERN.match(declared):
        raise PayloadRefused(
            RejectionCode.SHA256_MISSING, "X-Content-SHA256 must be the body's sha256 as 64 hex digits"
        )
    owner = StagedPayload.objects.filter(update_id=update_id).select_related("device").first()
    if owner is not None and owner.device_id != device.pk:
        # Refused before reading a byte: the id is taken, whatever the body holds.
        raise PayloadRefused(
            RejectionCode.NOT_OWNER, f"update id {update_id} belongs to another device; mint a new one"
        )
    if content_length is not None and content_length > max_bytes:
        raise PayloadRefused(
            RejectionCode.OVERSIZED, f"payload is {content_length} bytes, the server's limit is {max_bytes}"
        )
    relative = payload_relative_path(device.client_id, update_id)
    final = root / relative
    temporary, sha256, size = _receive_body(body, final.parent, update_id, max_bytes=max_bytes)
    try:
        if content_length is not None and size != content_length:
            raise PayloadRefused(RejectionCode.INCOMPLETE_BODY, f"body ended after {size} of {content_length} bytes")
        if sha256 != declared:
            raise PayloadRefused(
                RejectionCode.SHA256_MISMATCH, f"body hashes to {sha256}, X-Content-SHA256 says {declared}"
            )
        return _claim_payload(device, update_id, relative, final, temporary, sha256, size)
    finally:
        temporary.unlink(missing_ok=True)


def _claim_payload(
    device: EdgeDevice, update_id: str, relative: str, final: Path, temporary: Path, sha256: str, size: int
) -> PayloadReceipt:
    uri = artifact_uri(relative)
    for _ in range(2):
        try:
            with transaction.atomic():
                existing = StagedPayload.objects.select_for_update().filter(update_id=update_id).first()
                if existing is not None:
                    if existing.device_id != device.pk:
                        raise PayloadRefused(
                            RejectionCode.NOT_OWNER, f"update id {update_id} belongs to another device"
                        )
                    if existing.sha256 != sha256:
                        raise PayloadRefused(
                            RejectionCode.CONFLICT,
                            f"update id {update_id} already holds a payload with sha256 {existing.sha256}; "
                            "an update id names one payload",
                        )
                    if not final.is_file() or final.stat().st_size != existing.size_bytes:
                        # The stored copy went missing (a restore, a crash before the rename was durable): put back
                        # the identical bytes just received.
                        os.replace(temporary, final)
                        _fsync_directory(final.parent)
                        logger.warning("payload of update %s was missing from the store; restored", update_id)
                    return PayloadReceipt(update_id, existing.uri, existing.sha256, existing.size_bytes, created=False)
                StagedPayload.objects.create(
                    update_id=update_id, device=device, uri=uri, sha256=sha256, size_bytes=size
                )
                # In place before the claim commits: a committed claim always has its file.
                os.replace(temporary, final)
                _fsync_directory(final.parent)
                record_audit_event(
                    actor=Actor.device(device.client_id, device.user),
                    verb="federation.update.payload_stored",
                    target=device,
                    data={"update_id": update_id, "uri": uri, "sha256": sha256, "bytes": size},
                )
                return PayloadReceipt(update_id, uri, sha256, size, created=True)
        except IntegrityError:
            # Another upload of this id committed its claim first; the next pass answers as for a retry.
            continue
    raise PayloadRefused(RejectionCode.CONFLICT, f"update id {update_id} is being uploaded concurrently; retry")
