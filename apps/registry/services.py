"""Registry services: registering families and immutable versions, version status, alias moves — each audited.

No service here (or anywhere) changes a registered version's manifest, manifest sha256, artifact URI or files.
"""

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from apps.governance.audit import actor_label_for, record_audit_event
from apps.registry.choices import ArtifactPartition, LineageKind, VersionStatus
from apps.registry.models import Alias, LineageEdge, ModelFamily, ModelVersion, VersionArtifact

VERSION_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
SLUG_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
# An artifact URI travels in ModelAvailable events, whose schema allows 1-200 characters without whitespace.
ARTIFACT_URI_PATTERN = re.compile(r"^\S{1,200}$")


@dataclass(frozen=True)
class ArtifactSpec:
    """One file of a version being registered."""

    file_name: str
    sha256: str
    size_bytes: int
    partition: str
    layer: int | None = None
    expert_index: int | None = None


def manifest_sha256(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest's canonical JSON (sorted keys, compact), so equal manifests hash equally."""
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _check_artifacts(artifacts: Sequence[ArtifactSpec]) -> None:
    if not artifacts:
        raise ValidationError({"artifacts": "a version needs at least one artifact file"})
    seen: set[str] = set()
    for position, spec in enumerate(artifacts):
        where = f"artifacts[{position}] ({spec.file_name!r})"
        if not spec.file_name or spec.file_name.startswith("/") or ".." in spec.file_name.split("/"):
            raise ValidationError({"artifacts": f"{where}: file name must be a relative path without '..'"})
        if spec.file_name in seen:
            raise ValidationError({"artifacts": f"{where}: file listed twice"})
        seen.add(spec.file_name)
        if not SHA256_PATTERN.match(spec.sha256):
            raise ValidationError({"artifacts": f"{where}: sha256 must be 64 lowercase hex digits"})
        if spec.size_bytes < 0:
            raise ValidationError({"artifacts": f"{where}: size_bytes must be >= 0, got {spec.size_bytes}"})
        if spec.partition not in ArtifactPartition.values:
            raise ValidationError(
                {"artifacts": f"{where}: partition {spec.partition!r} is not one of {ArtifactPartition.values}"}
            )
        is_expert = spec.partition == ArtifactPartition.EXPERT
        if is_expert != (spec.layer is not None and spec.expert_index is not None):
            raise ValidationError(
                {"artifacts": f"{where}: layer and expert_index are required for expert files and only for them"}
            )


@transaction.atomic
def create_model_family(
    *, name: str, architecture: str, actor: Any, config: dict[str, Any] | None = None, description: str = ""
) -> ModelFamily:
    """A new model family; `name` is a lowercase slug."""
    if not SLUG_PATTERN.match(name):
        raise ValidationError({"name": f"{name!r} must be a lowercase slug (a-z, 0-9, '-', '_'), up to 64 characters"})
    if not architecture.strip():
        raise ValidationError({"architecture": "architecture is required, e.g. 'MixtralForCausalLM'"})
    if config is not None and not isinstance(config, dict):
        raise ValidationError({"config": "config must be a JSON object"})
    if ModelFamily.objects.filter(name=name).exists():
        raise ValidationError({"name": f"model family {name!r} already exists"})
    family = ModelFamily.objects.create(
        name=name,
        architecture=architecture.strip(),
        config=config or {},
        description=description,
        created_by=actor if getattr(actor, "is_authenticated", False) else None,
    )
    record_audit_event(actor=actor, verb="registry.family.created", target=family, data={"name": name})
    return family


@transaction.atomic
def register_version(
    *,
    family: ModelFamily,
    version_id: str,
    manifest: dict[str, Any],
    artifacts: Sequence[ArtifactSpec],
    artifact_uri: str,
    actor: Any,
    actor_label: str = "",
    parent: ModelVersion | None = None,
    datasets: Iterable[str] = (),
    runs: Iterable[str] = (),
    contributing_updates: Iterable[str] = (),
) -> ModelVersion:
    """Register an immutable version as a candidate, with its files and lineage edges.

    A version id is used once: registering it again is an error, never an overwrite.
    """
    if not VERSION_ID_PATTERN.match(version_id):
        raise ValidationError(
            {"version_id": f"{version_id!r} must start with a letter or digit and use only A-Z a-z 0-9 . _ - (≤128)"}
        )
    if not isinstance(manifest, dict) or not manifest:
        raise ValidationError({"manifest": "manifest must be a non-empty JSON object"})
    if not ARTIFACT_URI_PATTERN.match(artifact_uri):
        raise ValidationError({"artifact_uri": "artifact_uri must be 1-200 characters without whitespace"})
    if parent is not None and parent.family_id != family.pk:
        raise ValidationError(
            {"parent": f"parent {parent.version_id!r} belongs to family {parent.family.name!r}, not {family.name!r}"}
        )
    _check_artifacts(artifacts)
    if ModelVersion.objects.filter(version_id=version_id).exists():
        raise ValidationError({"version_id": f"version {version_id!r} already exists; versions are immutable"})
    user = actor if getattr(actor, "is_authenticated", False) else None
    try:
        with transaction.atomic():
            version = ModelVersion.objects.create(
                version_id=version_id,
                family=family,
                parent=parent,
                manifest=manifest,
                manifest_sha256=manifest_sha256(manifest),
                artifact_uri=artifact_uri,
                status=VersionStatus.CANDIDATE,
                created_by=user,
                created_by_label=actor_label or actor_label_for(user),
            )
    except IntegrityError as exc:
        # Two registrations of one id raced; the other one won.
        raise ValidationError({"version_id": f"version {version_id!r} already exists; versions are immutable"}) from exc
    VersionArtifact.objects.bulk_create(
        VersionArtifact(
            version=version,
            file_name=spec.file_name,
            sha256=spec.sha256,
            size_bytes=spec.size_bytes,
            partition=spec.partition,
            layer=spec.layer,
            expert_index=spec.expert_index,
        )
        for spec in artifacts
    )
    edges = []
    if parent is not None:
        edges.append(
            LineageEdge(version=version, kind=LineageKind.PARENT, source_ref=parent.version_id, source_version=parent)
        )
    for kind, refs in (
        (LineageKind.DATASET, datasets),
        (LineageKind.RUN, runs),
        (LineageKind.UPDATE, contributing_updates),
    ):
        edges.extend(LineageEdge(version=version, kind=kind, source_ref=str(ref)) for ref in dict.fromkeys(refs))
    LineageEdge.objects.bulk_create(edges)
    record_audit_event(
        actor=actor,
        actor_label=actor_label,
        verb="registry.version.registered",
        target=version,
        data={
            "version_id": version_id,
            "family": family.name,
            "parent": parent.version_id if parent else None,
            "manifest_sha256": version.manifest_sha256,
            "files": len(artifacts),
        },
    )
    return version


@transaction.atomic
def set_version_status(version: ModelVersion, status: str, *, actor: Any, actor_label: str = "") -> ModelVersion:
    """Change a version's lifecycle status (the only mutable thing about it)."""
    if status not in VersionStatus.values:
        raise ValidationError({"status": f"unknown version status {status!r}: use one of {VersionStatus.values}"})
    old_status = ModelVersion.objects.select_for_update().values_list("status", flat=True).get(pk=version.pk)
    if old_status == status:
        version.status = old_status
        return version
    ModelVersion.objects.filter(pk=version.pk).update(status=status)
    version.status = status
    record_audit_event(
        actor=actor,
        actor_label=actor_label,
        verb="registry.version.status_changed",
        target=version,
        data={"version_id": version.version_id, "from": old_status, "to": status},
    )
    return version


@transaction.atomic
def move_alias(*, name: str, version: ModelVersion, actor: Any, actor_label: str = "") -> Alias:
    """Point alias `name` at `version` (creating the alias on first use); audited with the old and new target."""
    if not SLUG_PATTERN.match(name):
        raise ValidationError({"name": f"alias {name!r} must be a lowercase slug"})
    user = actor if getattr(actor, "is_authenticated", False) else None
    alias = Alias.objects.select_for_update().filter(name=name).first()
    previous = alias.version.version_id if alias is not None else None
    if alias is None:
        alias = Alias.objects.create(name=name, version=version, updated_by=user)
    else:
        alias.version = version
        alias.updated_by = user
        alias.save(update_fields=["version", "updated_by", "updated_at"])
    record_audit_event(
        actor=actor,
        actor_label=actor_label,
        verb="registry.alias.moved",
        target=alias,
        data={"alias": name, "from": previous, "to": version.version_id},
    )
    return alias
