"""No API answer shows where the server keeps its files: every body of a realistic deployment (a round aggregated
into a candidate, evaluated, approved; updates accepted and rejected; failed jobs; refused registrations and
uploads; files the store lost), read with the token of each role, is free of the artifact store's path and the
checkout's."""

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.conf import settings
from rest_framework.test import APIClient

from apps.accounts.choices import Role
from apps.federation.choices import TaskKind, TaskStatus
from apps.federation.models import TrainingTask
from apps.federation.services import create_training_task
from apps.governance.models import ApprovalRequest
from apps.governance.services import approve_version
from fednested.checkpoints import CheckpointError
from fednested.messaging import encode
from tests.federation_world import WorkerWorld, as_message, enroll, payload_file
from workers.aggregation import aggregate_round_task
from workers.evaluation import evaluate_version_task
from workers.ingest.consumer import ingest_message

pytestmark = pytest.mark.django_db

# List endpoints, and the field whose value names a row in the detail URL.
COLLECTIONS = {
    "families": "name",
    "versions": "version_id",
    "aliases": "name",
    "devices": "client_id",
    "enrollment-tokens": "id",
    "rounds": "round_id",
    "tasks": "id",
    "updates": "update_id",
    "approvals": "id",
    "audit-events": "id",
}


def client(token: str) -> APIClient:
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    return api


@dataclass
class Deployment:
    """Each role's API token, and the answers to what a role did wrong: {role: [(what, status, body)]}."""

    tokens: dict[str, str]
    refusals: dict[str, list[tuple[str, int, bytes]]] = field(default_factory=dict)


@pytest.fixture
def deployment(
    world: WorkerWorld,
    make_update: Callable[..., Any],
    user_factory: Callable[..., Any],
    django_capture_on_commit_callbacks: Any,
) -> Deployment:
    officer = user_factory("olivia-officer", Role.OFFICER)
    engineer = user_factory("eric-engineer", Role.ENGINEER)
    admin = user_factory("ada-admin", Role.ADMIN)
    round_ = world.open_round(k=2)
    cars = [enroll(world, f"car-{index}") for index in range(3)]
    with django_capture_on_commit_callbacks(execute=False):
        for index, car in enumerate(cars[:2]):
            envelope, _ = make_update(car, seed=index, round_id=round_.round_id)
            assert ingest_message(as_message(encode(envelope), car.row.client_id)).status == "buffered"
        # Rejected on the bus: the payload changed after upload.
        tampered, _ = make_update(cars[2], seed=7)
        payload = payload_file(world, tampered)
        payload.write_bytes(payload.read_bytes()[::-1])
        assert ingest_message(as_message(encode(tampered), cars[2].row.client_id)).status == "rejected"
    aggregation = TrainingTask.objects.get(kind=TaskKind.EXPERT_AGGREGATION, round=round_)
    with django_capture_on_commit_callbacks(execute=False):
        candidate_id = aggregate_round_task(aggregation.pk)
    assert candidate_id is not None
    evaluation = TrainingTask.objects.get(kind=TaskKind.EVALUATION, params__version_id=candidate_id)
    request = ApprovalRequest.objects.get(pk=evaluate_version_task(evaluation.pk))
    approve_version(request, actor=officer[0])
    # Jobs that fail on the store (it changed after they were created): their errors are served with the task.
    with django_capture_on_commit_callbacks(execute=False):
        no_sets, broken_base = (
            create_training_task(kind=TaskKind.EVALUATION, actor=None, params={"version_id": "v1"}) for _ in range(2)
        )
    shutil.move(world.root / "heldout", world.root / "heldout-away")
    with pytest.raises(FileNotFoundError):
        evaluate_version_task(no_sets.pk)
    shutil.move(world.root / "heldout-away", world.root / "heldout")
    shutil.move(world.root / "versions" / "v1" / "config.json", world.root / "config.json.away")
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        evaluate_version_task(broken_base.pk)
    shutil.move(world.root / "config.json.away", world.root / "versions" / "v1" / "config.json")
    assert set(TrainingTask.objects.filter(status=TaskStatus.FAILED).values_list("pk", flat=True)) == {
        no_sets.pk,
        broken_base.pk,
    }

    tokens = {"device": cars[0].api_token, "engineer": engineer[1], "officer": officer[1], "admin": admin[1]}
    deployment = Deployment(tokens, {role: [] for role in tokens})
    device, engineer_api = client(tokens["device"]), client(tokens["engineer"])

    def note(role: str, what: str, response: Any) -> None:
        deployment.refusals[role].append((what, response.status_code, response.content))

    # A device: an envelope whose payload was never uploaded, an upload whose body is not what it declares.
    missing, _ = make_update(cars[0], seed=11)
    payload_file(world, missing).unlink()
    body = missing.model_dump(mode="json", by_alias=True)
    note("device", "update without its payload", device.post("/api/v1/updates/", body, format="json"))
    raw = b"not the declared bytes"
    upload = device.put(
        f"/api/v1/updates/{missing.update_id}/payload/",
        raw,
        content_type="application/octet-stream",
        HTTP_X_CONTENT_SHA256="0" * 64,
    )
    note("device", "upload with a wrong sha256", upload)
    # An engineer: registrations the store cannot back.
    v1 = engineer_api.get("/api/v1/versions/v1/").json()
    registration = {key: v1[key] for key in ("family", "manifest", "artifacts")} | {"version_id": "v9"}
    for what, changes in {
        "uri outside the store": {"artifact_uri": "file:///srv/elsewhere/v1"},
        "folder the store lacks": {"artifact_uri": "artifacts://versions/v404"},
        "file the store lacks": {"artifacts": [*v1["artifacts"], v1["artifacts"][0] | {"file_name": "extra.bin"}]},
        "sha256 that differs": {"artifacts": [v1["artifacts"][0] | {"sha256": hashlib.sha256(b"").hexdigest()}]},
    }.items():
        response = engineer_api.post(
            "/api/v1/versions/", registration | {"artifact_uri": v1["artifact_uri"]} | changes, format="json"
        )
        assert response.status_code == 400, response.content
        note("engineer", what, response)
    # The store lost a file of the champion.
    (world.root / "versions" / candidate_id / "gate.safetensors").unlink()
    note("device", "a lost file", device.get(f"/api/v1/versions/{candidate_id}/files/gate.safetensors/"))
    note("engineer", "a lost file", engineer_api.get(f"/api/v1/versions/{candidate_id}/files/gate.safetensors/"))
    return deployment


