"""DataHub lineage through the outbox: a registered version and a finished aggregation job become dataset → training
run → model version proposals, in a metadata file DataHub's own CLI accepts or at a GMS over REST; a GMS that
refuses delays them (retried until it takes them) or, for a proposal it can never accept, parks them with its
message. The approval, registration or job itself never waits for DataHub.

The REST tests run against a loopback HTTP recorder (http.server on 127.0.0.1): it is NOT a real DataHub GMS. It
records what the emitter posts and answers with the status a test sets; what arrives is parsed back into DataHub's
own aspect classes, so a proposal DataHub's schema would not take fails here.
"""

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from datahub.emitter.mcp import MetadataChangeProposalWrapper
from datahub.metadata.schema_classes import (
    DataProcessInstanceInputClass,
    DataProcessInstanceOutputClass,
    DataProcessInstancePropertiesClass,
    DataProcessInstanceRunEventClass,
    DatasetPropertiesClass,
    MLModelPropertiesClass,
    MLTrainingRunPropertiesClass,
    RunResultTypeClass,
)
from django.utils import timezone

from apps.accounts.choices import Role
from apps.accounts.models import User
from apps.federation.choices import TaskKind, UpdateStatus, task_run_ref
from apps.federation.models import TrainingTask, Update
from apps.federation.services import (
    create_training_task,
    finish_training_task,
    mark_updates_applied,
    start_training_task,
)
from apps.governance.actors import Actor
from apps.governance.models import AuditEvent
from apps.outbox.choices import OutboxKind
from apps.outbox.handlers import Delivery
from apps.outbox.models import OutboxEvent
from apps.registry.models import ModelFamily, ModelVersion
from apps.registry.services import register_version
from fednested.governance.datahub import dataset_urn, model_urn, run_urn
from tests.conftest import make_artifacts, make_device, make_manifest, make_update_row, write_artifacts
from workers.relay.relay import relay_batch

pytestmark = pytest.mark.django_db

ENV = "PROD"
# The references an update's dataset carries, and nothing else: no tensors, metrics or messages.
UPDATE_PROPERTIES = {
    "domain",
    "device",
    "examples",
    "payload_sha256",
    "payload_bytes",
    "base_version",
    "staleness",
    "status",
    "round",
}


@pytest.fixture(autouse=True)
def datahub_enabled(settings: Any) -> None:
    """On for these tests, whatever the suite's environment says (the default of a deployment: on)."""
    settings.FEDNESTED_DATAHUB_ENABLED = True


@dataclass
class World:
    """v1 (registered with a dataset and a bootstrap run), two devices in two domains whose updates an aggregation
    task applied into v2."""

    family: ModelFamily
    v1: ModelVersion
    v2: ModelVersion
    task: TrainingTask
    updates: list[Update]


@pytest.fixture
def world(
    user_factory: Callable[[str, str], tuple[User, str]],
    family_factory: Callable[..., ModelFamily],
    version_factory: Callable[..., ModelVersion],
    round_factory: Callable[..., Any],
) -> World:
    engineer = user_factory("eric-engineer", Role.ENGINEER)[0]
    family = family_factory()
    v1 = version_factory(family, "tiny-moe-v1", actor=engineer)
    round_ = round_factory(v1, actor=engineer)
    updates = [
        make_update_row(make_device(engineer, client_id, domain=domain)[0], v1.version_id, round_=round_)
        for client_id, domain in (("car-0001", "automotive"), ("ward-0001", "medical"))
    ]
    task = create_training_task(kind=TaskKind.EXPERT_AGGREGATION, actor=engineer, round_=round_)
    assert start_training_task(task.pk, actor=Actor.automation("worker:aggregation"))
    # What workers/aggregation.py does once the aggregate is written: register the candidate with the run and the
    # applied updates as its lineage, mark the updates applied, finish the task.
    artifacts = make_artifacts("tiny-moe-v2")
    v2 = register_version(
        family=family,
        version_id="tiny-moe-v2",
        manifest=make_manifest("tiny-moe-v2", v1.version_id, artifacts),
        artifacts=artifacts,
        artifact_uri=write_artifacts("tiny-moe-v2", artifacts),
        parent=v1,
        runs=[task_run_ref(task.kind, task.pk)],
        contributing_updates=[update.update_id for update in updates],
        actor=Actor.automation("worker:aggregation"),
    )
    mark_updates_applied(updates, version=v2, actor=Actor.automation("worker:aggregation"))
    assert finish_training_task(task.pk, actor=Actor.automation("worker:aggregation"))
    task.refresh_from_db()
    return World(family, v1, v2, task, [Update.objects.get(pk=update.pk) for update in updates])


