"""The data engine's services on PostgreSQL: telemetry → signals (v1 and v2, attribution, refusals, redelivery),
the two rule kinds with their evidence, debouncing, the trigger's TrainingTask event in the outbox, the tasks
consumer's side (task row or recorded refusal), and rule edits."""

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.test import override_settings

from apps.accounts.choices import Role
from apps.dataengine.choices import TriggerStatus
from apps.dataengine.models import DataEngineRule, DataEngineTrigger, DeviceSignal, TelemetryRejection
from apps.dataengine.rules import loss_rise
from apps.dataengine.services import Arrival, create_task_from_event, record_telemetry, save_rule
from apps.federation.choices import TaskKind, TaskStatus
from apps.federation.models import TrainingTask as TrainingTaskRow
from apps.federation.services import revoke_device
from apps.governance.models import AuditEvent
from apps.outbox.models import OutboxEvent
from fednested.messaging import SchemaError, Telemetry, TelemetryV2, Topic, TrainingTask, decode, encode
from fednested.messaging.bus import read_message
from tests.conftest import make_device, make_user

pytestmark = pytest.mark.django_db
START = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
_positions = iter(range(10**6))


def telemetry(client_id: str, loss: float | None, *, minute: int = 0, **changes: Any) -> TelemetryV2:
    fields: dict[str, Any] = {
        "client_id": client_id,
        "base_version": "tiny-moe-v1",
        "loss": loss,
        "steps": 8,
        "tokens": 512,
        "duration_s": 3.0,
        "outcome": "succeeded",
        "started_at": START + timedelta(minutes=minute),
        "finished_at": START + timedelta(minutes=minute, seconds=3),
        **changes,
    }
    return TelemetryV2.model_validate(fields)


def arrival(raw: bytes, key: str, topic: Topic = Topic.TELEMETRY) -> Arrival:
    """A record as the consumer hands it over, decoded and checked against its topic by the bus's own code."""
    message = read_message(topic, 0, next(_positions), key, raw, 0)
    problem = str(message.error) if message.error is not None else None
    return Arrival(where=message.where(), key=key, raw=raw, event=message.event, problem=problem)


def report(event: TelemetryV2 | Telemetry) -> Any:
    return record_telemetry(arrival(encode(event), event.client_id))


@pytest.fixture
def engineer() -> Any:
    return make_user("eve-engineer", Role.ENGINEER)[0]


@pytest.fixture
def car(engineer: Any) -> Any:
    return make_device(engineer, "car-1", domain="medical")[0]


def rising_rule(engineer: Any, **changes: Any) -> DataEngineRule:
    values: dict[str, Any] = {
        "name": "medical-loss-rising",
        "kind": "rising_loss",
        "params": {"window": 4, "min_rise": 0.25},
        "task_kind": TaskKind.EVALUATION,
        "task_params": {"version_id": "tiny-moe-v1"},
        "cooldown_s": 0,
        **changes,
    }
    return save_rule(actor=engineer, **values)


# --- the wire schema ------------------------------------------------------------------------------------------------


def test_telemetry_v2_round_trips_and_v1_stays_readable() -> None:
    v2 = telemetry("car-1", 0.5, domains=[{"domain": "medical", "loss": 0.4, "tokens": 300}])
    assert decode(encode(v2)) == v2
    assert json.loads(encode(v2))["schema_version"] == 2
    v1 = Telemetry(
        client_id="car-1", loss=0.5, steps=1, duration_s=1.0, outcome="succeeded", started_at=START, finished_at=START
    )
    assert isinstance(decode(encode(v1)), Telemetry)


