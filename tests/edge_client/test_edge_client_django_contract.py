"""Contract with the real control plane: the edge client enrolls through the Django REST API (one-time token,
reuse refused) and reads the champion from the real alias endpoint, over HTTP against pytest-django's live server.
(Payload upload, version files and heartbeats are specified in docs/api/device-protocol.md and exercised against
the protocol server in the other tests until the API serves them.)"""

from pathlib import Path
from typing import Any

import pytest
import yaml

from apps.federation.models import EdgeDevice
from apps.federation.services import issue_enrollment_token
from apps.registry.services import move_alias
from edge_client.enrollment import EnrollmentError, ensure_enrolled
from edge_client.sidecar import AuditLog, Sidecar, example_policy, load_policy
from edge_client.state import StateDir
from edge_client.transport.http import ControlPlaneClient


def _client(tmp_path: Path, url: str) -> tuple[ControlPlaneClient, Sidecar]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(example_policy(url)))
    sidecar = Sidecar(load_policy(policy), AuditLog(tmp_path / "audit.jsonl"))
    return ControlPlaneClient(url, sidecar, timeout_s=30), sidecar


@pytest.mark.django_db(transaction=True)
def test_client_enrolls_and_reads_the_champion_through_the_real_api(
    tmp_path: Path, live_server: Any, cast: Any, family_factory: Any, version_factory: Any
) -> None:
    engineer = cast["engineer"].user
    _, token = issue_enrollment_token(actor=engineer, note="edge contract")
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    api, sidecar = _client(tmp_path, live_server.url)
    with api:
        credential = ensure_enrolled(
            StateDir(tmp_path / "state"), api, sidecar, client_id="edge-contract-1", token_file=token_file
        )
        device = EdgeDevice.objects.get(client_id="edge-contract-1")
        assert device.status == "active"
        assert credential.client_id == "edge-contract-1"

        with pytest.raises(EnrollmentError, match=r"HTTP 400\): token: enrollment token .* was already used"):
            ensure_enrolled(
                StateDir(tmp_path / "other"), api, sidecar, client_id="edge-contract-2", token_file=token_file
            )
        assert not EdgeDevice.objects.filter(client_id="edge-contract-2").exists()

        api.api_token = credential.api_token
        version = version_factory(family_factory(), "v7")
        move_alias(name="champion", version=version, actor=engineer)
        info = api.champion()
    assert info.version_id == "v7"
    assert info.manifest_sha256 == version.manifest_sha256
    assert {ref.name: (ref.sha256, ref.bytes) for ref in info.files} == {
        artifact.file_name: (artifact.sha256, artifact.size_bytes) for artifact in version.artifacts.all()
    }
    assert all(ref.url.startswith(f"{live_server.url}/api/v1/versions/v7/files/") for ref in info.files)
