"""Versions are registered with store-relative URIs, and only for files the artifact store holds as declared:
refusals name the file relative to the store (never by server path); old absolute rows are migrated."""

import hashlib
import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.apps import apps as django_apps
from django.core.exceptions import ValidationError

from apps.governance.actors import Actor
from apps.governance.models import AuditEvent
from apps.registry.choices import ArtifactPartition
from apps.registry.models import ModelFamily, ModelVersion, VersionEvaluation
from apps.registry.services import (
    ArtifactSpec,
    DomainEvaluation,
    record_version_evaluation,
    register_saved_version,
    register_version,
)
from apps.registry.storage import public_location, redact_store_paths, store_uri
from fednested.checkpoints import save_version
from fednested.models import build_model

pytestmark = pytest.mark.django_db

CORE = b"core weights " * 20
GATE = b"gate weights " * 5


def spec(name: str, content: bytes, partition: str = ArtifactPartition.CORE, **changes: Any) -> ArtifactSpec:
    fields: dict[str, Any] = {
        "file_name": name,
        "sha256": hashlib.sha256(content).hexdigest(),
        "size_bytes": len(content),
        "partition": partition,
    }
    return ArtifactSpec(**(fields | changes))


@pytest.fixture
def folder(artifact_store: Path) -> Path:
    """versions/v9 in the test's store, holding core.safetensors and gate.safetensors."""
    directory = artifact_store / "versions" / "v9"
    directory.mkdir(parents=True)
    (directory / "core.safetensors").write_bytes(CORE)
    (directory / "gate.safetensors").write_bytes(GATE)
    return directory


def register(family: ModelFamily, uri: str, artifacts: list[ArtifactSpec] | None = None) -> ModelVersion:
    return register_version(
        family=family,
        version_id="v9",
        manifest={"version_id": "v9"},
        artifacts=artifacts or [spec("core.safetensors", CORE), spec("gate.safetensors", GATE, ArtifactPartition.GATE)],
        artifact_uri=uri,
        actor=Actor.automation("tests"),
    )


@pytest.mark.parametrize(
    "uri",
    ["artifacts://versions/v9", "versions/v9", "artifacts://versions/./v9/", "artifacts://versions/x/../v9"],
)
def test_every_form_inside_the_store_is_recorded_store_relative(
    folder: Path, family_factory: Callable[..., ModelFamily], uri: str
) -> None:
    assert register(family_factory(), uri).artifact_uri == "artifacts://versions/v9"


