"""Version files served from the artifact store (devices: champion only), fused expert files, manifest sha256 as
devices check it, and per-domain evaluations recorded through the registry service and read through the API."""

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ValidationError

from apps.governance.actors import Actor
from apps.governance.models import AuditEvent
from apps.registry.choices import ArtifactPartition
from apps.registry.models import ModelFamily, ModelVersion, VersionEvaluation
from apps.registry.services import (
    ArtifactSpec,
    DomainEvaluation,
    canonical_manifest_bytes,
    move_alias,
    record_version_evaluation,
    register_version,
)

pytestmark = pytest.mark.django_db


def spec_of(path: Path, name: str, partition: str, **extra: Any) -> ArtifactSpec:
    content = path.read_bytes()
    return ArtifactSpec(
        file_name=name,
        sha256=hashlib.sha256(content).hexdigest(),
        size_bytes=len(content),
        partition=partition,
        **extra,
    )


def stored_version(
    root: Path, family: ModelFamily, version_id: str, *, parent: ModelVersion | None = None
) -> ModelVersion:
    """A version laid out in the artifact store as fednested saves one: core, gate, fused experts, manifest.json."""
    directory = root / "versions" / version_id
    directory.mkdir(parents=True)
    contents = {
        "core.safetensors": b"core-" + version_id.encode() * 40,
        "gate.safetensors": b"gate-" + version_id.encode() * 8,
        "experts.safetensors": b"experts-" + version_id.encode() * 100,
    }
    for name, content in contents.items():
        (directory / name).write_bytes(content)
    partitions = {"core.safetensors": "core", "gate.safetensors": "gate", "experts.safetensors": "experts"}
    manifest = {
        "version_id": version_id,
        "parent_version": parent.version_id if parent else None,
        "files": {
            name: {"sha256": hashlib.sha256(content).hexdigest(), "bytes": len(content), "partition": partitions[name]}
            for name, content in contents.items()
        },
    }
    # Indented like fednested's to_json: these bytes are not the canonical JSON.
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    specs = [
        spec_of(directory / "core.safetensors", "core.safetensors", ArtifactPartition.CORE),
        spec_of(directory / "gate.safetensors", "gate.safetensors", ArtifactPartition.GATE),
        spec_of(directory / "experts.safetensors", "experts.safetensors", ArtifactPartition.EXPERT),
        spec_of(directory / "manifest.json", "manifest.json", ArtifactPartition.MANIFEST),
    ]
    return register_version(
        family=family,
        version_id=version_id,
        manifest=manifest,
        artifacts=specs,
        artifact_uri=f"artifacts://versions/{version_id}",
        parent=parent,
        actor=Actor.automation("tests"),
    )


@pytest.fixture
def store(artifact_store: Path) -> Path:
    return artifact_store


@pytest.fixture
def champion(store: Path, cast: dict[str, Any], family_factory: Callable[..., ModelFamily]) -> ModelVersion:
    family = family_factory("tiny-moe")
    v1 = stored_version(store, family, "v1")
    move_alias(name="champion", version=v1, actor=cast["engineer"].user)
    return v1


def test_a_fused_experts_file_registers_and_manifest_sha256_is_that_of_the_manifest_file(
    store: Path, champion: ModelVersion
) -> None:
    experts = champion.artifacts.get(file_name="experts.safetensors")
    assert (experts.partition, experts.layer, experts.expert_index) == ("expert", None, None)
    manifest_bytes = (store / "versions" / "v1" / "manifest.json").read_bytes()
    assert champion.manifest_sha256 == hashlib.sha256(manifest_bytes).hexdigest()
    assert champion.manifest_sha256 != hashlib.sha256(canonical_manifest_bytes(champion.manifest)).hexdigest()


def test_device_reads_the_champion_and_downloads_every_file_byte_for_byte(
    store: Path, champion: ModelVersion, cast: dict[str, Any]
) -> None:
    device = cast["device"].client
    info = device.get("/api/v1/aliases/champion/")
    assert info.status_code == 200
    version = info.json()["version"]
    assert (version["version_id"], version["parent"], version["manifest_sha256"]) == (
        "v1",
        None,
        champion.manifest_sha256,
    )
    listed = {entry["file_name"]: entry for entry in version["artifacts"]}
    assert set(listed) == {"core.safetensors", "gate.safetensors", "experts.safetensors", "manifest.json"}
    for name, entry in listed.items():
        response = device.get(f"/api/v1/versions/v1/files/{name}/")
        assert response.status_code == 200, response.content[:200]
        assert response["Content-Type"] == "application/octet-stream"
        body = b"".join(response.streaming_content)
        assert body == (store / "versions" / "v1" / name).read_bytes()
        assert (hashlib.sha256(body).hexdigest(), len(body)) == (entry["sha256"], entry["size_bytes"])
    manifest = b"".join(device.get("/api/v1/versions/v1/files/manifest.json/").streaming_content)
    assert hashlib.sha256(manifest).hexdigest() == version["manifest_sha256"]
    octet = device.get("/api/v1/versions/v1/files/core.safetensors/", HTTP_ACCEPT="application/octet-stream")
    assert octet.status_code == 200


