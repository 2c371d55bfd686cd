"""run_core_update_task end to end on the real database: a core_update task created through the API decides its
datasets by policy before reading them, trains the champion's line with 2 DeepSpeed ranks, registers the candidate
with its lineage and hands it to evaluation; every bad input fails the task (or its creation) with an error that
names what to fix, and leaves no version behind."""

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from django.core.exceptions import ValidationError
from rest_framework.test import APIClient

from apps.federation.choices import TaskKind, TaskStatus
from apps.federation.models import TrainingTask
from apps.federation.services import create_training_task
from apps.governance.models import AuditEvent
from apps.registry.choices import LineageKind
from apps.registry.models import ModelVersion
from apps.registry.services import move_alias, register_saved_version
from fednested.checkpoints import load_version, save_version
from fednested.data import CorpusConfig, generate_corpus, write_jsonl
from fednested.data.tokenizer import load_tokenizer
from fednested.tier1.plan import absolute_paths
from tests.federation_world import WorkerWorld
from workers.training import POLICY_DECISION_VERB, core_update_version_id, run_core_update_task

# Allow the service principal to read everything under /datasets, except one embargoed file (a deny item).
POLICIES = {
    "policies": [
        {
            "id": 7,
            "name": "tier1-datasets",
            "service": "fednested",
            "resources": {"dataset": {"values": ["/datasets"], "isRecursive": True}},
            "policyItems": [{"accesses": [{"type": "read", "isAllowed": True}], "users": ["svc-tier1"]}],
        },
        {
            "id": 41,
            "name": "embargo",
            "service": "fednested",
            "resources": {"dataset": {"values": ["/datasets/embargoed/*"]}},
            "denyPolicyItems": [{"accesses": [{"type": "read", "isAllowed": True}], "groups": ["public"]}],
        },
    ]
}
# Small enough that one 2-rank launch takes seconds on this machine.
TRAINING = {"seq_len": 64, "rows_per_batch": 2, "grad_accum_steps": 1, "max_steps": 2, "ranks": 2, "zero_stage": 2}
CORE_UPDATE = {"accelerator": "cpu", "eta_core": 1.0, "eta_t1": 1.0, "eta_t2": 1.0, "timeout_s": 300.0}


@pytest.fixture
def tier1(world: WorkerWorld, settings: Any, tmp_path: Path) -> WorkerWorld:
    """The world's v1 as champion, a Tier-1 dataset (with two malformed lines) in the store, and the policies."""
    move_alias(name="champion", version=world.base, actor=world.engineer)
    corpus = generate_corpus(CorpusConfig(seed=5, train_samples=8, heldout_samples=0))
    records = [record for domain in corpus.values() for record in domain.records("train")]
    data = world.root / "datasets" / "tier1.jsonl"
    write_jsonl(data, records)
    with data.open("a", encoding="utf-8") as stream:
        stream.write("{not json\n")
        stream.write('{"unknown_field": 1}\n')
    policies = tmp_path / "policies.json"
    policies.write_text(json.dumps(POLICIES), encoding="utf-8")
    settings.FEDNESTED_DATASET_POLICIES = str(policies)
    settings.FEDNESTED_TIER1_PRINCIPAL = "svc-tier1"
    return world


def promote_edge_aggregate(world: WorkerWorld) -> ModelVersion:
    """agg1: v1 with every expert moved by a known amount, registered and made champion (as an approved aggregate)."""
    v1 = world.root / "versions" / "v1"
    model, _ = load_version(v1)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".mlp.experts." in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 1e-3)
    directory = world.root / "versions" / "agg1"
    save_version(model, directory, version_id="agg1", parent_version="v1", tokenizer=load_tokenizer(v1))
    aggregate = register_saved_version(directory, family=world.family, actor=world.engineer, parent=world.base)
    move_alias(name="champion", version=aggregate, actor=world.engineer)
    return aggregate


def create(world: WorkerWorld, capture: Any, **params: Any) -> TrainingTask:
    """A core_update task created (as an engineer would) but not started: the test runs its worker itself."""
    body = {"datasets": ["datasets/tier1.jsonl"], "training": TRAINING, "core_update": CORE_UPDATE, **params}
    with capture(execute=False):
        return create_training_task(kind=TaskKind.CORE_UPDATE, actor=world.engineer, params=body)


def run_failing(task: TrainingTask) -> TrainingTask:
    with pytest.raises(Exception):  # noqa: B017, PT011 (the task re-raises whatever failed it; its row says what)
        run_core_update_task(task.pk)
    task.refresh_from_db()
    assert task.status == TaskStatus.FAILED
    return task


def leftovers(world: WorkerWorld) -> list[str]:
    """Anything of a core update in the store: staged or final version folders, run folders."""
    names = [path.name for path in (world.root / "versions").iterdir() if "core-task" in path.name]
    runs = world.root / "runs" / "core-updates"
    return names + ([path.name for path in runs.iterdir()] if runs.exists() else [])


