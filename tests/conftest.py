"""Shared fixtures: the fixed cast of users (officer, engineer, device, outsider, anonymous) and explicit factories.

Every factory builds rows through the real services, so fixtures obey the same rules (and write the same audit
rows) as production code.
"""

import hashlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from django.core.cache import cache
from django.test import override_settings
from django.utils import timezone
from rest_framework.test import APIClient

from apps.accounts.choices import Role
from apps.accounts.models import User
from apps.accounts.services import create_user_with_role, issue_api_token
from apps.federation.choices import UpdateStatus
from apps.federation.models import EdgeDevice, Round, Update
from apps.federation.services import enroll_device, issue_enrollment_token, open_round
from apps.governance.actors import Actor
from apps.registry.choices import ArtifactPartition
from apps.registry.models import ModelFamily, ModelVersion
from apps.registry.services import ArtifactSpec, create_model_family, register_version
from apps.registry.storage import artifact_root
from tests.device_keys import device_csr

CAST = ("officer", "engineer", "device", "outsider", "anonymous")


@dataclass
class Member:
    """One member of the cast: the user (None for anonymous) and an API client authenticated as that user."""

    name: str
    user: User | None
    token: str
    client: APIClient
    device: EdgeDevice | None = None


def _client(token: str) -> APIClient:
    client = APIClient()
    if token:
        client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    return client


def make_user(username: str, role: str) -> tuple[User, str]:
    user = create_user_with_role(username=username, role=role, actor=Actor.automation("tests"))
    _, token = issue_api_token(user, actor=Actor.automation("tests"), name="tests")
    return user, token


def make_device(engineer: User, client_id: str, *, domain: str = "automotive") -> tuple[EdgeDevice, str]:
    _, enrollment_token = issue_enrollment_token(actor=engineer, note=f"for {client_id}")
    enrollment = enroll_device(
        token=enrollment_token,
        client_id=client_id,
        csr=device_csr(client_id),
        display_name=client_id,
        domain=domain,
    )
    return enrollment.device, enrollment.api_token


@pytest.fixture(scope="session", autouse=True)
def control_topics_exist() -> None:
    """On Kafka (make test), create the control plane's topics once, as a deployment does before it starts.

    The control plane publishes RoundStart and ModelAvailable on commit and refuses to auto-create topics (their
    partitions and retention come from config); tests that need their own topics use their own prefix.
    """
    from django.conf import settings

    from apps.federation.events import bus_settings
    from fednested.messaging import KafkaBusSettings, bootstrap_topics

    bus = bus_settings()
    if settings.FEDNESTED_BUS == "kafka" and isinstance(bus, KafkaBusSettings):
        bootstrap_topics(bus)


@pytest.fixture(autouse=True)
def artifact_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Each test's own empty artifact store (FEDNESTED_ARTIFACT_ROOT): nothing lands in var/artifacts and no test sees
    another's files. A test or fixture that needs a store of its own points the setting elsewhere.

    Through override_settings rather than pytest-django's `settings` fixture: some tests use `settings` as the name of
    their own parameter (bus or adapter settings), which would shadow the fixture."""
    root = tmp_path_factory.mktemp("artifacts")
    # The audit chain's anchors too: each test database starts a chain of its own, and anchors of another test's chain
    # would make verify_chain report a rewritten chain.
    anchors = tmp_path_factory.mktemp("audit") / "anchors.jsonl"
    with override_settings(FEDNESTED_ARTIFACT_ROOT=root, FEDNESTED_AUDIT_ANCHOR_FILE=anchors):
        yield root


@pytest.fixture(autouse=True)
def fresh_refusal_windows() -> None:
    """Django's cache (local memory in tests, one per process) holds the refused-access windows and counts
    (apps.accounts.refusals): each test starts without another test's, so its refusals are recorded as its own."""
    cache.clear()


@pytest.fixture
def cast(db: Any) -> dict[str, Member]:
    """The fixed cast, each with an authenticated API client; the device is enrolled through the real service."""
    officer, officer_token = make_user("olivia-officer", Role.OFFICER)
    engineer, engineer_token = make_user("eric-engineer", Role.ENGINEER)
    # An outsider is an authenticated user with no role at all.
    outsider, outsider_token = make_user("oscar-outsider", "")
    device, device_token = make_device(engineer, "car-0001")
    return {
        "officer": Member("officer", officer, officer_token, _client(officer_token)),
        "engineer": Member("engineer", engineer, engineer_token, _client(engineer_token)),
        "device": Member("device", device.user, device_token, _client(device_token), device=device),
        "outsider": Member("outsider", outsider, outsider_token, _client(outsider_token)),
        "anonymous": Member("anonymous", None, "", _client("")),
    }


def artifact_bytes(version_id: str, file_name: str) -> bytes:
    """Deterministic stand-in file contents, so sha256 and sizes in the registry are real digests of real bytes."""
    return f"{version_id}/{file_name}".encode() * 16


def make_artifacts(version_id: str) -> list[ArtifactSpec]:
    files = [
        ("core.safetensors", ArtifactPartition.CORE, None, None),
        ("gate.safetensors", ArtifactPartition.GATE, None, None),
        ("experts/layer0_expert0.safetensors", ArtifactPartition.EXPERT, 0, 0),
        ("experts/layer0_expert1.safetensors", ArtifactPartition.EXPERT, 0, 1),
        ("config.json", ArtifactPartition.CONFIG, None, None),
    ]
    specs = []
    for name, partition, layer, expert in files:
        content = artifact_bytes(version_id, name)
        specs.append(
            ArtifactSpec(
                file_name=name,
                sha256=hashlib.sha256(content).hexdigest(),
                size_bytes=len(content),
                partition=partition,
                layer=layer,
                expert_index=expert,
            )
        )
    return specs


