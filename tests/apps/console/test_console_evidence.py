"""The candidate page's evidence and the decision queue, through Django's test client: the lineage chart's figures,
the contributing updates' staleness and weights, the policy decisions on the task that made the version, the config
diff from the parent, and what waits for an officer, oldest first."""

import json
from typing import Any

from django.test import Client
from django.urls import reverse

from apps.console.evidence import config_diff, contributions, lineage_chart, policy_decisions
from apps.federation.choices import TaskKind
from apps.federation.models import TrainingTask
from apps.governance.actors import Actor
from apps.governance.audit import record_audit_event
from apps.governance.models import GateOverride
from apps.registry.models import ModelVersion
from apps.registry.services import DomainEvaluation, record_version_evaluation, register_version
from tests.conftest import Member, make_artifacts, make_manifest, make_update_row, write_artifacts

# What a core-update job records per dataset (workers/training.py, fednested.governance.ranger.Decision.to_json).
POLICY_DECISION = {
    "outcome": "allowed",
    "access": "read",
    "resource": {"path": "datasets/cooking-v2.jsonl"},
    "principal": {"user": "tier1", "groups": [], "roles": []},
    "policy": {"id": 7, "name": "dataset-policy"},
    "item": {"kind": "policyItems", "index": 0},
    "reason": "allowed by policy item 0",
}


def _signed_in(member: Member) -> Client:
    client = Client()
    assert member.user is not None
    client.force_login(member.user)
    return client


def _aggregated_child(scene: dict[str, Any]) -> tuple[ModelVersion, TrainingTask, list[str]]:
    """v3: two updates aggregated onto v2 (one stale by two promotions), its lineage as the aggregation records it,
    a wider expert config than its parent, and an evaluation on two of the three domains."""
    v2 = scene["v2"]
    task = TrainingTask.objects.create(kind=TaskKind.CORE_UPDATE, params={})
    fresh, stale = make_update_row(scene["device"], "v2"), make_update_row(scene["device"], "v1")
    artifacts = make_artifacts("v3")
    manifest = make_manifest("v3", "v2", artifacts) | {
        "architecture": {"family": "mixtral", "config": {"num_local_experts": 4}},
        "lineage": {
            "task": task.pk,
            "updates": [fresh.update_id, stale.update_id],
            "staleness": {fresh.update_id: 0, stale.update_id: 2},
            "aggregation": {
                "weights": {
                    fresh.update_id: {"0.0": 0.75, "0.1": 0.5},
                    stale.update_id: {"0.0": 0.25, "0.1": 0.0},
                }
            },
        },
    }
    v3 = register_version(
        family=v2.family,
        version_id="v3",
        manifest=manifest,
        artifacts=artifacts,
        artifact_uri=write_artifacts("v3", artifacts),
        parent=v2,
        contributing_updates=[fresh.update_id, stale.update_id],
        actor=Actor.automation("tests"),
    )
    record_version_evaluation(
        v3,
        [
            DomainEvaluation(domain="cooking", loss=2.2, perplexity=9.03, tokens=400, records=20),
            DomainEvaluation(domain="medical", loss=1.9, perplexity=6.69, tokens=400, records=20),
        ],
        actor=Actor.automation("worker:evaluation"),
        heldout="artifacts://heldout",
    )
    return v3, task, [fresh.update_id, stale.update_id]


def test_lineage_chart_has_each_domains_loss_along_the_line_with_gaps(scene: dict[str, Any]) -> None:
    v3, _, _ = _aggregated_child(scene)
    chart = lineage_chart(v3)
    assert chart is not None
    assert chart["labels"] == ["v1", "v2", "v3"]
    series = {item["domain"]: item["losses"] for item in chart["series"]}
    assert series == {"cooking": [3.0, 2.4, 2.2], "legal": [2.5, 2.75, None], "medical": [2.0, 2.001, 1.9]}


def test_contributions_carry_the_recorded_staleness_and_weights(scene: dict[str, Any]) -> None:
    v3, _, (fresh, stale) = _aggregated_child(scene)
    rows = {item.update_id: item for item in contributions(v3, [fresh, stale])}
    assert (rows[fresh].staleness, rows[fresh].experts_weighted, rows[fresh].total_weight) == (0, 2, 1.25)
    assert (rows[stale].staleness, rows[stale].experts_weighted, rows[stale].total_weight) == (2, 1, 0.25)
    assert rows[stale].mean_weight == 0.125
    assert rows[fresh].update is not None
    assert rows[fresh].update.device.client_id == "car-0001"


