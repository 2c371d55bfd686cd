"""The promotion gate: thresholds from the federation's config, 409 for a held candidate, two-officer overrides."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from apps.governance.actors import Actor
from apps.governance.gate import (
    DomainThreshold,
    GateConfigError,
    PromotionGate,
    check_thresholds,
    load_promotion_gate,
)
from apps.governance.models import ApprovalRequest, AuditEvent, GateOverride
from apps.governance.services import request_approval
from apps.registry.choices import CHAMPION_ALIAS, VersionStatus
from apps.registry.forgetting import record_forgetting_report
from apps.registry.models import Alias, ModelFamily, ModelVersion
from apps.registry.services import DomainEvaluation, move_alias, record_version_evaluation, set_version_status
from fednested.evaluation.forgetting import forgetting_report
from tests.conftest import Member, make_user

pytestmark = pytest.mark.django_db

HELDOUT = "artifacts://heldout"
# v1 (champion) → v2 (candidate): code gets worse by 0.2 nats (10 %), medical better.
V1 = {"code": 2.0, "medical": 1.6}
V2 = {"code": 2.2, "medical": 1.5}


def evaluate(version: ModelVersion, losses: dict[str, float], parent: dict[str, float] | None) -> None:
    record_version_evaluation(
        version,
        [
            DomainEvaluation(
                domain=domain,
                loss=loss,
                perplexity=None,
                tokens=100,
                records=5,
                parent_loss=parent[domain] if parent else None,
            )
            for domain, loss in losses.items()
        ],
        actor=Actor.automation("tests"),
        heldout=HELDOUT,
    )


@pytest.fixture
def held(
    cast: dict[str, Member],
    family_factory: Callable[..., ModelFamily],
    version_factory: Callable[..., ModelVersion],
    settings: Any,
    tmp_path: Path,
) -> dict[str, Any]:
    """v1 champion, v2 its candidate with an approval the engineer asked for, and a gate protecting `code`."""
    family = family_factory()
    v1 = version_factory(family, "v1")
    set_version_status(v1, VersionStatus.CHAMPION, actor=Actor.automation("tests"))
    move_alias(name=CHAMPION_ALIAS, version=v1, actor=Actor.automation("tests"))
    evaluate(v1, V1, None)
    v2 = version_factory(family, "v2", parent=v1)
    evaluate(v2, V2, V1)
    approval = request_approval(v2, actor=cast["engineer"].user, note="round 2")
    gate = tmp_path / "gate.json"
    gate.write_text(json.dumps({"protected": {"code": {"max_increase_nats": 0.1, "max_increase_fraction": 0.2}}}))
    settings.FEDNESTED_PROMOTION_GATE = str(gate)
    second, second_token = make_user("oona-officer", "officer")
    second_client = type(cast["officer"].client)()
    second_client.credentials(HTTP_AUTHORIZATION=f"Token {second_token}")
    return {"v1": v1, "v2": v2, "approval": approval, "gate": gate, "second": second, "second_client": second_client}


def test_thresholds_are_checked_against_hand_computed_figures() -> None:
    gate = PromotionGate(
        protected={
            "code": DomainThreshold(max_increase_nats=0.1, max_increase_fraction=0.2),
            "law": DomainThreshold(max_increase_fraction=0.05, against=("champion",)),
            "math": DomainThreshold(max_increase_nats=0.5),
        },
        source="test",
    )
    losses = {"code": 2.2, "law": 1.06, "math": 1.0}
    references = {"parent": ("p", {"code": 2.0, "law": 0.5, "math": 3.0}), "champion": ("c", {"code": 2.15})}
    breaches = check_thresholds(gate, losses, references)
    # code: +0.2 nats vs the parent (over 0.1; 10 % is under 20 %), +0.05 vs the champion (under both);
    # law: only against the champion, which has no score on it; math: better than the parent, and the champion
    # (a reference by default) has no score on it either.
    assert [(b.domain, b.against, b.reference, b.limit) for b in breaches] == [
        ("code", "parent", "p", "max_increase_nats"),
        ("law", "champion", "c", "no_reference_score"),
        ("math", "champion", "c", "no_reference_score"),
    ]
    assert breaches[0].change == pytest.approx(0.2)
    assert breaches[0].relative_change == pytest.approx(0.1)
    # No champion yet and a root candidate: nothing to compare, nothing held.
    assert check_thresholds(gate, losses, {"parent": None, "champion": None}) == []
    assert [b.limit for b in check_thresholds(gate, {}, {})] == ["not_evaluated"] * 3


def test_thresholds_naming_an_unknown_domain_are_refused(cast: dict[str, Member], held: dict[str, Any]) -> None:
    held["gate"].write_text(json.dumps({"protected": {"cdoe": {"max_increase_nats": 0.1}}}))
    with pytest.raises(
        GateConfigError, match=r"protected\.cdoe: unknown domain 'cdoe'.*\['code', 'medical'\]"
    ) as error:
        load_promotion_gate()
    assert str(held["gate"]) in str(error.value)
    # While the file is wrong, approval fails closed with the same message.
    response = cast["officer"].client.post(f"/api/v1/approvals/{held['approval'].pk}/approve/", {"reason": "ok"})
    assert response.status_code == 409
    assert "unknown domain 'cdoe'" in response.json()["error"]
    assert ModelVersion.objects.get(version_id="v2").status == VersionStatus.CANDIDATE


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not JSON"),
        (json.dumps({"protected": {}, "extra": 1}), "one key, 'protected'"),
        (json.dumps({"protected": {"code": {}}}), "needs max_increase_nats or max_increase_fraction"),
        (json.dumps({"protected": {"code": {"max_increase_nats": -1}}}), "finite number ≥ 0"),
        (json.dumps({"protected": {"code": {"max_increase_nats": True}}}), "finite number ≥ 0"),
        (json.dumps({"protected": {"code": {"max_increase_nats": 1, "typo": 2}}}), "unknown keys \\['typo'\\]"),
        (json.dumps({"protected": {"code": {"max_increase_nats": 1, "against": ["sibling"]}}}), "against"),
    ],
)
def test_malformed_thresholds_are_refused_with_the_key(held: dict[str, Any], content: str, message: str) -> None:
    held["gate"].write_text(content)
    with pytest.raises(GateConfigError, match=message):
        load_promotion_gate()


def test_missing_thresholds_file_is_named(held: dict[str, Any], settings: Any, tmp_path: Path) -> None:
    settings.FEDNESTED_PROMOTION_GATE = str(tmp_path / "absent.json")
    with pytest.raises(GateConfigError, match=r"absent\.json: cannot read it"):
        load_promotion_gate()


def test_approving_a_gated_candidate_through_the_api_answers_409_with_the_figures(
    cast: dict[str, Member], held: dict[str, Any]
) -> None:
    officer = cast["officer"].client
    # Someone who may not approve at all learns that, not the gate's figures.
    assert cast["engineer"].client.post(f"/api/v1/approvals/{held['approval'].pk}/approve/", {}).status_code == 403
    shown = officer.get(f"/api/v1/approvals/{held['approval'].pk}/").json()
    assert shown["gate"]["held"] is True
    response = officer.post(f"/api/v1/approvals/{held['approval'].pk}/approve/", {"reason": "looks fine"})
    assert response.status_code == 409
    body = response.json()
    assert (body["code"], body["version"]) == ("gate_held", "v2")
    # code is +0.2 nats against both the parent and the champion (both v1), over the 0.1 allowed; 10 % is under 20 %.
    assert [(b["domain"], b["against"], b["reference"], b["limit"]) for b in body["breaches"]] == [
        ("code", "parent", "v1", "max_increase_nats"),
        ("code", "champion", "v1", "max_increase_nats"),
    ]
    assert body["breaches"][0]["change"] == pytest.approx(0.2)
    assert body["breaches"][0]["allowed"] == 0.1
    assert "code: loss 2.2000 vs parent v1 2.0000 is +0.2000 nats" in body["detail"]
    assert ApprovalRequest.objects.get(pk=held["approval"].pk).status == "pending"
    assert Alias.objects.get(name=CHAMPION_ALIAS).version.version_id == "v1"
    assert not AuditEvent.objects.filter(verb="governance.approval.approved").exists()


def test_an_override_needs_a_second_officer_and_a_reason_and_is_audited(
    cast: dict[str, Member], held: dict[str, Any]
) -> None:
    officer, second = cast["officer"].client, held["second_client"]
    approval = held["approval"].pk
    no_reason = officer.post(f"/api/v1/approvals/{approval}/request-override/", {"reason": " "})
    assert no_reason.status_code == 400
    assert "a gate override needs a written reason" in str(no_reason.json())
    engineer = cast["engineer"].client.post(f"/api/v1/approvals/{approval}/request-override/", {"reason": "x"})
    assert engineer.status_code == 403
    asked = officer.post(f"/api/v1/approvals/{approval}/request-override/", {"reason": "code is not shipped yet"})
    assert asked.status_code == 201
    assert asked.json()["breaches"][0]["domain"] == "code"
    again = second.post(f"/api/v1/approvals/{approval}/request-override/", {"reason": "me too"})
    assert again.status_code == 400
    # The officer who asked for the override cannot grant it.
    own = officer.post(f"/api/v1/approvals/{approval}/grant-override/", {"reason": "granting my own"})
    assert own.status_code == 403
    assert "cannot grant the gate override they asked for" in own.json()["detail"]
    assert officer.post(f"/api/v1/approvals/{approval}/approve/", {"reason": "ok"}).status_code == 409
    unreasoned = second.post(f"/api/v1/approvals/{approval}/grant-override/", {})
    assert unreasoned.status_code == 400
    granted = second.post(f"/api/v1/approvals/{approval}/grant-override/", {"reason": "agreed: code ships next round"})
    assert granted.status_code == 200
    assert granted.json()["granted_by"] == "oona-officer"
    approved = officer.post(f"/api/v1/approvals/{approval}/approve/", {"reason": "promoting under the override"})
    assert approved.status_code == 200
    assert Alias.objects.get(name=CHAMPION_ALIAS).version.version_id == "v2"
    verbs = list(
        AuditEvent.objects.filter(verb__startswith="governance.").order_by("id").values_list("verb", "actor_label")
    )
    assert verbs[-3:] == [
        ("governance.gate.override_requested", "olivia-officer"),
        ("governance.gate.override_granted", "oona-officer"),
        ("governance.approval.approved", "olivia-officer"),
    ]
    event = AuditEvent.objects.get(verb="governance.approval.approved")
    assert event.data["gate_override"] == GateOverride.objects.get().pk
    assert event.data["overridden"][0]["limit"] == "max_increase_nats"


def test_an_override_covers_only_the_breaches_it_was_granted_for(cast: dict[str, Member], held: dict[str, Any]) -> None:
    approval = held["approval"].pk
    cast["officer"].client.post(f"/api/v1/approvals/{approval}/request-override/", {"reason": "code later"})
    held["second_client"].post(f"/api/v1/approvals/{approval}/grant-override/", {"reason": "agreed"})
    # The gate now also protects medical, and the candidate is evaluated again worse on it.
    held["gate"].write_text(
        json.dumps({"protected": {"code": {"max_increase_nats": 0.1}, "medical": {"max_increase_nats": 0.01}}})
    )
    evaluate(held["v2"], {"code": 2.2, "medical": 1.7}, V1)
    response = cast["officer"].client.post(f"/api/v1/approvals/{approval}/approve/", {"reason": "ok"})
    assert response.status_code == 409
    assert {b["domain"] for b in response.json()["breaches"]} == {"code", "medical"}


def test_an_override_of_a_candidate_the_gate_does_not_hold_is_refused(
    cast: dict[str, Member], held: dict[str, Any]
) -> None:
    held["gate"].write_text(json.dumps({"protected": {"code": {"max_increase_nats": 0.5}}}))
    response = cast["officer"].client.post(
        f"/api/v1/approvals/{held['approval'].pk}/request-override/", {"reason": "just in case"}
    )
    assert response.status_code == 400
    assert "is not held by the gate" in str(response.json())
    approved = cast["officer"].client.post(f"/api/v1/approvals/{held['approval'].pk}/approve/", {"reason": "fine"})
    assert approved.status_code == 200


def test_forgetting_report_is_served_for_officers_and_engineers(cast: dict[str, Member], held: dict[str, Any]) -> None:
    report = forgetting_report(["v1", "v2"], {"v1": V1, "v2": V2}, parent="v1", champions=["v1"])
    record_forgetting_report(
        held["v2"], report, heldout=HELDOUT, actor=Actor.automation("tests"), scored={"v1": "stored"}
    )
    response = cast["engineer"].client.get("/api/v1/versions/v2/forgetting/")
    assert response.status_code == 200
    body = response.json()
    assert body["version"] == "v2"
    assert body["average_forgetting"] == pytest.approx(0.1)  # code +0.2, medical 0 → mean 0.1
    assert body["backward_transfer"] == pytest.approx(-0.05)  # (2.0 − 2.2 + 1.6 − 1.5) / 2
    assert body["report"]["domains"]["code"]["vs_parent"]["change"] == pytest.approx(0.2)
    assert body["report"]["sources"] == {"v1": "stored"}
    assert cast["engineer"].client.get("/api/v1/versions/v1/forgetting/").status_code == 404
    assert cast["device"].client.get("/api/v1/versions/v2/forgetting/").status_code == 403