def write_artifacts(version_id: str, artifacts: list[ArtifactSpec]) -> str:
    """Lay the version's files out in the artifact store, as registration requires; returns its artifact URI."""
    folder = artifact_root() / "versions" / version_id
    for spec in artifacts:
        path = folder / spec.file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(artifact_bytes(version_id, spec.file_name))
    return f"artifacts://versions/{version_id}"


def make_manifest(version_id: str, parent: str | None, artifacts: list[ArtifactSpec]) -> dict[str, Any]:
    return {
        "version_id": version_id,
        "architecture": "MixtralForCausalLM",
        "parent": parent,
        "files": {spec.file_name: {"sha256": spec.sha256, "bytes": spec.size_bytes} for spec in artifacts},
        "partition_map": {"core": ["model.embed_tokens"], "gate": ["model.layers.0.mlp.gate"]},
    }


@pytest.fixture
def family_factory(db: Any) -> Callable[..., ModelFamily]:
    def build(name: str = "tiny-moe", actor: User | None = None) -> ModelFamily:
        return create_model_family(
            name=name, architecture="MixtralForCausalLM", config={"num_local_experts": 2}, actor=actor
        )

    return build


@pytest.fixture
def version_factory(db: Any) -> Callable[..., ModelVersion]:
    def build(
        family: ModelFamily, version_id: str, *, parent: ModelVersion | None = None, actor: User | None = None
    ) -> ModelVersion:
        artifacts = make_artifacts(version_id)
        return register_version(
            family=family,
            version_id=version_id,
            manifest=make_manifest(version_id, parent.version_id if parent else None, artifacts),
            artifacts=artifacts,
            artifact_uri=write_artifacts(version_id, artifacts),
            parent=parent,
            datasets=["synthetic-automotive-v1"],
            runs=[f"run-{version_id}"],
            actor=Actor.automation("tests") if actor is None else actor,
        )

    return build


@pytest.fixture
def round_factory(db: Any) -> Callable[..., Round]:
    def build(
        base_version: ModelVersion, *, actor: User | None = None, k: int = 2, round_id: str | None = None
    ) -> Round:
        deadline: datetime = timezone.now() + timedelta(hours=1)
        return open_round(
            base_version=base_version, buffer_size_k=k, deadline_at=deadline, actor=actor, round_id=round_id
        )

    return build


@pytest.fixture
def envelope_factory() -> Callable[..., dict[str, Any]]:
    return make_envelope


@pytest.fixture
def user_factory(db: Any) -> Callable[[str, str], tuple[User, str]]:
    """(user, API token plaintext) for a new user with the given role ('' for none)."""
    return make_user


@pytest.fixture
def device_factory(db: Any) -> Callable[..., tuple[EdgeDevice, str]]:
    """(device, API token plaintext) for a device enrolled through the real enrollment service."""
    return make_device


@pytest.fixture
def update_row_factory(db: Any) -> Callable[..., Update]:
    """An Update row as the update service records a checked envelope, for tests of what reads updates (views,
    admin, adoption, status moves). The checks that lead to such a row are tested through `submit_update` in
    tests/workers and tests/apps/federation."""
    return make_update_row


def make_update_row(
    device: EdgeDevice,
    base_version: str,
    *,
    round_: Round | None = None,
    status: str = UpdateStatus.BUFFERED,
    code: str = "",
    message: str = "",
) -> Update:
    envelope = make_envelope(client_id=device.client_id, base_version=base_version, update_id=str(uuid.uuid4()))
    return Update.objects.create(
        update_id=envelope["update_id"],
        device=device,
        base_version=ModelVersion.objects.get(version_id=base_version),
        round=round_,
        status=status,
        rejection_code=code,
        rejection_message=message,
        staleness=0,
        payload_uri=envelope["payload"]["uri"],
        payload_sha256=envelope["payload"]["sha256"],
        payload_bytes=envelope["payload"]["size_bytes"],
        examples=envelope["examples"],
        routed_tokens=envelope["routed_tokens"],
        metrics=envelope["metrics"],
        envelope=envelope,
        status_changed_at=timezone.now(),
    )


def make_envelope(
    *, client_id: str, base_version: str, round_id: str | None = None, update_id: str | None = None, examples: int = 12
) -> dict[str, Any]:
    """A valid UpdateEnvelope (wire schema v1) as the JSON a device would send."""
    payload = f"delta-{update_id or 'x'}".encode()
    return {
        "schema": "UpdateEnvelope",
        "schema_version": 1,
        "update_id": update_id or str(uuid.uuid4()),
        "client_id": client_id,
        "base_version": base_version,
        "round_id": round_id,
        "examples": examples,
        "routed_tokens": {"0.0": 300, "0.1": 124},
        "metrics": {"loss": 1.25},
        "payload": {
            "uri": f"artifacts://updates/{client_id}/{update_id or 'x'}.safetensors",
            "sha256": hashlib.sha256(payload).hexdigest(),
            "size_bytes": len(payload),
        },
        "adapter": {"rank": 4, "alpha": 8.0, "target_modules": ["w1", "w2", "w3"]},
        "created_at": timezone.now().replace(microsecond=0).isoformat(),
        "signature": "",
    }