def only_datahub_rows_pending() -> list[OutboxEvent]:
    """The DataHub rows the world's changes wrote. The other rows (the window's bus event, the task's Celery
    message, other evidence sinks) are not under test here: they are marked sent so the relay leaves them alone."""
    OutboxEvent.objects.exclude(kind=OutboxKind.DATAHUB).update(sent_at=timezone.now())
    return list(OutboxEvent.objects.filter(kind=OutboxKind.DATAHUB, sent_at=None).order_by("id"))


def latest_aspects(objects: list[dict[str, Any]]) -> dict[tuple[str, type], Any]:
    """(entity URN, aspect class) → the aspect, parsed back with DataHub's own classes; later proposals win."""
    aspects: dict[tuple[str, type], Any] = {}
    for obj in objects:
        wrapper = MetadataChangeProposalWrapper.from_obj(obj)
        assert isinstance(wrapper, MetadataChangeProposalWrapper), f"not a known DataHub aspect: {obj}"
        assert wrapper.entityUrn is not None
        assert wrapper.aspect is not None
        assert wrapper.aspect.validate(), f"{wrapper.aspectName} of {wrapper.entityUrn} fails DataHub's schema"
        aspects[(wrapper.entityUrn, type(wrapper.aspect))] = wrapper.aspect
    return aspects


def assert_dataset_run_model_lineage(aspects: dict[tuple[str, type], Any], world: World) -> None:
    """The aggregation run takes both updates (their domains as properties) and v1, and produces v2; v2 names the
    run; v1's training dataset feeds its bootstrap run, which produced v1."""
    run = run_urn(task_run_ref(world.task.kind, world.task.pk))
    v1 = model_urn(world.family.name, world.v1.version_id, ENV)
    v2 = model_urn(world.family.name, world.v2.version_id, ENV)
    update_urns = {dataset_urn(update.update_id, "update", ENV): update for update in world.updates}

    inputs = aspects[(run, DataProcessInstanceInputClass)]
    assert {edge.destinationUrn for edge in inputs.inputEdges} == {*update_urns, v1}
    outputs = aspects[(run, DataProcessInstanceOutputClass)]
    assert [edge.destinationUrn for edge in outputs.outputEdges] == [v2]
    assert aspects[(run, DataProcessInstancePropertiesClass)].customProperties["kind"] == TaskKind.EXPERT_AGGREGATION
    assert aspects[(run, DataProcessInstanceRunEventClass)].result.type == RunResultTypeClass.SUCCESS
    assert aspects[(v2, MLModelPropertiesClass)].trainingJobs == [run]
    assert aspects[(v2, MLModelPropertiesClass)].customProperties["parent"] == world.v1.version_id

    for urn, update in update_urns.items():
        properties = aspects[(urn, DatasetPropertiesClass)].customProperties
        assert set(properties) == UPDATE_PROPERTIES
        assert properties["domain"] == update.device.domain
        assert (properties["device"], properties["status"]) == (update.device.client_id, UpdateStatus.APPLIED)
        assert properties["payload_sha256"] == update.payload_sha256
    assert {aspects[(urn, DatasetPropertiesClass)].customProperties["domain"] for urn in update_urns} == {
        "automotive",
        "medical",
    }

    bootstrap = run_urn("run-tiny-moe-v1")
    dataset = dataset_urn("synthetic-automotive-v1", "dataset", ENV)
    assert [edge.destinationUrn for edge in aspects[(bootstrap, DataProcessInstanceInputClass)].inputEdges] == [dataset]
    assert [edge.destinationUrn for edge in aspects[(bootstrap, DataProcessInstanceOutputClass)].outputEdges] == [v1]
    assert aspects[(v1, MLModelPropertiesClass)].trainingJobs == [bootstrap]


