"""Approvals: engineers request, a different officer decides; approving moves champion and announces ModelAvailable."""

from collections.abc import Callable
from typing import Any

import pytest
from django.core.exceptions import PermissionDenied, ValidationError

from apps.accounts.choices import Role
from apps.accounts.models import User
from apps.accounts.services import set_user_role
from apps.governance.choices import ApprovalStatus
from apps.governance.models import ApprovalDecision, ApprovalRequest, AuditEvent
from apps.governance.services import approve_version, reject_version, request_approval
from apps.registry.choices import VersionStatus
from apps.registry.models import Alias, ModelFamily, ModelVersion

pytestmark = pytest.mark.django_db


@pytest.fixture
def people(user_factory: Callable[[str, str], tuple[User, str]]) -> dict[str, User]:
    return {
        "engineer": user_factory("eric-engineer", Role.ENGINEER)[0],
        "officer": user_factory("olivia-officer", Role.OFFICER)[0],
        "officer2": user_factory("otto-officer", Role.OFFICER)[0],
        "admin": user_factory("ada-admin", Role.ADMIN)[0],
    }


@pytest.fixture
def versions(
    family_factory: Callable[..., ModelFamily], version_factory: Callable[..., ModelVersion]
) -> list[ModelVersion]:
    family = family_factory()
    v1 = version_factory(family, "tiny-moe-v1")
    return [v1, version_factory(family, "tiny-moe-v2", parent=v1)]


def test_approve_moves_champion_archives_the_old_one_and_publishes_after_commit(
    people: dict[str, User], versions: list[ModelVersion], settings: Any, tmp_path: Any
) -> None:
    from apps.federation.events import bus_settings
    from fednested.messaging import ModelAvailable, Topic, make_bus

    settings.FEDNESTED_BUS = "embedded"
    settings.FEDNESTED_BUS_PATH = tmp_path / "bus.sqlite3"
    from apps.outbox.handlers import Delivery
    from apps.outbox.models import OutboxEvent
    from workers.relay.relay import relay_batch

    v1, v2 = versions
    approve_version(request_approval(v1, actor=people["engineer"]), actor=people["officer"], reason="baseline")
    request = request_approval(v2, actor=people["engineer"], note="beats v1 on automotive")
    approve_version(request, actor=people["officer"], reason="no protected domain regressed")
    # Each approval wrote its ModelAvailable to the outbox in its own transaction; the relay publishes them.
    assert OutboxEvent.objects.filter(sent_at=None, topic=Topic.CONTROL_ROUNDS).count() == 2
    with Delivery() as delivery:
        assert relay_batch(delivery).sent == 2

    assert Alias.objects.get(name="champion").version == v2
    statuses = dict(ModelVersion.objects.values_list("version_id", "status"))
    assert statuses == {"tiny-moe-v1": VersionStatus.ARCHIVED, "tiny-moe-v2": VersionStatus.CHAMPION}
    decision = ApprovalDecision.objects.get(request=request)
    assert (decision.decided_by, decision.decision, decision.reason) == (
        people["officer"],
        "approved",
        "no protected domain regressed",
    )
    assert ApprovalRequest.objects.get(pk=request.pk).status == ApprovalStatus.APPROVED
    verbs = list(AuditEvent.objects.filter(actor=people["officer"]).order_by("pk").values_list("verb", flat=True))
    assert verbs[-4:] == [
        "governance.approval.approved",
        "registry.version.status_changed",
        "registry.version.status_changed",
        "registry.alias.moved",
    ]
    with make_bus(bus_settings()) as bus, bus.consumer("tests-model-available", [Topic.CONTROL_ROUNDS]) as consumer:
        events = [consumer.poll(5.0), consumer.poll(5.0)]
    available = [m.event for m in events if m is not None and isinstance(m.event, ModelAvailable)]
    assert [(e.version_id, e.alias) for e in available] == [("tiny-moe-v1", "champion"), ("tiny-moe-v2", "champion")]
    assert available[1].manifest_sha256 == v2.manifest_sha256
    assert available[1].artifact_uri == v2.artifact_uri


def test_nothing_is_published_when_the_transaction_rolls_back(
    people: dict[str, User], versions: list[ModelVersion], django_capture_on_commit_callbacks: Any
) -> None:
    request = request_approval(versions[0], actor=people["engineer"])
    with django_capture_on_commit_callbacks(execute=False) as callbacks, pytest.raises(PermissionDenied):
        approve_version(request, actor=people["engineer"])
    assert callbacks == []
    assert not Alias.objects.filter(name="champion").exists()


def test_reject_needs_a_reason_and_marks_the_version_rejected(
    people: dict[str, User], versions: list[ModelVersion]
) -> None:
    request = request_approval(versions[0], actor=people["engineer"])
    with pytest.raises(ValidationError, match="needs a reason"):
        reject_version(request, actor=people["officer"], reason="")
    reject_version(request, actor=people["officer"], reason="medical regression 4% > 1% threshold")
    assert ModelVersion.objects.get(pk=versions[0].pk).status == VersionStatus.REJECTED
    assert ApprovalDecision.objects.get(request=request).decision == "rejected"
    assert AuditEvent.objects.get(verb="governance.approval.rejected").data["reason"].startswith("medical")
    assert not Alias.objects.filter(name="champion").exists()
    with pytest.raises(ValidationError, match="is rejected; only candidates can be approved"):
        request_approval(versions[0], actor=people["engineer"])


def test_only_officers_decide_and_never_their_own_request(
    people: dict[str, User], versions: list[ModelVersion]
) -> None:
    request = request_approval(versions[0], actor=people["engineer"])
    for who in ("engineer", "admin"):
        with pytest.raises(PermissionDenied, match="only governance officers decide"):
            approve_version(request, actor=people[who])
    # The requester later became an officer: still may not decide the request they made.
    set_user_role(people["engineer"], Role.OFFICER, actor=people["admin"])
    with pytest.raises(PermissionDenied, match="cannot decide their own approval request"):
        approve_version(request, actor=people["engineer"])
    assert ApprovalRequest.objects.get(pk=request.pk).status == ApprovalStatus.PENDING
    assert not ApprovalDecision.objects.exists()


def test_a_request_is_decided_once(people: dict[str, User], versions: list[ModelVersion]) -> None:
    request = request_approval(versions[0], actor=people["engineer"])
    stale_copy = ApprovalRequest.objects.get(pk=request.pk)
    approve_version(request, actor=people["officer"])
    with pytest.raises(ValidationError, match="was already approved"):
        reject_version(stale_copy, actor=people["officer2"], reason="too late")
    assert ApprovalDecision.objects.count() == 1


def test_request_rules(people: dict[str, User], versions: list[ModelVersion]) -> None:
    with pytest.raises(PermissionDenied, match="only engineers"):
        request_approval(versions[0], actor=people["officer"])
    request_approval(versions[0], actor=people["engineer"])
    with pytest.raises(ValidationError, match="already has a pending approval request"):
        request_approval(versions[0], actor=people["engineer"])
    event = AuditEvent.objects.get(verb="governance.approval.requested")
    assert (event.actor, event.data["version_id"]) == (people["engineer"], "tiny-moe-v1")