@pytest.mark.parametrize(
    ("domains", "problem"),
    [
        ([{"domain": "../etc", "tokens": 1}], "field 'domains.0.domain'"),
        ([{"domain": "a", "tokens": 1}, {"domain": "a", "tokens": 2}], "domains ['a'] are listed more than once"),
        ([{"domain": "a", "tokens": -1}], "field 'domains.0.tokens'"),
        ([{"domain": f"d{i}", "tokens": 1} for i in range(65)], "field 'domains'"),
    ],
)
def test_telemetry_v2_refuses_bad_domain_entries(domains: list[dict[str, Any]], problem: str) -> None:
    raw = json.dumps({**json.loads(encode(telemetry("car-1", 0.5))), "domains": domains}).encode()
    with pytest.raises(SchemaError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        decode(raw)


# --- signals --------------------------------------------------------------------------------------------------------


def test_a_report_without_domains_counts_for_the_enrolled_domain_and_a_v2_breakdown_for_its_own(car: Any) -> None:
    first = report(telemetry("car-1", 0.9))
    assert first.status == "stored"
    [signal] = DeviceSignal.objects.filter(pk__in=first.signal_ids)
    assert (signal.domain, signal.loss, signal.tokens, signal.version, signal.schema_version) == (
        "medical",
        0.9,
        512,
        "tiny-moe-v1",
        2,
    )
    breakdown = [{"domain": "legal", "loss": 1.25, "tokens": 100}, {"domain": "code", "tokens": 412}]
    second = report(telemetry("car-1", 0.8, minute=1, domains=breakdown))
    assert sorted(DeviceSignal.objects.filter(pk__in=second.signal_ids).values_list("domain", "loss", "tokens")) == [
        ("code", None, 412),
        ("legal", 1.25, 100),
    ]
    # At-least-once: the same record again is recognised by its digest and stored once.
    again = record_telemetry(arrival(encode(telemetry("car-1", 0.9)), "car-1"))
    assert again.status == "duplicate"
    assert DeviceSignal.objects.count() == 3


def test_unknown_and_revoked_devices_and_oversized_records_are_refused_and_recorded(car: Any, engineer: Any) -> None:
    stranger = report(telemetry("car-unknown", 0.5))
    assert (stranger.status, stranger.message) == ("refused", "unknown device 'car-unknown': not enrolled")
    with override_settings(FEDNESTED_TELEMETRY_MAX_BYTES=1024):
        padded = json.dumps({**json.loads(encode(telemetry("car-1", 0.5))), "pad": "x" * 2000}).encode()
        big = record_telemetry(arrival(padded, "car-1"))
    assert big.message == f"record of {len(padded)} bytes exceeds FEDNESTED_TELEMETRY_MAX_BYTES=1024"
    revoke_device(car, actor=engineer, reason="stolen")
    assert report(telemetry("car-1", 0.5)).message == "device 'car-1' is revoked"
    rows = list(TelemetryRejection.objects.order_by("id").values_list("client_id", "size_bytes", "sha256"))
    assert [row[0] for row in rows] == ["car-unknown", "", "car-1"]
    assert rows[1][1:] == (len(padded), hashlib.sha256(padded).hexdigest())
    assert DeviceSignal.objects.count() == 0


# --- rules ----------------------------------------------------------------------------------------------------------


def test_loss_rise_compares_the_later_half_with_the_earlier() -> None:
    assert loss_rise([1.0, 1.0, 1.5, 1.7]) == pytest.approx(0.6)
    assert loss_rise([1.0, 9.0, 1.0]) == pytest.approx(0.0)  # the odd middle report is left out
    assert loss_rise([2.0, 1.0]) == pytest.approx(-1.0)


def test_rising_loss_fires_once_with_its_evidence_and_publishes_a_training_task(car: Any, engineer: Any) -> None:
    rule = rising_rule(engineer, cooldown_s=3600)
    outcomes = [report(telemetry("car-1", loss, minute=i)) for i, loss in enumerate([1.0, 1.1, 1.4, 1.6])]
    assert [len(outcome.trigger_ids) for outcome in outcomes] == [0, 0, 0, 1]
    trigger = DataEngineTrigger.objects.get()
    assert (trigger.rule, trigger.domain, trigger.status, trigger.task_kind) == (
        rule,
        "medical",
        TriggerStatus.PUBLISHED,
        "evaluation",
    )
    assert trigger.evidence["rise"] == pytest.approx(0.45)
    assert [signal["loss"] for signal in trigger.evidence["signals"]] == [1.0, 1.1, 1.4, 1.6]
    assert {signal["id"] for signal in trigger.evidence["signals"]} == set(
        DeviceSignal.objects.values_list("id", flat=True)
    )
    # Its event waits in the outbox, written in the same transaction, for the relay to put on tasks.training.
    row = OutboxEvent.objects.get(topic=Topic.TASKS.value)
    event = decode(json.dumps(row.payload).encode())
    assert isinstance(event, TrainingTask)
    assert (event.task_id, event.kind, event.params, row.key) == (
        trigger.task_id,
        "evaluation",
        {"version_id": "tiny-moe-v1"},
        trigger.task_id,
    )
    # Debounced: the loss keeps rising, but the open trigger (and the cool-down) holds the rule back.
    assert report(telemetry("car-1", 2.5, minute=5)).trigger_ids == []
    assert DataEngineTrigger.objects.count() == 1
    assert AuditEvent.objects.filter(verb="dataengine.trigger.fired").count() == 1


def test_a_rule_fires_again_once_its_task_finished_and_the_cooldown_passed(car: Any, engineer: Any) -> None:
    rising_rule(engineer, cooldown_s=0)
    for i, loss in enumerate([1.0, 1.0, 1.5, 1.5]):
        report(telemetry("car-1", loss, minute=i))
    first = DataEngineTrigger.objects.get()
    assert report(telemetry("car-1", 2.0, minute=4)).trigger_ids == []  # published, no task yet: still open
    task = TrainingTaskRow.objects.create(kind=TaskKind.EVALUATION, status=TaskStatus.SUCCEEDED)
    DataEngineTrigger.objects.filter(pk=first.pk).update(status=TriggerStatus.TASK_CREATED, training_task=task)
    assert len(report(telemetry("car-1", 2.6, minute=5)).trigger_ids) == 1


def test_a_flat_or_short_history_does_not_fire_and_dp_noised_losses_can_be_left_out(car: Any, engineer: Any) -> None:
    rising_rule(engineer, params={"window": 4, "min_rise": 0.25, "include_dp_noised": False})
    for i, loss in enumerate([1.0, 1.0, 1.1]):
        report(telemetry("car-1", loss, minute=i))
    assert report(telemetry("car-1", 3.0, minute=4, dp_noised=True)).trigger_ids == []  # noised: not counted
    assert report(telemetry("car-1", 1.1, minute=5)).trigger_ids == []  # 1.0 1.0 | 1.1 1.1: rose 0.1 < 0.25
    assert DataEngineTrigger.objects.count() == 0


def test_uncovered_domain_fires_for_traffic_without_a_protected_heldout_set(
    car: Any, engineer: Any, artifact_store: Path, tmp_path: Path
) -> None:
    save_rule(
        actor=engineer,
        name="uncovered",
        kind="uncovered_domain",
        params={"min_reports": 2, "min_tokens": 600},
        task_kind=TaskKind.CORE_UPDATE,
        task_params={"steps": 10},
        domain_task_params={"legal": {"dataset": "tier1/legal.jsonl"}},
        cooldown_s=3600,
    )
    heldout = artifact_store / "heldout"
    heldout.mkdir()
    (heldout / "medical.jsonl").write_text('{"text": "held out"}\n')
    gate = tmp_path / "gate.json"
    gate.write_text(json.dumps({"protected": {"medical": {"max_increase_nats": 0.1}}}))
    legal = [{"domain": "legal", "tokens": 400}]
    with override_settings(FEDNESTED_PROMOTION_GATE=str(gate)):
        assert report(telemetry("car-1", 0.5)).trigger_ids == []  # medical: held out and protected
        assert report(telemetry("car-1", 0.5, minute=1)).trigger_ids == []
        assert report(telemetry("car-1", 0.5, minute=2, domains=legal)).trigger_ids == []  # 1 report, 400 tokens
        [fired] = report(telemetry("car-1", 0.5, minute=3, domains=legal)).trigger_ids
    trigger = DataEngineTrigger.objects.get(pk=fired)
    assert trigger.domain == "legal"
    assert trigger.evidence["why"] == "no held-out set legal.jsonl in the store's 'heldout' folder"
    assert (trigger.evidence["reports"], trigger.evidence["tokens"]) == (2, 800)
    assert trigger.task_params == {"steps": 10, "dataset": "tier1/legal.jsonl"}


# --- the tasks consumer's side --------------------------------------------------------------------------------------


def fired_trigger(car: Any, engineer: Any, **rule_changes: Any) -> DataEngineTrigger:
    rising_rule(engineer, **rule_changes)
    for i, loss in enumerate([1.0, 1.0, 2.0, 2.0]):
        report(telemetry("car-1", loss, minute=i))
    return DataEngineTrigger.objects.get()


def task_event_of(trigger: DataEngineTrigger) -> bytes:
    row = OutboxEvent.objects.get(topic=Topic.TASKS.value, key=trigger.task_id)
    return json.dumps(row.payload).encode()


def test_a_task_event_becomes_a_training_task_once(
    car: Any, engineer: Any, artifact_store: Path, version_factory: Any, family_factory: Any, settings: Any
) -> None:
    settings.FEDNESTED_JOBS_IN_PROCESS = False
    version_factory(family_factory(), "tiny-moe-v1")
    (artifact_store / "heldout").mkdir()
    (artifact_store / "heldout" / "medical.jsonl").write_text('{"text": "held out"}\n')
    trigger = fired_trigger(car, engineer)
    raw = task_event_of(trigger)
    outcome = create_task_from_event(arrival(raw, trigger.task_id, Topic.TASKS))
    assert outcome.status == "task_created"
    trigger.refresh_from_db()
    task = TrainingTaskRow.objects.get()
    assert (trigger.status, trigger.training_task, task.kind, task.params) == (
        TriggerStatus.TASK_CREATED,
        task,
        "evaluation",
        {"version_id": "tiny-moe-v1"},
    )
    again = create_task_from_event(arrival(raw, trigger.task_id, Topic.TASKS))
    assert (again.status, TrainingTaskRow.objects.count()) == (TriggerStatus.TASK_CREATED, 1)


def test_a_refused_task_is_recorded_on_the_trigger_and_strangers_events_are_rejected(car: Any, engineer: Any) -> None:
    trigger = fired_trigger(car, engineer, task_params={"version_id": "tiny-moe-v404"})
    outcome = create_task_from_event(arrival(task_event_of(trigger), trigger.task_id, Topic.TASKS))
    trigger.refresh_from_db()
    assert (outcome.status, trigger.status) == ("task_refused", TriggerStatus.REFUSED)
    assert "params: version_id: unknown version 'tiny-moe-v404'" in trigger.refusal
    assert TrainingTaskRow.objects.count() == 0
    stranger = TrainingTask(task_id="t-1", kind="evaluation", params={}, created_at=START)
    refused = create_task_from_event(arrival(encode(stranger), "t-1", Topic.TASKS))
    assert refused.message == "task 't-1' was not published by the data engine (no trigger has it)"


# --- rules through the service --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({"kind": "sometimes"}, "unknown rule kind 'sometimes'"),
        ({"params": {"window": 1}}, "window: Input should be greater than or equal to 2"),
        ({"params": {"windw": 4}}, "windw: not a parameter of rising_loss rules"),
        ({"task_kind": "party"}, "unknown task kind 'party'"),
        ({"domain_task_params": {"legal": [1]}}, "the params of domains ['legal'] must be JSON objects"),
    ],
)
def test_save_rule_refuses_what_cannot_run(engineer: Any, values: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError) as caught:
        rising_rule(engineer, **values)
    assert problem in str(caught.value)
    assert DataEngineRule.objects.count() == 0