def test_the_metadata_file_holds_dataset_run_model_lineage_and_datahub_check_accepts_it(
    world: World, settings: Any, tmp_path: Path
) -> None:
    settings.FEDNESTED_DATAHUB_GMS_URL = ""
    settings.FEDNESTED_DATAHUB_FILE = tmp_path / "datahub" / "metadata.json"
    rows = only_datahub_rows_pending()
    # v1 registered, v2 registered, the aggregation task finished: references only, the handler reads the rest.
    assert [row.payload.get("version_id") or row.payload.get("task_pk") for row in rows] == [
        world.v1.version_id,
        world.v2.version_id,
        world.task.pk,
    ]
    with Delivery() as delivery:
        stats = relay_batch(delivery)
    assert (stats.sent, stats.retried, stats.parked) == (3, 0, 0), stats.errors

    # DataHub's own CLI, offline: it parses every proposal of the appended file against its schema.
    datahub_cli = Path(sys.executable).with_name("datahub")
    checked = subprocess.run(
        [str(datahub_cli), "check", "metadata-file", str(settings.FEDNESTED_DATAHUB_FILE)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "DATAHUB_TELEMETRY_ENABLED": "false", "DATAHUB_SKIP_CONFIG": "true"},
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    objects = json.loads(settings.FEDNESTED_DATAHUB_FILE.read_text())
    assert f"{len(objects)} MCEs found - all valid" in checked.stdout
    assert_dataset_run_model_lineage(latest_aspects(objects), world)
    # Appended, never rewritten: the first delivery's proposals are still in the file after the later ones.
    assert objects[0]["entityUrn"] == dataset_urn("synthetic-automotive-v1", "dataset", ENV)


def test_an_unwritable_metadata_file_is_retried_and_nothing_is_lost(
    world: World, settings: Any, tmp_path: Path
) -> None:
    settings.FEDNESTED_DATAHUB_GMS_URL = ""
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the sink's folder should be")
    settings.FEDNESTED_DATAHUB_FILE = blocked / "metadata.json"
    rows = only_datahub_rows_pending()
    with Delivery() as delivery:
        stats = relay_batch(delivery)
    # The first row fails and the rest of the batch leaves DataHub alone; the rows wait for their retry.
    assert (stats.sent, stats.retried, stats.parked) == (0, 1, 0)
    first = OutboxEvent.objects.get(pk=rows[0].pk)
    assert first.attempts == 1
    assert "blocked" in first.last_error
    assert first.sent_at is None

    settings.FEDNESTED_DATAHUB_FILE = tmp_path / "metadata.json"
    later = timezone.now() + timedelta(hours=1)
    with Delivery() as delivery:
        assert relay_batch(delivery, now=lambda: later).sent == 3
    assert_dataset_run_model_lineage(latest_aspects(json.loads(settings.FEDNESTED_DATAHUB_FILE.read_text())), world)


@dataclass
class Recorder:
    """A loopback HTTP recorder standing in for a DataHub GMS (it is not one): it records each POST and answers with
    the next of `statuses` (200 once they run out)."""

    url: str
    statuses: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    posts: list[tuple[str, dict[str, str], dict[str, Any]]] = field(default_factory=list)


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    state = Recorder(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            state.posts.append((self.path, dict(self.headers), json.loads(body)))
            status, answer = state.statuses.pop(0) if state.statuses else (200, {"value": []})
            payload = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def received_proposals(recorder: Recorder) -> list[dict[str, Any]]:
    """Every proposal the recorder accepted (answered 2xx), from the emitter's Rest.li batch posts."""
    proposals = []
    for path, _headers, body in recorder.posts:
        assert path == "/aspects?action=ingestProposalBatch"
        proposals.extend(body["proposals"])
    return proposals


def test_the_rest_emitter_sends_proposals_that_parse_into_datahubs_aspect_classes(
    world: World, recorder: Recorder, settings: Any
) -> None:
    settings.FEDNESTED_DATAHUB_GMS_URL = recorder.url
    settings.FEDNESTED_DATAHUB_GMS_TOKEN = "gms-token-for-tests"
    only_datahub_rows_pending()
    with Delivery() as delivery:
        assert relay_batch(delivery).sent == 3
    assert len(recorder.posts) == 3
    assert {headers["Authorization"] for _, headers, _ in recorder.posts} == {"Bearer gms-token-for-tests"}
    assert_dataset_run_model_lineage(latest_aspects(received_proposals(recorder)), world)


def test_a_gms_answering_500_is_retried_and_the_row_delivered_once_it_answers_200(
    world: World, recorder: Recorder, settings: Any
) -> None:
    settings.FEDNESTED_DATAHUB_GMS_URL = recorder.url
    recorder.statuses = [(500, {"message": "GMS unavailable: Elasticsearch is down"})]
    rows = only_datahub_rows_pending()
    with Delivery() as delivery:
        stats = relay_batch(delivery)
    assert (stats.sent, stats.retried, stats.parked) == (0, 1, 0)
    first = OutboxEvent.objects.get(pk=rows[0].pk)
    assert first.sent_at is None
    assert first.parked_at is None
    assert "Elasticsearch is down" in first.last_error

    later = timezone.now() + timedelta(hours=1)
    with Delivery() as delivery:
        assert relay_batch(delivery, now=lambda: later).sent == 3
    assert OutboxEvent.objects.get(pk=rows[0].pk).attempts == 2
    # The refused post and the three accepted ones: the first accepted is the refused one again (the same entities
    # and aspects; only the emitter's observation time differs), and together they carry the whole lineage.
    refused, accepted = recorder.posts[0], recorder.posts[1:]
    assert len(accepted) == 3
    assert [(p["entityUrn"], p["aspectName"]) for p in refused[2]["proposals"]] == [
        (p["entityUrn"], p["aspectName"]) for p in accepted[0][2]["proposals"]
    ]
    recorder.posts = accepted
    assert_dataset_run_model_lineage(latest_aspects(received_proposals(recorder)), world)


def test_a_gms_answering_400_parks_the_row_with_the_servers_message(
    world: World, recorder: Recorder, settings: Any
) -> None:
    settings.FEDNESTED_DATAHUB_GMS_URL = recorder.url
    message = "Failed to validate record with class com.linkedin.ml.metadata.MLModelProperties"
    recorder.statuses = [(400, {"message": message, "status": 400})]
    rows = only_datahub_rows_pending()
    with Delivery() as delivery:
        stats = relay_batch(delivery)
    # Parked, and the rows behind it go on.
    assert (stats.sent, stats.retried, stats.parked) == (2, 0, 1)
    parked = OutboxEvent.objects.get(pk=rows[0].pk)
    assert parked.parked_at is not None
    assert parked.sent_at is None
    assert "HTTP 400" in parked.last_error
    assert message in parked.last_error


def test_with_datahub_disabled_no_change_writes_a_datahub_row(
    settings: Any, family_factory: Callable[..., ModelFamily], version_factory: Callable[..., ModelVersion]
) -> None:
    settings.FEDNESTED_DATAHUB_ENABLED = False
    version_factory(family_factory(), "tiny-moe-v1")
    assert not OutboxEvent.objects.filter(kind=OutboxKind.DATAHUB).exists()
    settings.FEDNESTED_DATAHUB_ENABLED = True
    v2 = version_factory(ModelFamily.objects.get(), "tiny-moe-v2")
    registered = AuditEvent.objects.get(verb="registry.version.registered", object_id=str(v2.pk))
    assert list(OutboxEvent.objects.filter(kind=OutboxKind.DATAHUB).values_list("payload", flat=True)) == [
        {"version_id": "tiny-moe-v2", "audit_event": registered.pk}
    ]


def test_a_name_that_cannot_stand_in_a_urn_is_digested_and_kept_readable_in_the_properties() -> None:
    from datahub.metadata.urns import DatasetUrn

    from fednested.governance.datahub import MAX_VALUE_CHARS, DatasetFacts, lineage_proposals

    odd = "clinic notes (ward 3), 2026" + "x" * 600
    proposals = lineage_proposals(datasets=[DatasetFacts(name=odd, kind="dataset")], env=ENV)
    urn = dataset_urn(odd, "dataset", ENV)
    # DataHub parses the URN back (a comma or a parenthesis in the name would have split its tuple).
    assert DatasetUrn.from_string(urn).name.startswith("datasets.sha-")
    aspects = latest_aspects([proposal.to_obj(simplified_structure=True) for proposal in proposals])
    name = aspects[(urn, DatasetPropertiesClass)].name
    assert len(name) == MAX_VALUE_CHARS
    assert name.startswith("clinic notes (ward 3), 2026")


def test_an_evaluation_run_is_a_downstream_job_of_the_version_it_scored_with_per_domain_losses(
    world: World, settings: Any, tmp_path: Path, artifact_store: Path
) -> None:
    from apps.registry.services import DomainEvaluation, record_version_evaluation

    settings.FEDNESTED_DATAHUB_GMS_URL = ""
    settings.FEDNESTED_DATAHUB_FILE = tmp_path / "metadata.json"
    (artifact_store / "heldout").mkdir(parents=True, exist_ok=True)
    (artifact_store / "heldout" / "automotive.jsonl").write_text('{"text": "held out"}\n')
    task = create_training_task(
        kind=TaskKind.EVALUATION, actor=None, round_=world.task.round, params={"version_id": world.v2.version_id}
    )
    assert start_training_task(task.pk, actor=Actor.automation("worker:evaluation"))
    record_version_evaluation(
        world.v2,
        [
            DomainEvaluation(domain="automotive", loss=1.25, perplexity=3.49, tokens=512, parent_loss=1.5),
            DomainEvaluation(domain="medical", loss=2.0, perplexity=7.39, tokens=512, parent_loss=1.75),
        ],
        actor=Actor.automation("worker:evaluation"),
    )
    assert finish_training_task(task.pk, actor=Actor.automation("worker:evaluation"))
    only_datahub_rows_pending()
    with Delivery() as delivery:
        assert relay_batch(delivery).sent == 4
    aspects = latest_aspects(json.loads(settings.FEDNESTED_DATAHUB_FILE.read_text()))
    evaluation = run_urn(task_run_ref(task.kind, task.pk))
    v2 = model_urn(world.family.name, world.v2.version_id, ENV)
    assert aspects[(v2, MLModelPropertiesClass)].downstreamJobs == [evaluation]
    assert [edge.destinationUrn for edge in aspects[(evaluation, DataProcessInstanceInputClass)].inputEdges] == [v2]
    metrics = {
        metric.name: float(metric.value)
        for metric in aspects[(evaluation, MLTrainingRunPropertiesClass)].trainingMetrics
    }
    assert metrics == {"loss.automotive": 1.25, "loss.medical": 2.0}


def test_an_approval_shows_in_datahub_as_the_versions_status_and_alias(
    world: World, settings: Any, tmp_path: Path, user_factory: Callable[[str, str], tuple[User, str]]
) -> None:
    from apps.governance.services import approve_version, request_approval

    settings.FEDNESTED_DATAHUB_GMS_URL = ""
    settings.FEDNESTED_DATAHUB_FILE = tmp_path / "metadata.json"
    engineer = User.objects.get(username="eric-engineer")
    officer = user_factory("olivia-officer", Role.OFFICER)[0]
    approve_version(request_approval(world.v1, actor=engineer), actor=officer, reason="baseline")
    rows = only_datahub_rows_pending()
    # The approval's status change and alias move each name v1 (after the world's three rows).
    assert [row.payload.get("version_id") for row in rows[3:]] == [world.v1.version_id] * (len(rows) - 3)
    assert len(rows) > 3
    with Delivery() as delivery:
        assert relay_batch(delivery).sent == len(rows)
    aspects = latest_aspects(json.loads(settings.FEDNESTED_DATAHUB_FILE.read_text()))
    properties = aspects[(model_urn(world.family.name, world.v1.version_id, ENV), MLModelPropertiesClass)]
    assert (properties.customProperties["status"], properties.customProperties["aliases"]) == ("champion", "champion")
    assert set(properties.tags or []) == {"status:champion", "alias:champion"}
