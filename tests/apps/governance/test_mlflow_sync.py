"""The MLflow mirror (apps/governance/mlflow_sync.py), checked through MLflow's own client: against the embedded local
store (SQLite under a temporary folder) and against the real `mlflow server` scripts/services.sh runs on 127.0.0.1.

A job becomes a run with its params, per-domain metrics, manifest and lineage artifacts and linking tags; a version
becomes a registered model version; approving moves `champion`; an MLflow that is down during an approval holds
nothing up (the approval commits, the outbox row waits with the error) and catches up once it is back; delivering a
row twice makes nothing twice; the audit chain holds throughout.
"""

import json
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from mlflow import MlflowClient
from rest_framework.test import APIClient

from apps.accounts.choices import Role
from apps.accounts.models import User
from apps.federation.choices import TaskKind
from apps.federation.models import Round, TrainingTask
from apps.federation.services import finish_training_task, start_training_task
from apps.governance.actors import Actor
from apps.governance.chain import seal_pending, verify_chain
from apps.governance.mlflow_sync import (
    MODEL_VERSION_VERB,
    RUN_LOGGED_VERB,
    deliver_mlflow,
    job_run,
    mlflow_links,
)
from apps.governance.models import AuditEvent
from apps.governance.services import approve_version, request_approval
from apps.outbox.choices import OutboxKind
from apps.outbox.handlers import Delivery
from apps.outbox.models import OutboxEvent
from apps.registry.choices import LineageKind, VersionStatus
from apps.registry.models import LineageEdge, ModelFamily, ModelVersion
from apps.registry.services import DomainEvaluation, record_version_evaluation
from workers.relay.relay import relay_batch

pytestmark = pytest.mark.django_db

SERVER_VARIABLE = "FEDNESTED_MLFLOW_TEST_SERVER"


def server_uri() -> str:
    """The test server's URI from var/services/env.sh; fails (FEDNESTED_REQUIRE_SERVICES=1) or skips if unset."""
    uri = os.environ.get(SERVER_VARIABLE, "")
    if not uri:
        problem = f"{SERVER_VARIABLE} is not set (source var/services/env.sh after scripts/services.sh start)"
        if os.environ.get("FEDNESTED_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{problem}, but FEDNESTED_REQUIRE_SERVICES=1 says the services must be there")
        pytest.skip(problem)
    return uri


@pytest.fixture(scope="module")
def local_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One store for the module: creating MLflow's tables takes seconds. Each test has an experiment of its own.
    return tmp_path_factory.mktemp("mlflow-local")


@pytest.fixture(params=["local", "server"])
def mlflow_uri(request: pytest.FixtureRequest, settings: Any, local_store: Path, tmp_path: Path) -> str:
    if request.param == "local":
        uri = f"sqlite:///{local_store / 'mlflow.db'}"
        settings.FEDNESTED_MLFLOW_ARTIFACT_ROOT = local_store / "artifacts"
        settings.FEDNESTED_MLFLOW_UI_URL = ""
    else:
        uri = server_uri()
        settings.FEDNESTED_MLFLOW_UI_URL = uri
    settings.FEDNESTED_MLFLOW_TRACKING_URI = uri
    settings.FEDNESTED_MLFLOW_EXPERIMENT = f"fednested-test-{uuid.uuid4().hex[:12]}"
    settings.FEDNESTED_BUS = "embedded"
    settings.FEDNESTED_BUS_PATH = tmp_path / "bus.sqlite3"
    settings.FEDNESTED_AUDIT_ANCHOR_FILE = tmp_path / "anchors.jsonl"
    return uri