def test_a_file_uri_inside_the_store_is_recorded_store_relative(
    folder: Path, family_factory: Callable[..., ModelFamily]
) -> None:
    version = register(family_factory(), folder.as_uri())
    assert ModelVersion.objects.get(pk=version.pk).artifact_uri == "artifacts://versions/v9"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("artifacts://versions/../../elsewhere", "'artifacts://versions/../../elsewhere' points outside the artifact"),
        ("../elsewhere/v9", "points outside the artifact store"),
        ("file:///etc", "'file:///etc' points outside the artifact store"),
        ("s3://bucket/v9", "only artifacts://, file:// and relative paths"),
        ("file://otherhost/v9", "file URIs on other hosts"),
        ("artifacts://", "names the artifact store itself"),
        ("artifacts://versions/v404", "the artifact store holds no folder versions/v404"),
    ],
)
def test_uris_outside_the_store_or_naming_nothing_are_refused(
    folder: Path, family_factory: Callable[..., ModelFamily], uri: str, message: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        register(family_factory(), uri)
    assert list(caught.value.message_dict) == ["artifact_uri"]
    assert message in caught.value.message_dict["artifact_uri"][0]
    assert str(folder.parent.parent) not in str(caught.value)
    assert not ModelVersion.objects.exists()
    assert not AuditEvent.objects.filter(verb="registry.version.registered").exists()


@pytest.mark.parametrize(
    ("artifacts", "code", "message"),
    [
        (
            [spec("core.safetensors", CORE), spec("missing.safetensors", b"x", ArtifactPartition.GATE)],
            "not_in_store",
            "artifacts[1] ('missing.safetensors'): the artifact store holds no file versions/v9/missing.safetensors",
        ),
        (
            [spec("core.safetensors", CORE, size_bytes=len(CORE) + 1)],
            "size_mismatch",
            f"artifacts[0] ('core.safetensors'): versions/v9/core.safetensors has {len(CORE)} bytes in the artifact "
            f"store, the registration says {len(CORE) + 1}",
        ),
        (
            [spec("core.safetensors", CORE), spec("gate.safetensors", GATE, ArtifactPartition.GATE, sha256="0" * 64)],
            "sha256_mismatch",
            f"artifacts[1] ('gate.safetensors'): versions/v9/gate.safetensors has sha256 "
            f"{hashlib.sha256(GATE).hexdigest()} in the artifact store, the registration says {'0' * 64}",
        ),
    ],
)
def test_files_the_store_does_not_hold_as_declared_are_refused_naming_the_file(
    folder: Path,
    family_factory: Callable[..., ModelFamily],
    artifacts: list[ArtifactSpec],
    code: str,
    message: str,
) -> None:
    with pytest.raises(ValidationError) as caught:
        register(family_factory(), "artifacts://versions/v9", artifacts)
    [error] = caught.value.error_dict["artifacts"]
    assert (error.code, error.message) == (code, message)
    assert not ModelVersion.objects.exists()


def test_a_symlink_out_of_the_version_folder_is_refused(
    folder: Path, family_factory: Callable[..., ModelFamily], tmp_path: Path
) -> None:
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(CORE)
    (folder / "core.safetensors").unlink()
    (folder / "core.safetensors").symlink_to(outside)
    with pytest.raises(ValidationError, match=r"'core\.safetensors' points outside its version's folder") as caught:
        register(family_factory(), "artifacts://versions/v9")
    assert caught.value.error_dict["artifacts"][0].code == "outside_store"
    assert str(tmp_path) not in str(caught.value)


def registration(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "family": "tiny-moe",
        "version_id": "v9",
        "manifest": {"version_id": "v9"},
        "artifact_uri": "artifacts://versions/v9",
        "artifacts": [
            {"file_name": "core.safetensors", "sha256": hashlib.sha256(CORE).hexdigest(), "size_bytes": len(CORE)}
            | {"partition": "core"}
        ],
    }
    return body | changes


@pytest.mark.parametrize(
    ("changes", "field", "code", "message"),
    [
        ({"artifact_uri": "artifacts://../../etc"}, "artifact_uri", "outside_store", "points outside the artifact"),
        ({"artifact_uri": "file:///etc/ssl"}, "artifact_uri", "outside_store", "points outside the artifact store"),
        ({"artifact_uri": "https://example.org/v9"}, "artifact_uri", "outside_store", "only artifacts://"),
        ({"artifact_uri": "artifacts://versions/v8"}, "artifact_uri", "not_in_store", "holds no folder versions/v8"),
        (
            {"artifacts": [{"file_name": "gone.bin", "sha256": "1" * 64, "size_bytes": 3, "partition": "core"}]},
            "artifacts",
            "not_in_store",
            "the artifact store holds no file versions/v9/gone.bin",
        ),
        (
            {"artifacts": [{"file_name": "core.safetensors", "sha256": "1" * 64, "size_bytes": len(CORE)}]},
            "artifacts",
            "sha256_mismatch",
            "versions/v9/core.safetensors has sha256",
        ),
    ],
)
def test_the_api_refuses_such_registrations_with_400_naming_the_file(
    folder: Path,
    cast: dict[str, Any],
    family_factory: Callable[..., ModelFamily],
    changes: dict[str, Any],
    field: str,
    code: str,
    message: str,
) -> None:
    family_factory("tiny-moe")
    if "artifacts" in changes:
        changes["artifacts"] = [{"partition": "core"} | entry for entry in changes["artifacts"]]
    response = cast["engineer"].client.post("/api/v1/versions/", registration(**changes), format="json")
    assert response.status_code == 400, response.content
    body = response.json()
    assert body["code"] == code
    assert message in body[field][0]
    assert str(folder.parent.parent) not in response.content.decode()
    assert not ModelVersion.objects.exists()


def test_the_api_registers_a_file_uri_inside_the_store_as_artifacts(
    folder: Path, cast: dict[str, Any], family_factory: Callable[..., ModelFamily]
) -> None:
    family_factory("tiny-moe")
    response = cast["engineer"].client.post(
        "/api/v1/versions/", registration(artifact_uri=folder.as_uri()), format="json"
    )
    assert response.status_code == 201, response.content
    assert response.json()["artifact_uri"] == "artifacts://versions/v9"
    download = cast["engineer"].client.get("/api/v1/versions/v9/files/core.safetensors/")
    assert b"".join(download.streaming_content) == CORE


def test_a_saved_version_is_registered_from_inside_the_store_only(
    artifact_store: Path, family_factory: Callable[..., ModelFamily], tmp_path: Path
) -> None:
    family = family_factory()
    model = build_model("tiny", vocab_size=64, seed=1)
    outside = tmp_path / "elsewhere" / "v1"
    save_version(model, outside, version_id="v1", parent_version=None)
    with pytest.raises(ValidationError, match="'v1' lies outside the artifact store") as caught:
        register_saved_version(outside, family=family, actor=Actor.automation("tests"))
    assert str(tmp_path) not in str(caught.value)

    inside = artifact_store / "versions" / "v1"
    save_version(model, inside, version_id="v1", parent_version=None)
    version = register_saved_version(inside, family=family, actor=Actor.automation("tests"))
    assert version.artifact_uri == "artifacts://versions/v1"
    assert version.artifacts.count() == len(json.loads((inside / "manifest.json").read_text())["files"]) + 1

    # A file changed after saving: refused by the same check as any registration, naming the file.
    tampered = artifact_store / "versions" / "v2"
    save_version(model, tampered, version_id="v2", parent_version=None)
    (tampered / "gate.safetensors").write_bytes(b"\0" * (tampered / "gate.safetensors").stat().st_size)
    with pytest.raises(ValidationError, match=r"versions/v2/gate.safetensors has sha256 [0-9a-f]{64} in the artifact"):
        register_saved_version(tampered, family=family, actor=Actor.automation("tests"))


def test_public_locations_never_show_a_server_path(artifact_store: Path, tmp_path: Path) -> None:
    inside = artifact_store / "heldout"
    assert public_location("artifacts://versions/v1", artifact_store) == "artifacts://versions/v1"
    assert public_location(str(inside), artifact_store) == "artifacts://heldout"
    assert public_location(inside.as_uri(), artifact_store) == "artifacts://heldout"
    assert public_location("/srv/old-store/versions/v1", artifact_store) == ""
    assert public_location("file:///srv/old-store/versions/v1", artifact_store) == ""
    assert public_location("synthetic-heldout-v2", artifact_store) == "synthetic-heldout-v2"
    assert store_uri("versions/v1/", artifact_store) == "artifacts://versions/v1"


def test_messages_name_store_files_by_store_uri(artifact_store: Path) -> None:
    resolved = artifact_store.resolve()
    text = f"{resolved}/versions/v1/core.safetensors: missing; see {resolved.as_uri()}/x and {resolved}"
    assert redact_store_paths(text, artifact_store) == (
        "artifacts://versions/v1/core.safetensors: missing; see artifacts://x and artifacts://"
    )
    # Another folder that merely starts like the store is no part of it.
    assert redact_store_paths(f"{resolved}-old/v1", artifact_store) == f"{resolved}-old/v1"


def test_the_migration_rewrites_absolute_rows_inside_the_store_and_leaves_the_rest(
    artifact_store: Path,
    family_factory: Callable[..., ModelFamily],
    version_factory: Callable[..., ModelVersion],
) -> None:
    family = family_factory()
    inside, relative, outside, current = (version_factory(family, f"v{n}") for n in range(1, 5))
    # Rows as the registry wrote them before store-relative URIs (no service writes such rows any more).
    ModelVersion.objects.filter(pk=inside.pk).update(artifact_uri=(artifact_store / "versions" / "v1").as_uri())
    ModelVersion.objects.filter(pk=relative.pk).update(artifact_uri="versions/v2")
    ModelVersion.objects.filter(pk=outside.pk).update(artifact_uri="file:///srv/old-store/versions/v3")
    scores = [DomainEvaluation(domain="medical", loss=1.0, perplexity=None, tokens=1)]
    record_version_evaluation(current, scores, actor=Actor.automation("tests"), heldout=str(artifact_store / "heldout"))
    record_version_evaluation(inside, scores, actor=Actor.automation("tests"), heldout="medical-set-v1")
    migration = importlib.import_module("apps.registry.migrations.0003_store_relative_uris")
    migration.to_store_relative(django_apps, None)
    uris = dict(ModelVersion.objects.values_list("version_id", "artifact_uri"))
    assert uris == {
        "v1": "artifacts://versions/v1",
        "v2": "artifacts://versions/v2",
        "v3": "file:///srv/old-store/versions/v3",
        "v4": "artifacts://versions/v4",
    }
    assert dict(VersionEvaluation.objects.values_list("version__version_id", "heldout")) == {
        "v4": "artifacts://heldout",
        "v1": "medical-set-v1",
    }
