"""evaluate_version_task's forgetting report: the candidate against its parent and the earlier champions of its line,
reusing stored scores on the same held-out sets and scoring the rest; and the gate's verdict in the approval note."""

import json
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from django.utils import timezone

from apps.federation.choices import TaskKind
from apps.federation.services import create_training_task, open_round
from apps.governance.actors import Actor
from apps.governance.models import ApprovalRequest, AuditEvent
from apps.registry.choices import CHAMPION_ALIAS, VersionStatus
from apps.registry.models import ForgettingReport, ModelVersion
from apps.registry.services import (
    DomainEvaluation,
    move_alias,
    record_version_evaluation,
    register_version,
    set_version_status,
)
from fednested.checkpoints import load_version, read_manifest, save_version
from fednested.data.tokenizer import load_tokenizer
from fednested.evaluation.forgetting import forgetting_report
from tests.federation_world import WorkerWorld, registry_specs
from workers.evaluation import evaluate_version_task

STORED_V1 = {"medical": 0.5, "recipes": 9.0}


def derived_version(world: WorkerWorld, parent: ModelVersion, version_id: str, *, shift: float) -> ModelVersion:
    """A real, loadable version: the parent's weights with every parameter shifted, saved and registered."""
    source = world.root / "versions" / parent.version_id
    model, _ = load_version(source, expected_version=parent.version_id)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(shift)
    directory = world.root / "versions" / version_id
    save_version(
        model, directory, version_id=version_id, parent_version=parent.version_id, tokenizer=load_tokenizer(source)
    )
    manifest = read_manifest(directory)
    return register_version(
        family=world.family,
        version_id=version_id,
        manifest=manifest.to_dict(),
        artifacts=registry_specs(manifest, directory),
        artifact_uri=f"artifacts://versions/{version_id}",
        actor=world.engineer,
        parent=parent,
    )


def run_evaluation(world: WorkerWorld, version_id: str, capture: Any) -> ApprovalRequest:
    # The round that produced the candidate trained the current champion, v2.
    window = open_round(
        base_version=ModelVersion.objects.get(version_id="v2"),
        buffer_size_k=2,
        deadline_at=timezone.now() + timedelta(hours=1),
        actor=world.engineer,
    )
    with capture(execute=False):
        task = create_training_task(
            kind=TaskKind.EVALUATION, actor=None, round_=window, params={"version_id": version_id}
        )
    return ApprovalRequest.objects.get(pk=evaluate_version_task(task.pk))


@pytest.fixture
def line(world: WorkerWorld) -> dict[str, ModelVersion]:
    """v1 (champion once, with stored scores) → v2 (champion now) → v3 (a candidate)."""
    v1 = world.base
    set_version_status(v1, VersionStatus.CHAMPION, actor=Actor.automation("tests"))
    # Stored scores of v1 on the same held-out sets: figures no model gives, so their reuse shows in the report.
    record_version_evaluation(
        v1,
        [DomainEvaluation(domain=d, loss=loss, perplexity=None, tokens=10, records=1) for d, loss in STORED_V1.items()],
        actor=Actor.automation("tests"),
        heldout="artifacts://heldout",
    )
    v2 = derived_version(world, v1, "v2", shift=0.001)
    set_version_status(v1, VersionStatus.ARCHIVED, actor=Actor.automation("tests"))
    set_version_status(v2, VersionStatus.CHAMPION, actor=Actor.automation("tests"))
    v3 = derived_version(world, v2, "v3", shift=0.002)
    return {"v1": v1, "v2": v2, "v3": v3}


