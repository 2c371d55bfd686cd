"""Contract with the real control plane: the edge client enrolls through the Django REST API (one-time token,
reuse refused) and reads the champion from the real alias endpoint, over HTTP against pytest-django's live server.
and then runs a whole device round (files, payload, envelope, heartbeat) against the real views and services."""

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from apps.federation.identity import device_public_keys
from apps.federation.models import EdgeDevice, StagedPayload
from apps.federation.services import issue_enrollment_token
from apps.registry.services import ArtifactSpec, create_model_family, move_alias, register_version
from apps.registry.storage import artifact_path
from edge_client.enrollment import EnrollmentError, ensure_enrolled
from edge_client.runner import RunOptions, run_client
from edge_client.sidecar import AuditLog, Sidecar, example_policy, load_policy
from edge_client.state import StateDir
from edge_client.transport.http import ControlPlaneClient
from fednested.messaging.topics import Topic


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

        with pytest.raises(EnrollmentError, match=r"HTTP 400\): the token was already used"):
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


def _register(directory: Path, engineer: Any) -> Any:
    """Register a saved fednested version as the registry expects it: every manifest file plus manifest.json."""
    manifest = json.loads((directory / "manifest.json").read_bytes())
    partitions = {"core": "core", "experts": "expert", "gate": "gate", "config": "config", "tokenizer": "tokenizer"}
    specs = [
        ArtifactSpec(
            file_name=name, sha256=entry["sha256"], size_bytes=entry["bytes"], partition=partitions[entry["partition"]]
        )
        for name, entry in sorted(manifest["files"].items())
    ]
    raw = (directory / "manifest.json").read_bytes()
    specs.append(ArtifactSpec("manifest.json", hashlib.sha256(raw).hexdigest(), len(raw), "manifest"))
    family = create_model_family(name="tiny-moe", architecture="mixtral", actor=engineer)
    return register_version(
        family=family,
        version_id=manifest["version_id"],
        manifest=manifest,
        artifacts=specs,
        artifact_uri=directory.resolve().as_uri(),
        actor=engineer,
    )


@pytest.mark.django_db(transaction=True)
def test_full_device_round_against_the_real_api(
    tmp_path: Path, live_server: Any, cast: Any, settings: Any, kit: Any, embedded_bus: Any
) -> None:
    """Enroll, download the champion's files, upload the payload, publish, report the version: all against the
    Django views and services, with the ingest worker's own key derivation verifying the signature."""
    settings.FEDNESTED_ARTIFACT_ROOT = tmp_path / "artifacts"
    version_dir = tmp_path / "artifacts" / "versions" / "v1"
    shutil.copytree(kit.assets.v1, version_dir)
    engineer = cast["engineer"].user
    version = _register(version_dir, engineer)
    move_alias(name="champion", version=version, actor=engineer)
    _, token = issue_enrollment_token(actor=engineer, note="edge contract")

    device_dir = tmp_path / "device"
    device_dir.mkdir()
    policy = device_dir / "policy.yaml"
    policy.write_text(yaml.safe_dump(example_policy(live_server.url)))
    token_file = device_dir / "token"
    token_file.write_text(token)
    files = {"policy": policy, "token": token_file, "state": device_dir / "state"}
    report = run_client(
        kit.settings(files, SimpleNamespace(url=live_server.url), embedded_bus, client_id="edge-contract-9"),
        RunOptions(rounds=1, until_version="v1", max_wait_s=180),
    )
    assert report.stopped_because == "goals_met"
    assert report.updates_failed == []

    device = EdgeDevice.objects.select_related("current_version").get(client_id="edge-contract-9")
    assert device.current_version is not None
    assert device.current_version.version_id == "v1"
    [update_id] = report.updates_delivered
    staged = StagedPayload.objects.get(update_id=update_id)
    stored = artifact_path(staged.uri, tmp_path / "artifacts").read_bytes()
    assert hashlib.sha256(stored).hexdigest() == staged.sha256

    [message] = kit.drain(embedded_bus, Topic.UPDATES)
    envelope = message.event
    assert str(envelope.update_id) == update_id
    assert envelope.payload.uri == staged.uri
    assert envelope.payload.sha256 == staged.sha256
    assert any(envelope.verify(key) for key in device_public_keys(device))
