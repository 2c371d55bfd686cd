"""docs/api/device-protocol.md end to end against the real control plane: the edge client's HTTP transport enrolls,
pulls and verifies the champion, uploads an update payload and reports its version over the live REST API; the
envelope it would publish, signed as section 4 says, passes the ingest worker's checks of that very upload."""

import random
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.torch import save as save_safetensors

from apps.federation.models import EdgeDevice, StagedPayload, Update
from apps.federation.services import issue_enrollment_token
from apps.registry.services import move_alias
from edge_client.enrollment import ensure_enrolled
from edge_client.sidecar import AuditLog, Sidecar, example_policy, load_policy
from edge_client.snapshots import pull_champion
from edge_client.state import StateDir
from edge_client.transport.http import ControlPlaneClient, ControlPlaneRejected
from edge_client.transport.retry import RetryPolicy
from fednested.checkpoints import verify_version
from fednested.messaging import encode
from tests.federation_world import (
    LAYER0_DOWN,
    LAYER1_UP,
    Device,
    WorkerWorld,
    as_message,
    random_adapters,
    signed_envelope,
)
from workers.ingest.consumer import ingest_message

pytestmark = pytest.mark.slow
RETRY = RetryPolicy(initial_delay_s=0.0, max_delay_s=0.0, max_attempts=2)


@pytest.mark.django_db(transaction=True)
def test_device_protocol_round_trip_through_the_real_api(world: WorkerWorld, live_server: Any, tmp_path: Path) -> None:
    move_alias(name="champion", version=world.base, actor=world.engineer)
    _, token = issue_enrollment_token(actor=world.engineer, note="protocol round trip")
    (tmp_path / "token").write_text(token + "\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(example_policy(live_server.url)))
    sidecar = Sidecar(load_policy(policy), AuditLog(tmp_path / "audit.jsonl"))
    state = StateDir(tmp_path / "state")
    with ControlPlaneClient(live_server.url, sidecar, timeout_s=60) as api:
        credential = ensure_enrolled(state, api, sidecar, client_id="edge-proto-1", token_file=tmp_path / "token")
        api.api_token = credential.api_token

        # §2: the champion, its manifest (sha256 as registered) and every file, verified by the client's own checks.
        pulled = pull_champion(api, state, RETRY, rng=random.Random(0), sleep=lambda _: None)
        assert (pulled.version_id, pulled.manifest_sha256) == ("v1", world.base.manifest_sha256)
        verify_version(pulled.directory)
        for name in pulled.manifest.files:
            assert (pulled.directory / name).read_bytes() == (world.root / "versions" / "v1" / name).read_bytes()

        # §3: the claim check, idempotent on the update id.
        update_id = str(uuid.uuid4())
        adapters = random_adapters(world.shapes, {LAYER0_DOWN: [1], LAYER1_UP: [2]}, seed=5)
        body = save_safetensors({key: tensor.contiguous() for key, tensor in adapters.items()})
        receipt = api.upload_payload(update_id, body)
        assert receipt.created
        assert receipt.uri == f"artifacts://updates/edge-proto-1/{update_id}.safetensors"
        again = api.upload_payload(update_id, body)
        assert (again.created, again.uri, again.sha256) == (False, receipt.uri, receipt.sha256)
        other = random_adapters(world.shapes, {LAYER0_DOWN: [1]}, seed=6)
        with pytest.raises(ControlPlaneRejected) as conflict:
            api.upload_payload(update_id, save_safetensors({key: tensor.contiguous() for key, tensor in other.items()}))
        assert (conflict.value.status, conflict.value.code) == (409, "conflict")

        # §6: the version report.
        api.report_version("edge-proto-1", "v1")
        with pytest.raises(ControlPlaneRejected) as unknown:
            api.report_version("edge-proto-1", "v404")
        assert unknown.value.status == 400

    device = EdgeDevice.objects.get(client_id="edge-proto-1")
    assert device.current_version == world.base
    assert StagedPayload.objects.get(update_id=update_id).device == device

    # §4: the envelope the device publishes for that upload, signed with the key it enrolled with (made in its state
    # directory, never sent), is buffered by the worker.
    payload = {"uri": receipt.uri, "sha256": receipt.sha256, "size_bytes": receipt.bytes}
    sender = Device(row=device, api_token=credential.api_token, signing_key=state.device_key())
    envelope = signed_envelope(sender, payload, update_id=update_id)
    outcome = ingest_message(as_message(encode(envelope), "edge-proto-1"))
    assert (outcome.status, outcome.code) == ("buffered", None), outcome.message
    assert Update.objects.get(update_id=update_id).payload_uri == receipt.uri