def test_devices_get_only_the_champion_others_any_version(
    store: Path, champion: ModelVersion, cast: dict[str, Any]
) -> None:
    stored_version(store, champion.family, "v2", parent=champion)
    refused = cast["device"].client.get("/api/v1/versions/v2/files/core.safetensors/")
    assert refused.status_code == 404
    engineer = cast["engineer"].client.get("/api/v1/versions/v2/files/core.safetensors/")
    assert engineer.status_code == 200
    assert b"".join(engineer.streaming_content) == (store / "versions" / "v2" / "core.safetensors").read_bytes()


def test_a_version_without_a_manifest_file_serves_the_canonical_manifest(
    store: Path, cast: dict[str, Any], family_factory: Callable[..., ModelFamily], version_factory: Callable[..., Any]
) -> None:
    version = version_factory(family_factory("tiny-moe"), "tiny-moe-v1")
    response = cast["engineer"].client.get("/api/v1/versions/tiny-moe-v1/files/manifest.json/")
    assert response.status_code == 200
    assert response.content == canonical_manifest_bytes(version.manifest)
    assert hashlib.sha256(response.content).hexdigest() == version.manifest_sha256


@pytest.mark.parametrize(
    "file_name",
    ["secrets.txt", "../v2/core.safetensors", "..%2F..%2Fdb.sqlite3", "core.safetensors/extra", "%2Fetc%2Fpasswd"],
)
def test_only_files_the_version_lists_are_served(
    store: Path, champion: ModelVersion, cast: dict[str, Any], file_name: str
) -> None:
    (store / "versions" / "v1" / "secrets.txt").write_text("not a registered file")
    (store / "db.sqlite3").write_text("outside any version")
    response = cast["engineer"].client.get(f"/api/v1/versions/v1/files/{file_name}/")
    assert response.status_code == 404
    assert "has no file" in response.json()["detail"]
    assert b"not a registered file" not in response.content
    assert b"outside any version" not in response.content


def test_files_the_store_lost_are_gone_naming_the_file_in_the_store(
    store: Path, champion: ModelVersion, cast: dict[str, Any], tmp_path: Path
) -> None:
    """410 with a code: a device stops asking (a 500 is retried forever) until an operator repairs the store."""
    device = cast["device"].client
    directory = store / "versions" / "v1"
    (directory / "gate.safetensors").unlink()
    missing = device.get("/api/v1/versions/v1/files/gate.safetensors/")
    assert (missing.status_code, missing.json()) == (
        410,
        {
            "detail": "file 'gate.safetensors' of version 'v1' is registered but the artifact store holds no "
            "versions/v1/gate.safetensors",
            "code": "artifact_unavailable",
        },
    )

    (directory / "core.safetensors").write_bytes(b"truncated")
    short = device.get("/api/v1/versions/v1/files/core.safetensors/")
    assert (short.status_code, short.json()["code"]) == (410, "artifact_unavailable")
    assert "has 9 bytes in the artifact store, the registry says" in short.json()["detail"]

    outside = tmp_path / "outside.bin"
    outside.write_bytes((directory / "experts.safetensors").read_bytes())
    (directory / "experts.safetensors").unlink()
    (directory / "experts.safetensors").symlink_to(outside)
    escaped = device.get("/api/v1/versions/v1/files/experts.safetensors/")
    assert (escaped.status_code, escaped.json()["code"]) == (410, "artifact_unavailable")
    assert escaped.json()["detail"] == "file 'experts.safetensors' of version 'v1' lies outside the artifact store"
    for response in (missing, short, escaped):
        assert str(tmp_path) not in response.content.decode()


def test_a_version_recorded_by_a_path_outside_the_store_is_gone_without_showing_the_path(
    store: Path, champion: ModelVersion, cast: dict[str, Any]
) -> None:
    # A row from before store-relative URIs, of a store that has since moved (the migration leaves such rows).
    ModelVersion.objects.filter(pk=champion.pk).update(artifact_uri="file:///srv/old-store/versions/v1")
    response = cast["device"].client.get("/api/v1/versions/v1/files/core.safetensors/")
    assert (response.status_code, response.json()["code"]) == (410, "artifact_unavailable")
    champion_info = cast["device"].client.get("/api/v1/aliases/champion/")
    assert champion_info.json()["version"]["artifact_uri"] == ""
    for body in (response.content, champion_info.content):
        assert b"/srv/old-store" not in body