def test_report_compares_with_every_earlier_champion_reusing_stored_scores(
    world: WorkerWorld, line: dict[str, ModelVersion], django_capture_on_commit_callbacks: Any
) -> None:
    request = run_evaluation(world, "v3", django_capture_on_commit_callbacks)
    row = ForgettingReport.objects.get(version=line["v3"])
    data = row.report
    assert data["versions"] == ["v1", "v2", "v3"]
    assert (data["parent"], data["champions"]) == ("v2", ["v1", "v2"])
    # v1's stored rows are reused; v2, the parent, was scored with v3 (and its losses match v3's parent column).
    assert data["sources"] == {"v1": "stored", "v2": "scored"}
    assert data["losses"]["v1"] == STORED_V1
    rows = {r.domain: r for r in line["v3"].evaluations.all()}
    assert data["losses"]["v2"] == {d: pytest.approx(r.parent_loss) for d, r in rows.items()}
    assert data["losses"]["v3"] == {d: pytest.approx(r.loss) for d, r in rows.items()}
    # The stored figures equal the pure function's on the same table.
    expected = forgetting_report(
        ["v1", "v2", "v3"],
        {"v1": STORED_V1, "v2": data["losses"]["v2"], "v3": data["losses"]["v3"]},
        parent="v2",
        champions=["v1", "v2"],
    )
    assert row.average_forgetting == pytest.approx(expected.average_forgetting)
    assert row.backward_transfer == pytest.approx(expected.backward_transfer)
    # recipes: v1's stored 9.0 is far above any real loss, so nothing is forgotten against it; BWT > 0 there.
    assert data["domains"]["recipes"]["backward_transfer"] == pytest.approx(9.0 - data["losses"]["v3"]["recipes"])
    assert "Average forgetting" in request.note
    event = AuditEvent.objects.get(verb="registry.version.forgetting_reported")
    assert event.data["compared_with"] == ["v1", "v2"]


def test_a_champion_whose_files_are_gone_is_left_out_and_named(
    world: WorkerWorld, line: dict[str, ModelVersion], django_capture_on_commit_callbacks: Any
) -> None:
    # No stored scores on these held-out sets, and no files to score it again.
    line["v1"].evaluations.all().delete()
    shutil.rmtree(world.root / "versions" / "v1")
    run_evaluation(world, "v3", django_capture_on_commit_callbacks)
    data = ForgettingReport.objects.get(version=line["v3"]).report
    assert data["versions"] == ["v2", "v3"]
    assert data["sources"]["v1"].startswith("unavailable: ")
    assert str(world.root) not in data["sources"]["v1"]


def test_lineage_depth_bounds_the_champions_compared(
    world: WorkerWorld, line: dict[str, ModelVersion], django_capture_on_commit_callbacks: Any, settings: Any
) -> None:
    settings.FEDNESTED_FORGETTING_LINEAGE_DEPTH = 1
    run_evaluation(world, "v3", django_capture_on_commit_callbacks)
    data = ForgettingReport.objects.get(version=line["v3"]).report
    assert (data["versions"], data["champions"]) == (["v2", "v3"], ["v2"])


def test_the_approval_note_says_when_the_gate_holds_the_candidate(
    world: WorkerWorld,
    line: dict[str, ModelVersion],
    django_capture_on_commit_callbacks: Any,
    settings: Any,
    tmp_path: Path,
) -> None:
    gate = tmp_path / "gate.json"
    gate.write_text(json.dumps({"protected": {"medical": {"max_increase_fraction": 0.5, "against": ["champion"]}}}))
    settings.FEDNESTED_PROMOTION_GATE = str(gate)
    # The champion alias on v1, whose stored medical loss (0.5) no real model of this size reaches.
    move_alias(name=CHAMPION_ALIAS, version=line["v1"], actor=Actor.automation("tests"))
    request = run_evaluation(world, "v3", django_capture_on_commit_callbacks)
    medical = line["v3"].evaluations.get(domain="medical")
    assert medical.loss > 0.75
    assert f"Held by the promotion gate: medical: loss {medical.loss:.4f} vs champion v1 0.5000 is +" in request.note
    # Without the gate, the same evaluation says nothing of it.
    settings.FEDNESTED_PROMOTION_GATE = ""
    ApprovalRequest.objects.all().delete()
    assert "promotion gate" not in run_evaluation(world, "v3", django_capture_on_commit_callbacks).note