def walk(api: APIClient) -> Iterator[tuple[str, int, bytes]]:
    """(path, status, body) of every list page, every row's detail and each version's lineage, evaluations and
    files the role may read (and the refusals of what it may not)."""
    yield from ((path, *answer(api, path)) for path in ("/api/v1/me/", "/api/v1/schema/"))
    for collection, key in COLLECTIONS.items():
        page: str | None = f"/api/v1/{collection}/"
        rows: list[dict[str, Any]] = []
        while page is not None:
            status, body = answer(api, page)
            yield page, status, body
            listed = json.loads(body) if status == 200 else {}
            rows += listed.get("results", [])
            page = urlsplit(listed["next"])._replace(scheme="", netloc="").geturl() if listed.get("next") else None
        for row in rows:
            detail = f"/api/v1/{collection}/{row[key]}/"
            yield (detail, *answer(api, detail))
            if collection == "versions":
                for part in ("lineage/", "evaluations/"):
                    yield (detail + part, *answer(api, detail + part))
                for artifact in row["artifacts"]:
                    path = f"{detail}files/{artifact['file_name']}/"
                    yield (path, *answer(api, path))


def answer(api: APIClient, path: str) -> tuple[int, bytes]:
    response = api.get(path)
    content = b"".join(response.streaming_content) if response.streaming else response.content
    return response.status_code, content


def test_no_answer_shows_a_server_path(deployment: Deployment, world: WorkerWorld) -> None:
    root = world.root
    forbidden = {str(root), str(root.resolve()), str(root.parent), str(Path(settings.BASE_DIR).resolve())}
    seen = 0
    for role, token in deployment.tokens.items():
        answers = [(f"{role}: {what}", status, body) for what, status, body in deployment.refusals[role]]
        answers += [(f"{role}: GET {path}", status, body) for path, status, body in walk(client(token))]
        for what, status, body in answers:
            assert status < 500, f"{what}: {status} {body[:300]!r}"
            text = body.decode("utf-8", errors="replace")
            leaked = sorted(path for path in forbidden if path in text)
            assert not leaked, f"{what} ({status}) shows {leaked}: {text[:500]}"
            seen += 1
    # The walk read the deployment, not a handful of refusals: every role's answers, files and failures included.
    assert seen > 250
    engineer = client(deployment.tokens["engineer"])
    failed = engineer.get("/api/v1/tasks/", {"status": "failed"}).json()["results"]
    assert sorted(task["error"] for task in failed) == [
        "CheckpointError: artifacts://versions/v1/config.json: missing: listed in manifest.json (config) but not "
        "present",
        "FileNotFoundError: no held-out sets (<domain>.jsonl) in artifacts://heldout",
    ]
    [candidate] = engineer.get("/api/v1/versions/", {"status": "champion"}).json()["results"]
    evaluations = engineer.get(f"/api/v1/versions/{candidate['version_id']}/evaluations/").json()
    assert {row["heldout"] for row in evaluations} == {"artifacts://heldout"}
    assert candidate["artifact_uri"] == f"artifacts://versions/{candidate['version_id']}"
