"""The Django admin is usable: every registered model's list and detail page renders for a superuser."""

import hashlib
import io
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.contrib.admin.sites import site as admin_site
from django.test import Client
from django.urls import reverse

from apps.dataengine.services import Arrival, fire_trigger, record_telemetry, save_rule
from apps.federation.services import create_training_task, store_update_payload
from apps.governance.actors import Actor
from apps.governance.models import GateOverride
from apps.governance.services import approve_version, request_approval
from apps.registry.forgetting import record_forgetting_report
from apps.registry.models import ModelFamily, ModelVersion
from apps.registry.services import DomainEvaluation, record_version_evaluation
from fednested.evaluation.forgetting import forgetting_report
from fednested.messaging import TelemetryV2, encode

pytestmark = pytest.mark.django_db


def test_every_admin_list_and_detail_page_renders(
    cast: dict[str, Any],
    family_factory: Callable[..., ModelFamily],
    version_factory: Callable[..., ModelVersion],
    round_factory: Callable[..., Any],
    update_row_factory: Callable[..., Any],
    client: Client,
    tmp_path: Path,
) -> None:
    v1 = version_factory(family_factory(), "tiny-moe-v1")
    record_version_evaluation(v1, [DomainEvaluation("medical", 2.0, 7.39, 100)], actor=Actor.automation("tests"))
    store_update_payload(
        cast["device"].device,
        str(uuid.uuid4()),
        io.BytesIO(b"payload"),
        declared_sha256=hashlib.sha256(b"payload").hexdigest(),
        content_length=7,
        max_bytes=1024,
        root=tmp_path,
    )
    version_factory(v1.family, "tiny-moe-v0")
    report = forgetting_report(
        ["tiny-moe-v0", "tiny-moe-v1"],
        {"tiny-moe-v0": {"medical": 1.9}, "tiny-moe-v1": {"medical": 2.0}},
        parent="tiny-moe-v0",
        champions=["tiny-moe-v0"],
    )
    record_forgetting_report(
        v1, report, heldout="heldout", actor=Actor.automation("tests"), scored={"tiny-moe-v0": "stored"}
    )
    approval = request_approval(v1, actor=cast["engineer"].user)
    # Asked and granted through the gate's services in tests/apps/governance; here only the admin pages are tried.
    GateOverride.objects.create(
        request=approval, requested_by=cast["officer"].user, reason="tests", breaches=[{"domain": "medical"}]
    )
    approve_version(approval, actor=cast["officer"].user)
    round_a = round_factory(v1, round_id="round-a")
    create_training_task(kind="expert_aggregation", actor=cast["engineer"].user, round_=round_a)
    update_row_factory(cast["device"].device, "tiny-moe-v1")
    # The data engine's four models: a signal and a refused record through the telemetry service, a rule, a trigger.
    telemetry = TelemetryV2.model_validate(
        {
            "client_id": "car-0001",
            "base_version": "tiny-moe-v1",
            "loss": 1.5,
            "steps": 1,
            "tokens": 64,
            "duration_s": 1.0,
            "outcome": "succeeded",
            "started_at": v1.created_at,
            "finished_at": v1.created_at,
        }
    )
    record_telemetry(Arrival(where="telemetry.edge[0]@0", key="car-0001", raw=encode(telemetry), event=telemetry))
    record_telemetry(Arrival(where="telemetry.edge[0]@1", key="car-0001", raw=b"{", problem="malformed JSON"))
    rule = save_rule(actor=cast["engineer"].user, name="tiny-rising", kind="rising_loss", task_kind="evaluation")
    fire_trigger(rule, "automotive", {"signal_ids": []})
    root = cast["officer"].user
    root.is_staff = root.is_superuser = True
    root.save()
    client.force_login(root)
    ours = [
        model
        for model in admin_site._registry
        if model._meta.app_label in {"accounts", "registry", "federation", "governance", "dataengine"}
    ]
    assert len(ours) == 23
    for model in ours:
        info = (model._meta.app_label, model._meta.model_name)
        listing = client.get(reverse("admin:{}_{}_changelist".format(*info)), {"q": "tiny"})
        assert listing.status_code == 200, info
        first = model._default_manager.first()
        assert first is not None, f"no {info} row to show"
        detail = client.get(reverse("admin:{}_{}_change".format(*info), args=[first.pk]))
        assert detail.status_code == 200, info
        assert client.get(reverse("admin:{}_{}_add".format(*info))).status_code == (
            200 if model._meta.model_name == "user" else 403
        )


def test_admin_revoke_action_goes_through_the_audited_service(cast: dict[str, Any], client: Client) -> None:
    from apps.federation.models import EdgeDevice
    from apps.governance.models import AuditEvent

    root = cast["officer"].user
    root.is_staff = root.is_superuser = True
    root.save()
    client.force_login(root)
    device = cast["device"].device
    response = client.post(
        reverse("admin:federation_edgedevice_changelist"),
        {"action": "revoke_selected", "index": 0, "_selected_action": [device.pk]},
        follow=True,
    )
    assert response.status_code == 200
    assert EdgeDevice.objects.get(pk=device.pk).status == "revoked"
    event = AuditEvent.objects.get(verb="federation.device.revoked")
    assert (event.actor, event.data["reason"]) == (root, "revoked in the admin")
