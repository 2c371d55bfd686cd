"""The typed acting party: each kind's label, what a user account acts as, the adapter from the older forms, and the
kind stored on (and hash-chained into) the audit event."""

import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import pytest
from django.contrib.auth.models import AnonymousUser
from django.db import transaction
from django.test import RequestFactory

from apps.accounts.choices import Role
from apps.accounts.roles import role_of
from apps.accounts.services import create_user_with_role, system_user
from apps.governance.actors import Actor, as_actor
from apps.governance.audit import record_audit_event
from apps.governance.chain import schedule_seal, verify_chain
from apps.governance.choices import ActorKind
from apps.governance.export import jsonl_lines, verify_export
from apps.governance.models import AuditEvent
from tests.conftest import Member

Capture = Callable[..., AbstractContextManager[Any]]


def test_each_kind_is_named_by_a_stable_label() -> None:
    assert Actor.device("car-0001") == Actor(ActorKind.DEVICE, "device:car-0001")
    assert Actor.automation("worker:aggregation") == Actor(ActorKind.AUTOMATION, "worker:aggregation")
    assert Actor.automation() == Actor(ActorKind.AUTOMATION, "system")
    assert Actor.anonymous() == Actor(ActorKind.ANONYMOUS, "anonymous")
    with pytest.raises(ValueError, match="no line breaks"):
        Actor.automation("worker:x\nolivia-officer approved")
    with pytest.raises(ValueError, match="1 to 200"):
        Actor.automation("")


@pytest.mark.django_db
def test_a_user_acts_as_a_person_a_device_or_automation(cast: dict[str, Member]) -> None:
    officer, device = cast["officer"].user, cast["device"].user
    assert officer is not None
    assert device is not None
    assert Actor.of_user(officer) == Actor(ActorKind.PERSON, "olivia-officer")
    assert Actor.of_user(officer).user == officer
    assert Actor.of_user(device) == Actor(ActorKind.DEVICE, "device:car-0001")
    assert Actor.of_user(device).user == device
    assert Actor.of_user(system_user()) == Actor(ActorKind.AUTOMATION, "fednested-system")
    assert Actor.of_user(AnonymousUser()) == Actor.anonymous()
    assert Actor.of_user(None) == Actor.anonymous()
    request = RequestFactory().get("/")
    request.user = officer
    assert Actor.of_request(request).label == "olivia-officer"
    # role_of reads an actor's account, so services' permission checks take either form.
    assert role_of(Actor.of_user(officer)) is Role.OFFICER
    assert role_of(Actor.device("car-0001")) is None


@pytest.mark.django_db
def test_the_adapter_maps_a_user_account_onto_its_actor(cast: dict[str, Member]) -> None:
    officer, device = cast["officer"].user, cast["device"].user
    assert officer is not None
    assert device is not None
    assert as_actor(None) == Actor.automation()
    assert as_actor(AnonymousUser()) == Actor.automation()
    assert as_actor(officer) == Actor.person(officer)
    assert as_actor(device) == Actor.device("car-0001")
    assert as_actor(device).user == device
    worker = Actor.automation("worker:evaluation")
    assert as_actor(worker) is worker


@pytest.mark.django_db
def test_events_store_the_kind_and_the_chain_covers_it(
    cast: dict[str, Member], django_capture_on_commit_callbacks: Capture
) -> None:
    officer, device = cast["officer"].user, cast["device"].user
    assert officer is not None
    assert device is not None
    parties = [Actor.person(officer), Actor.device("car-0001"), Actor.automation("worker:aggregation")]
    with django_capture_on_commit_callbacks(execute=True), transaction.atomic():
        events = [record_audit_event(actor=party, verb="tests.actor.acted") for party in parties]
        # A service that takes a user account passes it on: stored as what the account acts as.
        events.append(record_audit_event(actor=device, verb="tests.actor.acted"))
    stored = AuditEvent.objects.filter(verb="tests.actor.acted").order_by("id")
    assert [(e.actor_id, e.actor_label, e.actor_kind) for e in stored] == [
        (officer.pk, "olivia-officer", "person"),
        (None, "device:car-0001", "device"),
        (None, "worker:aggregation", "automation"),
        (device.pk, "device:car-0001", "device"),
    ]
    assert verify_chain().ok

    # The kind is hashed: making a device's event read as a person's breaks its link.
    AuditEvent.objects.filter(pk=events[1].pk).update(actor_kind=ActorKind.PERSON)
    report = verify_chain()
    assert not report.ok
    assert report.broken_event_id == events[1].pk
    assert "does not match its hash" in (report.broken or "")
    AuditEvent.objects.filter(pk=events[1].pk).update(actor_kind=ActorKind.DEVICE)
    assert verify_chain().ok

    # Exports carry the kind and verify offline; an export line from before the column (no actor_kind, an event
    # sealed without a kind) still verifies.
    lines = list(jsonl_lines(AuditEvent.objects.filter(verb="tests.actor.acted")))
    assert [json.loads(line)["actor_kind"] for line in lines] == ["person", "device", "automation", "device"]
    assert verify_export(lines).ok
    forged = json.loads(lines[1]) | {"actor_kind": "person"}
    assert not verify_export([json.dumps(forged)]).ok


@pytest.mark.django_db
def test_an_event_sealed_before_the_kind_column_keeps_its_hash(django_capture_on_commit_callbacks: Capture) -> None:
    with django_capture_on_commit_callbacks(execute=True), transaction.atomic():
        # What a row written before migration 0004 looks like: no kind.
        AuditEvent.objects.create(actor_label="worker:old", verb="tests.before_kinds", data={})
        schedule_seal()
    line = json.loads(next(jsonl_lines(AuditEvent.objects.filter(verb="tests.before_kinds"))))
    assert line["actor_kind"] == ""
    del line["actor_kind"]
    assert verify_export([json.dumps(line)]).ok
    assert verify_chain().ok


@pytest.mark.django_db
def test_services_take_an_actor(cast: dict[str, Member]) -> None:
    officer = cast["officer"].user
    assert officer is not None
    created = create_user_with_role(username="nina", role=Role.ENGINEER, actor=Actor.person(officer))
    event = AuditEvent.objects.get(verb="accounts.user.created", object_id=str(created.pk))
    assert (event.actor_id, event.actor_label, event.actor_kind) == (officer.pk, "olivia-officer", "person")
