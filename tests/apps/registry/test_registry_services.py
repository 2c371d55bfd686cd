"""Registry services: registering immutable versions with files and lineage, status, aliases — each audited."""

import hashlib
from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.admin.sites import site as admin_site
from django.core.exceptions import ValidationError
from django.test import RequestFactory

from apps.accounts.choices import Role
from apps.accounts.services import create_user_with_role
from apps.governance.models import AuditEvent
from apps.registry.choices import ArtifactPartition, LineageKind, VersionStatus
from apps.registry.models import Alias, LineageEdge, ModelFamily, ModelVersion, VersionArtifact
from apps.registry.services import (
    ArtifactSpec,
    create_model_family,
    manifest_sha256,
    move_alias,
    register_version,
    set_version_status,
)

pytestmark = pytest.mark.django_db


def one_file(name: str = "core.safetensors", **overrides: Any) -> ArtifactSpec:
    content = name.encode()
    fields: dict[str, Any] = {
        "file_name": name,
        "sha256": hashlib.sha256(content).hexdigest(),
        "size_bytes": len(content),
        "partition": ArtifactPartition.CORE,
    }
    fields.update(overrides)
    return ArtifactSpec(**fields)


def test_manifest_sha256_is_canonical() -> None:
    assert manifest_sha256({"b": 1, "a": [1, 2]}) == manifest_sha256({"a": [1, 2], "b": 1})
    assert manifest_sha256({"a": 1}) == hashlib.sha256(b'{"a":1}').hexdigest()


def test_register_version_stores_files_lineage_and_audit(
    family_factory: Callable[..., ModelFamily], version_factory: Callable[..., ModelVersion]
) -> None:
    engineer = create_user_with_role(username="eve", role=Role.ENGINEER, actor=None)
    family = family_factory(actor=engineer)
    v1 = version_factory(family, "tiny-moe-v1", actor=engineer)
    v2 = version_factory(family, "tiny-moe-v2", parent=v1, actor=engineer)
    stored = ModelVersion.objects.get(version_id="tiny-moe-v2")
    assert stored.status == VersionStatus.CANDIDATE
    assert stored.manifest_sha256 == manifest_sha256(stored.manifest)
    assert stored.created_by == engineer
    assert stored.created_by_label == "eve"
    files = {a.file_name: a for a in VersionArtifact.objects.filter(version=v2)}
    assert len(files) == 5
    expert = files["experts/layer0_expert1.safetensors"]
    assert (expert.partition, expert.layer, expert.expert_index) == ("expert", 0, 1)
    assert expert.sha256 == stored.manifest["files"][expert.file_name]["sha256"]
    edges = set(LineageEdge.objects.filter(version=v2).values_list("kind", "source_ref", "source_version__version_id"))
    assert edges == {
        (LineageKind.PARENT, "tiny-moe-v1", "tiny-moe-v1"),
        (LineageKind.DATASET, "synthetic-automotive-v1", None),
        (LineageKind.RUN, "run-tiny-moe-v2", None),
    }
    assert v2.ancestors() == [v1]
    event = AuditEvent.objects.get(verb="registry.version.registered", object_id=str(v2.pk))
    assert event.actor == engineer
    assert event.data["manifest_sha256"] == stored.manifest_sha256
    assert event.data["parent"] == "tiny-moe-v1"


def test_registering_an_existing_version_id_fails_and_keeps_the_original(
    family_factory: Callable[..., ModelFamily], version_factory: Callable[..., ModelVersion]
) -> None:
    family = family_factory()
    original = version_factory(family, "tiny-moe-v1")
    before = (original.manifest_sha256, list(original.artifacts.values_list("file_name", "sha256")))
    with pytest.raises(ValidationError, match="already exists; versions are immutable"):
        register_version(
            family=family,
            version_id="tiny-moe-v1",
            manifest={"tampered": True},
            artifacts=[one_file("evil.safetensors")],
            artifact_uri="file:///elsewhere",
            actor=None,
        )
    again = ModelVersion.objects.get(version_id="tiny-moe-v1")
    assert (again.manifest_sha256, list(again.artifacts.values_list("file_name", "sha256"))) == before
    assert again.manifest != {"tampered": True}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"version_id": "-bad id"}, "must start with a letter or digit"),
        ({"manifest": {}}, "non-empty JSON object"),
        ({"artifact_uri": "has space"}, "without whitespace"),
        ({"artifacts": []}, "at least one artifact"),
        ({"artifacts": [one_file(sha256="XYZ")]}, r"artifacts\[0\] \('core.safetensors'\): sha256 must be 64"),
        ({"artifacts": [one_file(size_bytes=-1)]}, "size_bytes must be >= 0"),
        ({"artifacts": [one_file(partition="weights")]}, "partition 'weights' is not one of"),
        ({"artifacts": [one_file(partition="expert", layer=1)]}, "layer and expert_index go together"),
        ({"artifacts": [one_file(partition="expert", expert_index=2)]}, "layer and expert_index go together"),
        ({"artifacts": [one_file(layer=1, expert_index=0)]}, "layer and expert_index are only for expert files"),
        ({"artifacts": [one_file("manifest.json")]}, "manifest.json and only it has partition 'manifest'"),
        ({"artifacts": [one_file("m.json", partition="manifest")]}, "manifest.json and only it has partition"),
        ({"artifacts": [one_file(), one_file()]}, "file listed twice"),
        ({"artifacts": [one_file("../escape")]}, "without '..'"),
    ],
)
def test_register_version_rejects_bad_input_naming_the_field(
    family_factory: Callable[..., ModelFamily], changes: dict[str, Any], message: str
) -> None:
    arguments: dict[str, Any] = {
        "family": family_factory(),
        "version_id": "tiny-moe-v1",
        "manifest": {"version_id": "tiny-moe-v1"},
        "artifacts": [one_file()],
        "artifact_uri": "file:///artifacts/tiny-moe-v1",
        "actor": None,
    }
    arguments.update(changes)
    with pytest.raises(ValidationError, match=message):
        register_version(**arguments)
    assert ModelVersion.objects.count() == 0
    assert AuditEvent.objects.filter(verb="registry.version.registered").count() == 0