@pytest.mark.slow
def test_a_core_update_task_registers_a_candidate_with_its_lineage_and_evaluation(
    tier1: WorkerWorld, django_capture_on_commit_callbacks: Any
) -> None:
    world = tier1
    aggregate = promote_edge_aggregate(world)
    api = APIClient()
    api.force_authenticate(world.engineer)
    with django_capture_on_commit_callbacks(execute=False):
        response = api.post(
            "/api/v1/tasks/",
            {
                "kind": "core_update",
                "params": {
                    "datasets": ["artifacts://datasets/tier1.jsonl"],
                    "training": TRAINING,
                    "core_update": CORE_UPDATE,
                },
            },
            format="json",
        )
    assert response.status_code == 201, response.content
    task_pk = response.json()["id"]

    assert run_core_update_task(task_pk) == f"core-task-{task_pk}"
    task = TrainingTask.objects.get(pk=task_pk)
    assert (task.status, task.error) == (TaskStatus.SUCCEEDED, "")
    candidate = ModelVersion.objects.get(version_id=core_update_version_id(task))
    # It replaces the champion of the day (agg1), trained from the line's last core update (here its first version).
    assert candidate.parent == aggregate
    lineage = candidate.manifest["lineage"]
    assert lineage["kind"] == "core_update"
    assert lineage["champion"]["version_id"] == "v1"
    assert [entry["version_id"] for entry in lineage["edge_aggregates"]] == ["agg1"]
    (dataset,) = lineage["datasets"]
    assert dataset["bad_lines"] == 2  # malformed lines counted; the job went on with the rest
    data = (world.root / "datasets" / "tier1.jsonl").read_bytes()
    assert dataset["records"] == data.count(b"\n") - 2
    assert dataset["sha256"] == hashlib.sha256(data).hexdigest()
    assert lineage["deepspeed"]["ranks"] == 2
    assert lineage["deepspeed"]["config"]["zero_optimization"]["stage"] == 2
    assert lineage["training"]["steps"] == 2
    # The manifest travels to devices, MLflow and DataHub: files by their place in the store, no server path.
    assert dataset["path"] == "artifacts://datasets/tier1.jsonl"
    assert lineage["champion"]["path"] == "artifacts://versions/v1"
    assert lineage["edge_base"] == "artifacts://versions/v1"
    assert [entry["path"] for entry in lineage["edge_aggregates"]] == ["artifacts://versions/agg1"]
    assert absolute_paths(candidate.manifest) == []
    assert str(world.root.resolve()) not in json.dumps(candidate.manifest)
    edges = dict(candidate.lineage_edges.values_list("kind", "source_ref"))
    assert edges[LineageKind.DATASET] == f"artifacts://datasets/tier1.jsonl#sha256={dataset['sha256']}"
    assert edges[LineageKind.RUN] == f"core-update-task-{task_pk}"
    # Exactly like an edge aggregate: an evaluation task for the candidate.
    evaluation = TrainingTask.objects.get(kind=TaskKind.EVALUATION)
    assert evaluation.params == {"version_id": candidate.version_id}
    # The policy decision: recorded on the task, audited, and shown through the API.
    decisions = task.policy_decisions
    assert [(d["outcome"], d["resource"], d["policy"]) for d in decisions] == [
        ("allowed", {"dataset": "/datasets/tier1.jsonl"}, {"id": 7, "name": "tier1-datasets"})
    ]
    audited = AuditEvent.objects.filter(verb=POLICY_DECISION_VERB, object_id=str(task_pk))
    assert [event.data["outcome"] for event in audited] == ["allowed"]
    assert api.get(f"/api/v1/tasks/{task_pk}/").json()["policy_decisions"] == decisions
    # No staging folder left; the run's folder (logs, plan, trained delta) is kept under runs/.
    assert sorted(path.name for path in (world.root / "versions").iterdir()) == ["agg1", candidate.version_id, "v1"]
    assert (world.root / "runs" / "core-updates" / candidate.version_id / "rank-1.log").is_file()


@pytest.mark.slow
def test_a_rank_that_crashes_fails_the_task_with_its_log_and_leaves_no_version(
    tier1: WorkerWorld, django_capture_on_commit_callbacks: Any
) -> None:
    task = create(
        tier1,
        django_capture_on_commit_callbacks,
        core_update={**CORE_UPDATE, "fault_injection": {"rank": 1, "after_step": 1}},
    )
    task = run_failing(task)
    assert "rank 1 crashed" in task.error
    assert "InjectedFault" in task.error
    assert "Traceback" in task.error  # the rank's log tail
    assert not ModelVersion.objects.filter(version_id=core_update_version_id(task)).exists()
    assert leftovers(tier1) == []
    assert not TrainingTask.objects.filter(kind=TaskKind.EVALUATION).exists()


