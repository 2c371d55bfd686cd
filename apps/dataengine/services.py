"""Every write of the data engine: one telemetry record → its signals → the rules of the touched domains → a trigger
and its TrainingTask event on tasks.training (outbox); one tasks.training record → a TrainingTask row (or the
refusal); rule edits. Each is one transaction, so a consumer commits its offsets only after the write is durable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from apps.dataengine.choices import TriggerStatus
from apps.dataengine.models import DataEngineRule, DataEngineTrigger, DeviceSignal, TelemetryRejection
from apps.dataengine.rules import checked_rule_params, evaluate
from apps.federation.choices import DeviceStatus, TaskKind, TaskStatus
from apps.federation.models import EdgeDevice
from apps.federation.services import create_training_task
from apps.federation.windows import champion_version
from apps.governance.actors import Actor, ActorLike
from apps.governance.audit import record_audit_event
from apps.outbox.choices import OutboxKind
from apps.outbox.services import enqueue
from fednested.messaging.schemas import Event, Telemetry, TelemetryV2, TrainingTask
from fednested.messaging.topics import Topic

logger = logging.getLogger(__name__)

# The worker's acting party: the audit trail names it as the author of triggers and of the tasks they create.
WORKER = Actor.automation("worker:dataengine")
# Prefix of the task ids the data engine publishes: the tasks consumer finds the trigger by it.
TASK_ID_PREFIX = "dataengine-"


@dataclass(frozen=True)
class Arrival:
    """One bus record as the consumer hands it over: where it came from, its raw bytes, and its event or the
    reason it has none (the bus decodes and validates it once)."""

    where: str
    key: str
    raw: bytes
    event: Event | None = None
    problem: str | None = None


@dataclass
class TelemetryOutcome:
    """What became of one record: `status` is stored, duplicate, unattributed (a valid report of a device with no
    domain), refused, task_created or task_refused (or a trigger's status, for a task event seen again); `message`
    says why in words."""

    status: str
    message: str = ""
    signal_ids: list[int] = field(default_factory=list)
    trigger_ids: list[int] = field(default_factory=list)


def _refuse(arrival: Arrival, reason: str, *, client_id: str = "") -> TelemetryOutcome:
    TelemetryRejection.objects.create(
        where=arrival.where[:200],
        key=arrival.key[:200],
        client_id=client_id[:128],
        reason=reason,
        size_bytes=len(arrival.raw),
        sha256=hashlib.sha256(arrival.raw).hexdigest(),
    )
    logger.warning("data engine refused %s: %s", arrival.where, reason)
    return TelemetryOutcome("refused", reason)


@transaction.atomic
def record_telemetry(arrival: Arrival) -> TelemetryOutcome:
    """Store the per-domain signals of one telemetry.edge record and run the enabled rules on the domains it touched.

    Refused (a TelemetryRejection row, never an exception) when the record is larger than
    FEDNESTED_TELEMETRY_MAX_BYTES, is not a valid Telemetry event, or comes from an unknown or revoked device.
    A Telemetry v1 report, or a v2 report without per-domain entries, counts for the device's enrolled domain.
    """
    limit = settings.FEDNESTED_TELEMETRY_MAX_BYTES
    if len(arrival.raw) > limit:
        return _refuse(arrival, f"record of {len(arrival.raw)} bytes exceeds FEDNESTED_TELEMETRY_MAX_BYTES={limit}")
    if arrival.event is None:
        return _refuse(arrival, arrival.problem or "not a valid event")
    event = arrival.event
    if not isinstance(event, Telemetry | TelemetryV2):
        return _refuse(arrival, f"expected a Telemetry event on {Topic.TELEMETRY.value}, got {event.SCHEMA}")
    device = EdgeDevice.objects.filter(client_id=event.client_id).first()
    if device is None:
        return _refuse(arrival, f"unknown device {event.client_id!r}: not enrolled", client_id=event.client_id)
    if device.status != DeviceStatus.ACTIVE:
        return _refuse(arrival, f"device {event.client_id!r} is {device.status}", client_id=event.client_id)
    entries = _domain_entries(event, device)
    if not entries:
        return TelemetryOutcome(
            "unattributed", f"device {device.client_id!r} has no enrolled domain and the report names none"
        )
    digest = hashlib.sha256(arrival.raw).hexdigest()
    if DeviceSignal.objects.filter(report_sha256=digest).exists():
        # The same record delivered again (a consumer died before committing its offset): stored once, judged once.
        return TelemetryOutcome("duplicate", f"{arrival.where}: this report is already stored")
    common = {
        "device": device,
        "client_id": device.client_id,
        "version": event.base_version or "",
        "round_id": event.round_id or "",
        "outcome": event.outcome,
        "dp_noised": event.dp_noised,
        "schema_version": event.SCHEMA_VERSION,
        "source": arrival.where[:200],
        "report_sha256": digest,
        "reported_at": event.finished_at,
    }
    signals = DeviceSignal.objects.bulk_create(
        [DeviceSignal(domain=domain, loss=loss, tokens=tokens, **common) for domain, loss, tokens in entries]
    )
    outcome = TelemetryOutcome("stored", signal_ids=[signal.pk for signal in signals])
    for domain, _, _ in entries:
        outcome.trigger_ids += [trigger.pk for trigger in evaluate_rules(domain)]
    return outcome


def _domain_entries(event: Telemetry | TelemetryV2, device: EdgeDevice) -> list[tuple[str, float | None, int]]:
    """(domain, loss, tokens) of each domain the report is about."""
    if isinstance(event, TelemetryV2) and event.domains:
        return [(entry.domain, entry.loss, entry.tokens) for entry in event.domains]
    if not device.domain:
        return []
    tokens = event.tokens if isinstance(event, TelemetryV2) else 0
    return [(device.domain, event.loss, tokens)]


def evaluate_rules(domain: str) -> list[DataEngineTrigger]:
    """Run every enabled rule on `domain`; each that fires and is not debounced gets a trigger (and its event)."""
    fired = []
    for rule in DataEngineRule.objects.filter(enabled=True).order_by("pk"):
        # Locked: two consumers seeing the same domain at once cannot both pass the debounce check.
        locked = DataEngineRule.objects.select_for_update().get(pk=rule.pk)
        if _debounced(locked, domain):
            continue
        evidence = evaluate(locked, domain)
        if evidence is not None:
            fired.append(fire_trigger(locked, domain, evidence))
    return fired


def _debounced(rule: DataEngineRule, domain: str) -> bool:
    """Whether the rule's last trigger for `domain` still holds: within the cool-down, not yet turned into a task, or
    its task still pending or running."""
    last = (
        DataEngineTrigger.objects.select_related("training_task")
        .filter(rule=rule, domain=domain)
        .order_by("-created_at", "-id")
        .first()
    )
    if last is None:
        return False
    if last.created_at > timezone.now() - timedelta(seconds=rule.cooldown_s):
        return True
    if last.status == TriggerStatus.PUBLISHED:
        return True
    task = last.training_task
    return task is not None and task.status in (TaskStatus.PENDING, TaskStatus.RUNNING)


def task_params_for(rule: DataEngineRule, domain: str) -> dict[str, Any]:
    """The params of the task `rule` asks for on `domain`: its task_params, then the domain's overrides. An evaluation
    that names no version scores the champion of the moment."""
    params = dict(rule.task_params or {})
    overrides = (rule.domain_task_params or {}).get(domain)
    if isinstance(overrides, dict):
        params.update(overrides)
    if rule.task_kind == TaskKind.EVALUATION and "version_id" not in params:
        champion = champion_version()
        if champion is not None:
            params["version_id"] = champion.version_id
    return params


def fire_trigger(rule: DataEngineRule, domain: str, evidence: dict[str, Any]) -> DataEngineTrigger:
    """Record that `rule` fired for `domain` with `evidence`, and publish its TrainingTask event on tasks.training
    through the outbox, in the caller's transaction."""
    params = task_params_for(rule, domain)
    now = timezone.now()
    task_id = f"{TASK_ID_PREFIX}{uuid.uuid4()}"
    # Built (so validated) before anything is written: params that are not JSON are a defect of the rule's edit.
    event = TrainingTask.model_validate(
        {"task_id": task_id, "kind": rule.task_kind, "params": params, "created_at": now}
    )
    trigger = DataEngineTrigger.objects.create(
        rule=rule, domain=domain, evidence=evidence, task_id=task_id, task_kind=rule.task_kind, task_params=params
    )
    enqueue(
        OutboxKind.BUS_EVENT,
        topic=Topic.TASKS.value,
        key=task_id,
        payload=json.loads(event.model_dump_json()),
    )
    record_audit_event(
        actor=WORKER,
        verb="dataengine.trigger.fired",
        target=trigger,
        data={"rule": rule.name, "domain": domain, "task_id": task_id, "task_kind": rule.task_kind},
    )
    return trigger


@transaction.atomic
def create_task_from_event(arrival: Arrival) -> TelemetryOutcome:
    """Turn one tasks.training record into a TrainingTask row through `create_training_task`, once.

    The event must be one the data engine published (its trigger is found by task id); a task the control plane
    refuses (no worker runs its kind, its params are wrong) is recorded on the trigger with the reason.
    """
    if arrival.event is None:
        return _refuse(arrival, arrival.problem or "not a valid event")
    event = arrival.event
    if not isinstance(event, TrainingTask):
        return _refuse(arrival, f"expected a TrainingTask event on {Topic.TASKS.value}, got {event.SCHEMA}")
    trigger = DataEngineTrigger.objects.select_for_update().filter(task_id=event.task_id).first()
    if trigger is None:
        return _refuse(arrival, f"task {event.task_id!r} was not published by the data engine (no trigger has it)")
    if trigger.status != TriggerStatus.PUBLISHED:
        return TelemetryOutcome(trigger.status, "already handled (delivered again)", trigger_ids=[trigger.pk])
    data: dict[str, Any]
    try:
        with transaction.atomic():
            task = create_training_task(kind=event.kind, params=dict(event.params), actor=WORKER)
    except ValidationError as error:
        reasons = [f"{key}: {message}" for key, messages in error.message_dict.items() for message in messages]
        trigger.status = TriggerStatus.REFUSED
        trigger.refusal = "; ".join(reasons)
        trigger.save(update_fields=["status", "refusal"])
        verb, data = "dataengine.trigger.refused", {"task_id": event.task_id, "reasons": reasons}
        outcome = TelemetryOutcome("task_refused", trigger.refusal, trigger_ids=[trigger.pk])
    else:
        trigger.status = TriggerStatus.TASK_CREATED
        trigger.training_task = task
        trigger.save(update_fields=["status", "training_task"])
        verb, data = "dataengine.trigger.task_created", {"task_id": event.task_id, "training_task": task.pk}
        outcome = TelemetryOutcome("task_created", f"training task {task.pk}", trigger_ids=[trigger.pk])
    record_audit_event(actor=WORKER, verb=verb, target=trigger, data=data)
    return outcome


# --- rules -----------------------------------------------------------------------------------------------------------

RULE_FIELDS = ("name", "kind", "params", "enabled", "task_kind", "task_params", "domain_task_params", "cooldown_s")


def _check_rule(values: dict[str, Any]) -> None:
    checked_rule_params(values["kind"], values.get("params", {}))
    if values["task_kind"] not in TaskKind.values:
        raise ValidationError({"task_kind": f"unknown task kind {values['task_kind']!r}: use one of {TaskKind.values}"})
    for name in ("task_params", "domain_task_params"):
        if not isinstance(values.get(name, {}), dict):
            raise ValidationError({name: "must be a JSON object"})
    overrides = values.get("domain_task_params", {})
    bad = sorted(str(domain) for domain, params in overrides.items() if not isinstance(params, dict))
    if bad:
        raise ValidationError({"domain_task_params": f"the params of domains {bad} must be JSON objects"})


@transaction.atomic
def save_rule(*, actor: ActorLike, rule: DataEngineRule | None = None, **values: Any) -> DataEngineRule:
    """Create a rule (rule None) or change the given fields of `rule`; refused (ValidationError naming the field)
    unless its params parse for its kind. Audited with the changed fields."""
    unknown = sorted(set(values) - set(RULE_FIELDS))
    if unknown:
        raise ValidationError({"__all__": f"not fields of a rule: {unknown}"})
    current = {name: getattr(rule, name) for name in RULE_FIELDS} if rule is not None else {}
    merged = {**current, **values}
    _check_rule(merged)
    if rule is None:
        rule = DataEngineRule.objects.create(**merged)
        verb = "dataengine.rule.created"
    else:
        for name, value in values.items():
            setattr(rule, name, value)
        rule.save()
        verb = "dataengine.rule.changed"
    record_audit_event(actor=actor, verb=verb, target=rule, data={"rule": rule.name, "fields": sorted(values)})
    return rule