def scores(**domains: tuple[float, float | None]) -> list[DomainEvaluation]:
    return [
        DomainEvaluation(
            domain=name,
            loss=loss,
            perplexity=math.exp(loss),
            tokens=640,
            records=12,
            parent_loss=parent,
            parent_perplexity=math.exp(parent) if parent is not None else None,
        )
        for name, (loss, parent) in domains.items()
    ]


def test_evaluations_are_recorded_audited_replaced_and_served(
    store: Path, champion: ModelVersion, cast: dict[str, Any]
) -> None:
    v2 = stored_version(store, champion.family, "v2", parent=champion)
    rows = record_version_evaluation(
        v2,
        scores(medical=(2.5, 3.0), recipes=(3.25, 3.0)),
        actor=Actor.automation("worker:evaluation"),
        heldout="heldout/",
    )
    assert [(row.domain, row.loss, row.parent_loss, row.parent_version) for row in rows] == [
        ("medical", 2.5, 3.0, champion),
        ("recipes", 3.25, 3.0, champion),
    ]
    assert [row.loss_change for row in v2.evaluations.order_by("domain")] == [-0.5, 0.25]
    [event] = AuditEvent.objects.filter(verb="registry.version.evaluated", object_id=str(v2.pk))
    assert event.actor_label == "worker:evaluation"
    assert event.data["domains"]["medical"] == {"loss": 2.5, "perplexity": math.exp(2.5), "tokens": 640, "records": 12}
    assert event.data["parent_domains"]["recipes"] == {"loss": 3.0, "perplexity": math.exp(3.0)}

    response = cast["officer"].client.get("/api/v1/versions/v2/evaluations/")
    assert response.status_code == 200
    body = response.json()
    assert [(row["domain"], row["loss"], row["parent_loss"], row["parent_version"]) for row in body] == [
        ("medical", 2.5, 3.0, "v1"),
        ("recipes", 3.25, 3.0, "v1"),
    ]
    assert body[0]["loss_change"] == pytest.approx(-0.5)
    assert cast["device"].client.get("/api/v1/versions/v2/evaluations/").status_code == 403

    # A second run replaces the first: the rows describe one run on one held-out set.
    record_version_evaluation(v2, scores(legal=(1.5, 1.75)), actor=Actor.automation("worker:evaluation"))
    assert list(v2.evaluations.values_list("domain", flat=True)) == ["legal"]
    assert AuditEvent.objects.filter(verb="registry.version.evaluated").latest("id").data["replaced_domains"] == [
        "medical",
        "recipes",
    ]


@pytest.mark.parametrize(
    ("results", "message"),
    [
        ([], "at least one domain"),
        (scores(medical=(2.0, None)) * 2, r"results\[1\] \('medical'\): domain listed twice"),
        ([DomainEvaluation("bad domain", 2.0, 7.4, 10)], "domain must use only"),
        ([DomainEvaluation("medical", math.nan, 7.4, 10)], r"results\[0\] \('medical'\): loss must be a finite"),
        ([DomainEvaluation("medical", -1.0, 7.4, 10)], "loss must be >= 0"),
        ([DomainEvaluation("medical", 2.0, 0.0, 10)], "perplexity must be > 0"),
        ([DomainEvaluation("medical", 2.0, 7.4, 0)], "no tokens were scored"),
        ([DomainEvaluation("medical", 2.0, 7.4, 10, parent_loss=math.inf)], "parent_loss must be a finite"),
    ],
)
def test_bad_evaluations_are_refused_naming_the_domain_and_nothing_is_written(
    store: Path, champion: ModelVersion, results: list[DomainEvaluation], message: str
) -> None:
    v2 = stored_version(store, champion.family, "v2", parent=champion)
    with pytest.raises(ValidationError, match=message):
        record_version_evaluation(v2, results, actor=Actor.automation("worker:evaluation"))
    assert not VersionEvaluation.objects.exists()
    assert not AuditEvent.objects.filter(verb="registry.version.evaluated").exists()


def test_parent_scores_need_a_parent(champion: ModelVersion) -> None:
    with pytest.raises(ValidationError, match="parent scores given, but the version has no parent"):
        record_version_evaluation(champion, scores(medical=(2.0, 2.5)), actor=Actor.automation("worker:evaluation"))
    rows = record_version_evaluation(champion, scores(medical=(2.0, None)), actor=Actor.automation("worker:evaluation"))
    assert (rows[0].parent_loss, rows[0].parent_version) == (None, None)