def test_a_denied_dataset_fails_the_task_before_reading_naming_the_policy(
    tier1: WorkerWorld, django_capture_on_commit_callbacks: Any
) -> None:
    # The embargoed file does not even exist: had the job looked at it, it would fail on that instead.
    task = create(
        tier1, django_capture_on_commit_callbacks, datasets=["datasets/tier1.jsonl", "datasets/embargoed/x.jsonl"]
    )
    task = run_failing(task)
    assert "dataset access denied before reading" in task.error
    assert "/datasets/embargoed/x.jsonl: policy 41 'embargo' denyPolicyItems[0] denies read" in task.error
    assert "does not exist" not in task.error
    assert [(d["outcome"], d["policy"]["name"], d["item"]) for d in task.policy_decisions] == [
        ("allowed", "tier1-datasets", {"kind": "policyItems", "index": 0}),
        ("denied", "embargo", {"kind": "denyPolicyItems", "index": 0}),
    ]
    audited = AuditEvent.objects.filter(verb=POLICY_DECISION_VERB, object_id=str(task.pk)).order_by("id")
    assert [event.data["outcome"] for event in audited] == ["allowed", "denied"]
    assert leftovers(tier1) == []


def test_missing_and_corrupt_datasets_fail_the_task_naming_the_file(
    tier1: WorkerWorld, django_capture_on_commit_callbacks: Any
) -> None:
    missing = run_failing(create(tier1, django_capture_on_commit_callbacks, datasets=["datasets/absent.jsonl"]))
    assert "refused before training: dataset artifacts://datasets/absent.jsonl does not exist" in missing.error
    (tier1.root / "datasets" / "corrupt.jsonl").write_bytes(b"\x00\xff\xfe garbage\n{broken\n")
    corrupt = run_failing(create(tier1, django_capture_on_commit_callbacks, datasets=["datasets/corrupt.jsonl"]))
    assert "corrupt.jsonl is corrupt: no valid record in 2 line(s), 2 malformed" in corrupt.error
    assert leftovers(tier1) == []


def test_a_deepspeed_config_that_cannot_work_fails_before_training(
    tier1: WorkerWorld, django_capture_on_commit_callbacks: Any
) -> None:
    extra = tier1.root / "deepspeed" / "stage3.json"
    extra.parent.mkdir()
    extra.write_text(json.dumps({"zero_optimization": {"stage": 3}}), encoding="utf-8")
    task = create(
        tier1, django_capture_on_commit_callbacks, training={**TRAINING, "deepspeed_config": "deepspeed/stage3.json"}
    )
    task = run_failing(task)
    assert "refused before training" in task.error
    assert "ZeRO stage 3 is not supported" in task.error
    assert not (tier1.root / "runs").exists()  # no rank was launched


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "not JSON: Expecting property name enclosed in double quotes at line 1 column 2"),
        (
            json.dumps([{"name": "x", "resources": {"dataset": {"values": ["/d"]}}, "conditions": [{"type": "ip"}]}]),
            "conditions are not supported",
        ),
    ],
)
def test_a_policy_file_that_is_not_valid_ranger_json_fails_the_task(
    tier1: WorkerWorld, django_capture_on_commit_callbacks: Any, settings: Any, content: str, expected: str
) -> None:
    Path(settings.FEDNESTED_DATASET_POLICIES).write_text(content, encoding="utf-8")
    task = run_failing(create(tier1, django_capture_on_commit_callbacks))
    assert "FEDNESTED_DATASET_POLICIES is not valid Ranger policy JSON" in task.error
    assert expected in task.error
    assert task.policy_decisions == []


def test_bad_params_are_refused_at_creation_naming_the_param(tier1: WorkerWorld, settings: Any) -> None:
    api = APIClient()
    api.force_authenticate(tier1.engineer)

    def refused(params: Any) -> dict[str, Any]:
        response = api.post("/api/v1/tasks/", {"kind": "core_update", "params": params}, format="json")
        assert response.status_code == 400, response.content
        body: dict[str, Any] = response.json()
        return body

    body = refused({"datasets": [], "training": {"max_steps": 0}})
    problems = " | ".join(body["params"])
    assert "datasets: List should have at least 1 item" in problems
    assert "training.max_steps: Input should be greater than or equal to 1" in problems
    body = refused({"datasets": ["../outside.jsonl"], "core_update": {"champion_dir": "/elsewhere"}})
    problems = " | ".join(body["params"])
    assert "datasets.0: '../outside.jsonl' points outside the artifact store" in problems
    assert "core_update.champion_dir: set by the job, not by a task" in problems
    settings.FEDNESTED_DATASET_POLICIES = ""
    body = refused({"datasets": ["datasets/tier1.jsonl"]})
    assert "deny by default" in " ".join(body["kind"])
    assert not TrainingTask.objects.exists()
    settings.FEDNESTED_DATASET_POLICIES = "policies.json"
    round_ = tier1.open_round()
    with pytest.raises(ValidationError, match="a core_update task belongs to no round"):
        create_training_task(
            kind=TaskKind.CORE_UPDATE,
            actor=tier1.engineer,
            params={"datasets": ["datasets/tier1.jsonl"]},
            round_=round_,
        )