def client_of(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def mlflow_rows(**filters: Any) -> list[OutboxEvent]:
    return list(OutboxEvent.objects.filter(kind=OutboxKind.MLFLOW, **filters).order_by("pk"))


def relay_mlflow() -> Any:
    """Run the relay over what is due, the MLflow rows being what this module checks (the bus events and DataHub
    rows of the same changes are set aside as sent: their own tests deliver them)."""
    OutboxEvent.objects.exclude(kind=OutboxKind.MLFLOW).filter(sent_at=None).update(sent_at=timezone.now())
    with Delivery() as delivery:
        return relay_batch(delivery)


class Federation:
    """A family with a champion-to-be v1 and a candidate v2 that an aggregation made from two updates and an
    evaluation scored on two domains, both jobs finished through the task services (so audited, so mirrored)."""

    def __init__(self, family_factory: Callable[..., ModelFamily], version_factory: Callable[..., ModelVersion]):
        suffix = uuid.uuid4().hex[:8]
        self.family = family_factory(name=f"moe-{suffix}")
        self.v1 = version_factory(self.family, f"moe-{suffix}-v1")
        self.round = Round.objects.create(
            round_id=f"round-{suffix}",
            base_version=self.v1,
            series=f"round-{suffix}",
            buffer_size_k=2,
            deadline_at=timezone.now(),
            config={"max_staleness": 3, "rule": {"name": "trimmed_mean", "trim": 0.1}},
        )
        self.aggregation = TrainingTask.objects.create(
            kind=TaskKind.EXPERT_AGGREGATION, round=self.round, params={"trigger": "buffer_full"}
        )
        self.v2 = version_factory(self.family, f"moe-{suffix}-v2", parent=self.v1)
        self.updates = [f"upd-{suffix}-a", f"upd-{suffix}-b"]
        LineageEdge.objects.bulk_create(
            [LineageEdge(version=self.v2, kind=LineageKind.RUN, source_ref=f"aggregation-task-{self.aggregation.pk}")]
            + [LineageEdge(version=self.v2, kind=LineageKind.UPDATE, source_ref=ref) for ref in self.updates]
        )
        self.record = {
            "trigger": "buffer_full",
            "parent": self.v1.version_id,
            "updates": {
                self.updates[0]: {"client_id": "car-0001", "staleness": 0, "reliability": 1.0},
                self.updates[1]: {"client_id": "car-0002", "staleness": 2, "reliability": 0.5},
            },
            "rejected": [],
            "aggregation": {"weights": {self.updates[0]: 0.75, self.updates[1]: 0.25}},
        }
        Round.objects.filter(pk=self.round.pk).update(candidate=self.v2, record=self.record)
        assert start_training_task(self.aggregation.pk, actor=Actor.automation("worker:aggregation"))
        assert finish_training_task(self.aggregation.pk, actor=Actor.automation("worker:aggregation"))
        self.evaluation = TrainingTask.objects.create(
            kind=TaskKind.EVALUATION, round=self.round, params={"version_id": self.v2.version_id}
        )
        assert start_training_task(self.evaluation.pk, actor=Actor.automation("worker:evaluation"))
        record_version_evaluation(
            self.v2,
            [
                DomainEvaluation(
                    "automotive", 1.25, 3.4903, 400, records=10, parent_loss=1.5, parent_perplexity=4.4817
                ),
                DomainEvaluation("medical", 2.0, 7.3891, 300, records=8, parent_loss=1.9, parent_perplexity=6.6859),
            ],
            actor=Actor.automation("worker:evaluation"),
            heldout="heldout/",
        )
        assert finish_training_task(self.evaluation.pk, actor=Actor.automation("worker:evaluation"))


@pytest.fixture
def federation(
    mlflow_uri: str, family_factory: Callable[..., ModelFamily], version_factory: Callable[..., ModelVersion]
) -> Federation:
    return Federation(family_factory, version_factory)


@pytest.fixture
def people(user_factory: Callable[[str, str], tuple[User, str]]) -> dict[str, User]:
    return {
        "engineer": user_factory("eric-engineer", Role.ENGINEER)[0],
        "officer": user_factory("olivia-officer", Role.OFFICER)[0],
    }


def runs_by_name(client: MlflowClient, experiment_name: str) -> dict[str, Any]:
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None
    return {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}


def model_version_of(client: MlflowClient, version: ModelVersion) -> Any:
    found = client.search_model_versions(f"name = '{version.family.name}' and tags.version_id = '{version.version_id}'")
    assert len(found) == 1, f"{version.version_id}: {len(found)} MLflow model versions"
    return found[0]


def test_jobs_become_runs_and_versions_registered_model_versions(
    federation: Federation,
    mlflow_uri: str,
    settings: Any,
    tmp_path: Path,
    user_factory: Callable[[str, str], tuple[User, str]],
) -> None:
    fed = federation
    # The changes wrote their rows in their own transactions: two versions registered, two jobs finished.
    ops = sorted(
        (row.payload["op"], str(row.payload.get("version_id", row.payload.get("task_pk")))) for row in mlflow_rows()
    )
    assert ops == sorted(
        [
            ("log_job_run", str(fed.aggregation.pk)),
            ("log_job_run", str(fed.evaluation.pk)),
            ("sync_version", fed.v1.version_id),
            ("sync_version", fed.v2.version_id),
        ]
    )
    stats = relay_mlflow()
    assert (stats.sent, stats.retried, stats.parked) == (4, 0, 0), stats.errors

    client = client_of(mlflow_uri)
    runs = runs_by_name(client, settings.FEDNESTED_MLFLOW_EXPERIMENT)
    aggregation = runs[f"aggregation-task-{fed.aggregation.pk}"]
    evaluation = runs[f"evaluation-task-{fed.evaluation.pk}"]
    assert set(runs) == {aggregation.info.run_name, evaluation.info.run_name}
    # The aggregation: the task's and the round's settings as params, the record's figures as metrics, tags linking
    # the round, the version and the updates, the manifest, lineage and record as artifacts.
    assert aggregation.info.status == "FINISHED"
    params = aggregation.data.params
    assert params["params.trigger"] == "buffer_full"
    assert params["round.id"] == fed.round.round_id
    assert params["round.config.max_staleness"] == "3"
    assert params["round.config.rule.name"] == "trimmed_mean"
    metrics = aggregation.data.metrics
    assert metrics["updates/applied"] == 2
    assert metrics["updates/staleness_max"] == 2
    assert metrics["updates/staleness_mean"] == 1
    assert metrics[f"weight/{fed.updates[0]}"] == 0.75
    tags = aggregation.data.tags
    assert tags["fednested.round"] == fed.round.round_id
    assert tags["fednested.version"] == fed.v2.version_id
    assert tags["fednested.parent"] == fed.v1.version_id
    assert tags["fednested.updates"] == ",".join(fed.updates)
    listed = {item.path for item in client.list_artifacts(aggregation.info.run_id, f"versions/{fed.v2.version_id}")}
    assert listed == {f"versions/{fed.v2.version_id}/manifest.json", f"versions/{fed.v2.version_id}/lineage.json"}
    manifest = client.download_artifacts(
        aggregation.info.run_id, f"versions/{fed.v2.version_id}/manifest.json", str(tmp_path)
    )
    assert json.loads(Path(manifest).read_text()) == fed.v2.manifest
    lineage = json.loads(
        Path(
            client.download_artifacts(
                aggregation.info.run_id, f"versions/{fed.v2.version_id}/lineage.json", str(tmp_path)
            )
        ).read_text()
    )
    assert lineage["edges"]["update"] == fed.updates
    assert lineage["parent"] == fed.v1.version_id
    record = client.download_artifacts(aggregation.info.run_id, "aggregation/record.json", str(tmp_path))
    assert json.loads(Path(record).read_text()) == fed.record
    # The evaluation: the registry's per-domain scores, the parent's beside them.
    scores = evaluation.data.metrics
    assert (scores["automotive/loss"], scores["automotive/parent_loss"], scores["automotive/tokens"]) == (
        1.25,
        1.5,
        400,
    )
    assert (scores["medical/loss"], scores["medical/perplexity"]) == (2.0, 7.3891)
    assert evaluation.data.tags["fednested.version"] == fed.v2.version_id

    # Each version is a version of its family's registered model; `candidate` is on the newest candidate.
    for version in (fed.v1, fed.v2):
        mirrored = model_version_of(client, version)
        assert mirrored.source == version.artifact_uri
        assert mirrored.tags["manifest_sha256"] == version.manifest_sha256
        assert mirrored.tags["status"] == VersionStatus.CANDIDATE
    assert client.get_registered_model(fed.family.name).aliases == {
        "candidate": model_version_of(client, fed.v2).version
    }
    # The job that made v2 finished after v2 was registered: its run is tagged on the model version.
    assert model_version_of(client, fed.v2).tags["fednested.run"] == aggregation.info.run_id

    # The version page's links come from the audit events the mirror recorded.
    links = mlflow_links(fed.v2)
    assert {run["run_id"] for run in links["runs"]} == {aggregation.info.run_id, evaluation.info.run_id}
    assert links["model_version"]["version"] == str(model_version_of(client, fed.v2).version)
    if mlflow_uri.startswith("http"):
        assert links["runs"][0]["url"].startswith(f"{mlflow_uri}/#/experiments/")
    # …which the API's version and the console's version page show.
    officer, token = user_factory("olivia-officer", Role.OFFICER)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    answer = api.get(f"/api/v1/versions/{fed.v2.version_id}/")
    assert answer.status_code == 200, answer.content
    assert answer.json()["mlflow"] == links
    browser = Client()
    browser.force_login(officer)
    page = browser.get(reverse("console:version-detail", args=[fed.v2.version_id]))
    assert page.status_code == 200
    assert aggregation.info.run_id[:10] in page.content.decode()

    # Delivered twice (a relay that died before marking its rows sent): nothing new in MLflow or in the trail.
    events = AuditEvent.objects.filter(verb__in=(RUN_LOGGED_VERB, MODEL_VERSION_VERB)).count()
    with Delivery() as delivery:
        for row in mlflow_rows():
            deliver_mlflow(row, delivery)
    assert set(runs_by_name(client, settings.FEDNESTED_MLFLOW_EXPERIMENT)) == set(runs)
    for version in (fed.v1, fed.v2):
        model_version_of(client, version)
    assert AuditEvent.objects.filter(verb__in=(RUN_LOGGED_VERB, MODEL_VERSION_VERB)).count() == events
    seal_pending()
    report = verify_chain()
    assert report.ok, report.broken


def test_approvals_move_champion_and_candidate_as_the_registry_does(
    federation: Federation, mlflow_uri: str, people: dict[str, User]
) -> None:
    fed = federation
    client = client_of(mlflow_uri)
    approve_version(request_approval(fed.v1, actor=people["engineer"]), actor=people["officer"], reason="baseline")
    assert relay_mlflow().parked == 0
    model = client.get_registered_model(fed.family.name)
    assert model.aliases == {
        "champion": model_version_of(client, fed.v1).version,
        "candidate": model_version_of(client, fed.v2).version,
    }
    assert model_version_of(client, fed.v1).tags["status"] == VersionStatus.CHAMPION

    approve_version(request_approval(fed.v2, actor=people["engineer"]), actor=people["officer"], reason="better")
    stats = relay_mlflow()
    assert (stats.retried, stats.parked) == (0, 0), stats.errors
    # v2 is champion, v1 archived, and no candidate is left for `candidate` to point at.
    assert client.get_registered_model(fed.family.name).aliases == {
        "champion": model_version_of(client, fed.v2).version
    }
    assert model_version_of(client, fed.v1).tags["status"] == VersionStatus.ARCHIVED


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port nothing listens on (bound, never listened, so no one else gets it meanwhile)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        yield holder.getsockname()[1]


@pytest.mark.parametrize("mlflow_uri", ["server"], indirect=True)
def test_an_mlflow_server_down_during_an_approval_holds_nothing_up_and_catches_up(
    federation: Federation, mlflow_uri: str, people: dict[str, User], settings: Any, closed_port: int
) -> None:
    fed = federation
    assert relay_mlflow().sent == 4
    settings.FEDNESTED_MLFLOW_TRACKING_URI = f"http://127.0.0.1:{closed_port}"
    approve_version(request_approval(fed.v2, actor=people["engineer"]), actor=people["officer"], reason="better")
    fed.v2.refresh_from_db()
    assert fed.v2.status == VersionStatus.CHAMPION  # the approval committed, MLflow or not
    stats = relay_mlflow()
    assert (stats.sent, stats.retried) == (0, 1), stats.errors
    waiting = mlflow_rows(sent_at=None)
    assert waiting, "the approval's MLflow rows must wait for MLflow"
    assert all(row.parked_at is None for row in waiting)
    assert "onnection" in waiting[0].last_error, waiting[0].last_error
    assert waiting[0].attempts == 1

    # MLflow is back: the rows are due again (their backoff elapsed) and the relay delivers them.
    settings.FEDNESTED_MLFLOW_TRACKING_URI = mlflow_uri
    OutboxEvent.objects.filter(pk__in=[row.pk for row in waiting]).update(next_attempt_at=timezone.now())
    stats = relay_mlflow()
    assert (stats.sent, stats.retried, stats.parked) == (len(waiting), 0, 0), stats.errors
    client = client_of(mlflow_uri)
    # v2 is champion; v1 (never approved) is the family's newest candidate now.
    assert client.get_registered_model(fed.family.name).aliases == {
        "champion": model_version_of(client, fed.v2).version,
        "candidate": model_version_of(client, fed.v1).version,
    }
    assert model_version_of(client, fed.v2).tags["status"] == VersionStatus.CHAMPION
    assert not mlflow_rows(sent_at=None)
    seal_pending()
    report = verify_chain()
    assert report.ok, report.broken


def test_rows_that_can_never_succeed_are_parked_with_the_reason(mlflow_uri: str) -> None:
    from apps.outbox.services import enqueue

    enqueue(OutboxKind.MLFLOW, payload={"op": "sync_version", "version_id": "no-such-version"})
    enqueue(OutboxKind.MLFLOW, payload={"op": "drop_everything"})
    stats = relay_mlflow()
    assert (stats.sent, stats.parked) == (0, 2)
    errors = sorted(row.last_error for row in mlflow_rows())
    assert "version 'no-such-version' does not exist" in errors[1]
    assert "an MLFLOW payload is" in errors[0]


def test_the_mirror_off_writes_no_rows(
    settings: Any, family_factory: Callable[..., ModelFamily], version_factory: Callable[..., ModelVersion]
) -> None:
    settings.FEDNESTED_MLFLOW_TRACKING_URI = "off"
    version_factory(family_factory(name=f"moe-{uuid.uuid4().hex[:8]}"), f"off-{uuid.uuid4().hex[:8]}")
    assert mlflow_rows() == []


def test_a_core_update_run_carries_its_training_figures_and_datasets(
    family_factory: Callable[..., ModelFamily], version_factory: Callable[..., ModelVersion]
) -> None:
    family = family_factory(name=f"moe-{uuid.uuid4().hex[:8]}")
    champion = version_factory(family, f"{family.name}-v1")
    task = TrainingTask.objects.create(
        kind=TaskKind.CORE_UPDATE, params={"datasets": ["artifacts://datasets/code.jsonl"], "eta_core": 0.5}
    )
    candidate = version_factory(family, f"{family.name}-v2", parent=champion)
    LineageEdge.objects.create(version=candidate, kind=LineageKind.RUN, source_ref=f"core-update-task-{task.pk}")
    # The figures fednested/tier1/core_update.py writes into the version's manifest lineage.
    manifest = {
        **candidate.manifest,
        "lineage": {"kind": "core_update", "training": {"steps": 12, "loss_first": 3.5, "loss_last": 2.25}},
    }
    ModelVersion.objects.filter(pk=candidate.pk).update(manifest=manifest)
    run = job_run(task)
    assert run.name == f"core-update-task-{task.pk}"
    assert run.metrics == {"training/loss_first": 3.5, "training/loss_last": 2.25, "training/steps": 12.0}
    assert run.params["params.datasets"] == '["artifacts://datasets/code.jsonl"]'
    assert run.params["params.eta_core"] == "0.5"
    assert run.tags["fednested.version"] == candidate.version_id
    assert run.tags["fednested.parent"] == champion.version_id
    assert run.artifacts[f"versions/{candidate.version_id}/manifest.json"] == manifest
    assert [version.pk for version in run.made] == [candidate.pk]