def test_parent_must_belong_to_the_same_family(
    family_factory: Callable[..., ModelFamily], version_factory: Callable[..., ModelVersion]
) -> None:
    other = version_factory(family_factory("other-moe"), "other-v1")
    with pytest.raises(ValidationError, match="belongs to family 'other-moe', not 'tiny-moe'"):
        register_version(
            family=family_factory("tiny-moe"),
            version_id="tiny-moe-v1",
            manifest={"a": 1},
            artifacts=[one_file()],
            artifact_uri="file:///x",
            parent=other,
            actor=None,
        )


def test_family_names_are_slugs_and_unique(family_factory: Callable[..., ModelFamily]) -> None:
    family_factory("tiny-moe")
    with pytest.raises(ValidationError, match="already exists"):
        family_factory("tiny-moe")
    with pytest.raises(ValidationError, match="lowercase slug"):
        create_model_family(name="Tiny MoE", architecture="X", actor=None)
    assert AuditEvent.objects.filter(verb="registry.family.created").count() == 1


def test_status_and_alias_moves_are_audited_and_never_touch_files(
    family_factory: Callable[..., ModelFamily], version_factory: Callable[..., ModelVersion]
) -> None:
    engineer = create_user_with_role(username="eve", role=Role.ENGINEER, actor=None)
    family = family_factory()
    v1 = version_factory(family, "tiny-moe-v1")
    v2 = version_factory(family, "tiny-moe-v2", parent=v1)

    def content(version: ModelVersion) -> tuple[Any, ...]:
        row = ModelVersion.objects.get(pk=version.pk)
        files = list(VersionArtifact.objects.filter(version=version).order_by("file_name").values())
        return (row.manifest, row.manifest_sha256, row.artifact_uri, row.parent_id, row.family_id, files)

    before = {v.pk: content(v) for v in (v1, v2)}
    alias = move_alias(name="candidate", version=v1, actor=engineer)
    move_alias(name="candidate", version=v2, actor=engineer)
    set_version_status(v1, VersionStatus.ARCHIVED, actor=engineer)
    set_version_status(v1, VersionStatus.ARCHIVED, actor=engineer)  # no change: no audit row
    assert {v.pk: content(v) for v in (v1, v2)} == before

    assert Alias.objects.get(name="candidate").version == v2
    moves = list(AuditEvent.objects.filter(verb="registry.alias.moved", object_id=str(alias.pk)).order_by("pk"))
    assert [m.data for m in moves] == [
        {"alias": "candidate", "from": None, "to": "tiny-moe-v1"},
        {"alias": "candidate", "from": "tiny-moe-v1", "to": "tiny-moe-v2"},
    ]
    status_events = AuditEvent.objects.filter(verb="registry.version.status_changed", object_id=str(v1.pk))
    assert [e.data["to"] for e in status_events] == ["archived"]
    with pytest.raises(ValidationError, match="unknown version status 'gold'"):
        set_version_status(v1, "gold", actor=engineer)
    with pytest.raises(ValidationError, match="lowercase slug"):
        move_alias(name="Champion!", version=v1, actor=engineer)


def test_admin_is_read_only_for_registry_models(
    family_factory: Callable[..., ModelFamily], version_factory: Callable[..., ModelVersion]
) -> None:
    superuser = create_user_with_role(username="root", role=Role.ADMIN, actor=None)
    superuser.is_staff = superuser.is_superuser = True
    superuser.save()
    request = RequestFactory().get("/admin/")
    request.user = superuser
    version = version_factory(family_factory(), "tiny-moe-v1")
    for model in (ModelFamily, ModelVersion, VersionArtifact, LineageEdge, Alias):
        model_admin = admin_site._registry[model]
        assert model_admin.has_view_permission(request)
        assert not model_admin.has_add_permission(request)
        assert not model_admin.has_change_permission(request, None)
        assert not model_admin.has_delete_permission(request, None)
    assert admin_site._registry[ModelVersion].has_view_permission(request, version)