def test_policy_decisions_are_those_on_the_task_that_made_the_version(scene: dict[str, Any]) -> None:
    v3, task, _ = _aggregated_child(scene)
    assert policy_decisions(v3) == []
    other = TrainingTask.objects.create(kind=TaskKind.CORE_UPDATE, params={})
    record_audit_event(actor=Actor.automation("policy"), verb="governance.policy.decision", target=other, data={})
    decision = record_audit_event(
        actor=Actor.automation("policy"),
        verb="governance.policy.decision",
        target=task,
        data=POLICY_DECISION,
    )
    assert policy_decisions(v3) == [decision]
    # A core-update job names itself in the run lineage edge of the version it registers (workers/training.py).
    artifacts = make_artifacts("v4")
    v4 = register_version(
        family=v3.family,
        version_id="v4",
        manifest=make_manifest("v4", "v3", artifacts),
        artifacts=artifacts,
        artifact_uri=write_artifacts("v4", artifacts),
        parent=v3,
        runs=[f"core-update-task-{other.pk}"],
        actor=Actor.automation("tests"),
    )
    assert [event.object_id for event in policy_decisions(v4)] == [str(other.pk)]


def test_config_diff_lists_added_removed_and_changed_keys(scene: dict[str, Any]) -> None:
    v3, _, _ = _aggregated_child(scene)
    assert config_diff(scene["v1"]) is None
    assert config_diff(scene["v2"]) == []
    changes = {change.key: (change.change, change.before, change.after) for change in config_diff(v3) or []}
    assert changes == {
        "architecture": ("removed", '"MixtralForCausalLM"', ""),
        "architecture.config.num_local_experts": ("added", "", "4"),
        "architecture.family": ("added", "", '"mixtral"'),
    }


def test_the_candidate_page_shows_the_evidence(cast: dict[str, Member], scene: dict[str, Any]) -> None:
    _v3, task, (fresh, stale) = _aggregated_child(scene)
    record_audit_event(
        actor=Actor.automation("policy"),
        verb="governance.policy.decision",
        target=task,
        data=POLICY_DECISION,
    )
    response = _signed_in(cast["officer"]).get(reverse("console:version-detail", args=["v3"]))
    page = response.content.decode()
    data = json.loads(page.split('<script id="lineage-chart-data" type="application/json">')[1].split("</script>")[0])
    assert data["labels"] == ["v1", "v2", "v3"]
    assert 'data-testid="lineage-chart"' in page
    assert "console/vendor/chartjs/chart.umd.min.js" in page
    contributions_panel = page.split('data-testid="contributions"')[1].split("</section>")[0]
    assert fresh[:10] in contributions_panel
    assert stale[:10] in contributions_panel
    assert '<td class="num">1.2500</td>' in contributions_panel
    policy = page.split('data-testid="policy-decisions"')[1].split("</section>")[0]
    assert "governance.policy.decision" in policy
    assert "dataset-policy" in policy
    assert "<strong>allowed</strong> read path <code>datasets/cooking-v2.jsonl</code>" in policy
    diff = page.split('data-testid="config-diff"')[1].split("</section>")[0]
    assert "architecture.config.num_local_experts" in diff
    # A root version: no diff, and no policy decision recorded.
    root = _signed_in(cast["officer"]).get(reverse("console:version-detail", args=["v1"])).content.decode()
    assert "A root version: no parent to compare with." in root
    assert "No policy decision was recorded on the tasks that made this version." in root


def test_the_queue_lists_pending_requests_and_overrides_oldest_first(
    cast: dict[str, Member], scene: dict[str, Any]
) -> None:
    officer = cast["officer"].user
    assert officer is not None
    GateOverride.objects.create(
        request=scene["approval"], requested_by=officer, reason="legal within the budget we agreed", breaches=[]
    )
    page = _signed_in(cast["engineer"]).get(reverse("console:queue")).content.decode()
    approvals = page.split('id="queue-approvals-title"')[1].split("</section>")[0]
    assert f'data-approval="{scene["approval"].pk}"' in approvals
    assert "eric-engineer" in approvals
    assert "0\xa0minutes" in approvals  # its age
    overrides = page.split('id="queue-overrides-title"')[1].split("</section>")[0]
    assert "legal within the budget we agreed" in overrides
    assert "olivia-officer" in overrides
    assert 'aria-current="page">Queue' in page
