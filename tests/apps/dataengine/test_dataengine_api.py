"""The data engine's API and console page: engineers write rules through the service (checked, audited), every
other role but devices reads; the console lists triggers with their evidence."""

from datetime import UTC, datetime
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from apps.dataengine.models import DataEngineRule
from apps.dataengine.services import fire_trigger, save_rule
from apps.governance.models import AuditEvent
from tests.conftest import Member

pytestmark = pytest.mark.django_db


def test_engineers_create_and_change_rules_through_the_service(cast: dict[str, Member]) -> None:
    engineer = cast["engineer"].client
    created = engineer.post(
        "/api/v1/data-engine/rules/",
        {
            "name": "legal-uncovered",
            "kind": "uncovered_domain",
            "params": {"min_reports": 3},
            "task_kind": "core_update",
            "domain_task_params": {"legal": {"datasets": ["tier1/legal.jsonl"]}},
        },
        format="json",
    )
    assert created.status_code == 201, created.content
    rule = DataEngineRule.objects.get(name="legal-uncovered")
    assert (rule.params, rule.enabled, rule.cooldown_s) == ({"min_reports": 3}, True, 3600)
    refused = engineer.patch(f"/api/v1/data-engine/rules/{rule.pk}/", {"params": {"min_reports": 0}}, format="json")
    assert refused.status_code == 400
    assert "min_reports: Input should be greater than or equal to 1" in refused.content.decode()
    changed = engineer.patch(f"/api/v1/data-engine/rules/{rule.pk}/", {"enabled": False}, format="json")
    assert (changed.status_code, changed.json()["enabled"]) == (200, False)
    events = AuditEvent.objects.filter(object_type="dataengine.dataenginerule").order_by("id")
    assert list(events.values_list("verb", "data")) == [
        (
            "dataengine.rule.created",
            {"rule": "legal-uncovered", "fields": ["domain_task_params", "kind", "name", "params", "task_kind"]},
        ),
        ("dataengine.rule.changed", {"rule": "legal-uncovered", "fields": ["enabled"]}),
    ]


def test_the_console_lists_triggers_with_their_evidence(cast: dict[str, Member], client: Client) -> None:
    rule = save_rule(actor=cast["engineer"].user, name="medical-rising", kind="rising_loss", task_kind="evaluation")
    evidence: dict[str, Any] = {
        "rise": 0.4321,
        "window": 2,
        "signals": [
            {
                "id": 7,
                "client_id": "car-0001",
                "loss": 1.0,
                "version": "v1",
                "reported_at": datetime.now(UTC).isoformat(),
            },
            {
                "id": 9,
                "client_id": "car-0001",
                "loss": 1.4321,
                "version": "v1",
                "reported_at": datetime.now(UTC).isoformat(),
            },
        ],
    }
    fire_trigger(rule, "medical", evidence)
    client.force_login(cast["officer"].user)  # type: ignore[arg-type]
    page = client.get(reverse("dataengine:trigger-list"), {"domain": "medical"})
    assert page.status_code == 200
    text = page.content.decode()
    assert "medical-rising" in text
    assert "loss rose 0.432 nats over 2 reports" in text
    assert "7: 1.000, 9: 1.432" in text
    client.force_login(cast["device"].user)  # type: ignore[arg-type]
    assert client.get(reverse("dataengine:trigger-list")).status_code == 403
