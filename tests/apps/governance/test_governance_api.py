"""Governance REST API: requesting and deciding approvals, and reading the audit trail with filters."""

from collections.abc import Callable
from typing import Any

import pytest

from apps.registry.models import Alias, ModelFamily, ModelVersion

pytestmark = pytest.mark.django_db


def test_request_then_officer_approves_through_the_api(
    cast: dict[str, Any], family_factory: Callable[..., ModelFamily], version_factory: Callable[..., ModelVersion]
) -> None:
    version_factory(family_factory(), "tiny-moe-v1")
    engineer, officer = cast["engineer"].client, cast["officer"].client
    created = engineer.post("/api/v1/approvals/", {"version": "tiny-moe-v1", "note": "eval attached"}, format="json")
    assert created.status_code == 201
    approval = created.json()
    assert (approval["status"], approval["requested_by"], approval["decision"]) == ("pending", "eric-engineer", None)
    twice = engineer.post("/api/v1/approvals/", {"version": "tiny-moe-v1"}, format="json")
    assert twice.status_code == 400
    assert "already has a pending approval request" in str(twice.json())

    decided = officer.post(f"/api/v1/approvals/{approval['id']}/approve/", {"reason": "gates green"}, format="json")
    assert decided.status_code == 200
    assert decided.json()["decision"]["decided_by"] == "olivia-officer"
    assert Alias.objects.get(name="champion").version.version_id == "tiny-moe-v1"
    again = officer.post(f"/api/v1/approvals/{approval['id']}/reject/", {"reason": "changed my mind"}, format="json")
    assert again.status_code == 400
    assert "already approved" in str(again.json())

    trail = officer.get("/api/v1/audit-events/", {"verb_prefix": "governance."}).json()
    assert [e["verb"] for e in trail["results"]] == ["governance.approval.approved", "governance.approval.requested"]
    alias_moves = officer.get("/api/v1/audit-events/", {"verb": "registry.alias.moved"}).json()["results"]
    assert alias_moves[0]["data"] == {"alias": "champion", "from": None, "to": "tiny-moe-v1"}
    assert alias_moves[0]["actor_label"] == "olivia-officer"
