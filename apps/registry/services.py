"""Registry services: registering families and immutable versions, version status, alias moves — each audited.

No service here (or anywhere) changes a registered version's manifest, manifest sha256, artifact URI or files.
"""

import hashlib
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from apps.governance.actors import Actor, ActorLike, as_actor
from apps.governance.audit import record_audit_event
from apps.registry.choices import ArtifactPartition, LineageKind, VersionStatus
from apps.registry.models import Alias, LineageEdge, ModelFamily, ModelVersion, VersionArtifact, VersionEvaluation
from apps.registry.storage import (
    StoreProblem,
    artifact_path,
    artifact_root,
    artifact_uri,
    file_inside,
    redact_store_paths,
    store_relative,
    store_uri,
)
from fednested.checkpoints import MANIFEST_NAME, CheckpointError, Manifest, file_sha256, read_manifest
from fednested.messaging.schemas import SHA256_HEX_REGEX

VERSION_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SHA256_PATTERN = re.compile(SHA256_HEX_REGEX)
SLUG_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
# An artifact URI travels in ModelAvailable events, whose schema allows 1-200 characters without whitespace.
ARTIFACT_URI_PATTERN = re.compile(r"^\S{1,200}$")
DOMAIN_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# The file devices download first and check against ModelVersion.manifest_sha256 (docs/api/device-protocol.md §2).
MANIFEST_FILE_NAME = "manifest.json"


@dataclass(frozen=True)
class ArtifactSpec:
    """One file of a version being registered."""

    file_name: str
    sha256: str
    size_bytes: int
    partition: str
    layer: int | None = None
    expert_index: int | None = None


def canonical_manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The manifest as canonical JSON (sorted keys, compact, UTF-8): what is served for a version that lists no
    manifest.json file of its own."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def manifest_sha256(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest's canonical JSON (sorted keys, compact), so equal manifests hash equally."""
    return hashlib.sha256(canonical_manifest_bytes(manifest)).hexdigest()


def registered_manifest_sha256(manifest: dict[str, Any], artifacts: Sequence[ArtifactSpec]) -> str:
    """The manifest_sha256 a version is registered with: the sha256 of the bytes devices get for manifest.json.

    That is the listed manifest.json file's sha256 when the version has one (fednested writes it indented, so its
    bytes are not the canonical JSON), else the sha256 of the canonical JSON, which is then what is served.
    """
    listed = next((spec for spec in artifacts if spec.file_name == MANIFEST_FILE_NAME), None)
    return listed.sha256 if listed is not None else manifest_sha256(manifest)


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
        has_layer, has_index = spec.layer is not None, spec.expert_index is not None
        if has_layer != has_index:
            raise ValidationError(
                {
                    "artifacts": f"{where}: layer and expert_index go together: both for one expert's file, neither "
                    "for a fused file holding every expert"
                }
            )
        if has_layer and spec.partition != ArtifactPartition.EXPERT:
            raise ValidationError({"artifacts": f"{where}: layer and expert_index are only for expert files"})
        if (spec.partition == ArtifactPartition.MANIFEST) != (spec.file_name == MANIFEST_FILE_NAME):
            raise ValidationError({"artifacts": f"{where}: {MANIFEST_FILE_NAME} and only it has partition 'manifest'"})


def _store_error(field: str, message: str, problem: StoreProblem) -> ValidationError:
    return ValidationError({field: ValidationError(message, code=problem.value)})


def _checked_in_store(uri: str, artifacts: Sequence[ArtifactSpec]) -> str:
    """The `artifacts://` URI of the version's folder, after checking that the store holds each listed file with the
    size and sha256 it is registered with; ValidationError naming the file, relative to the store, otherwise.

    A manifest.json the version does not list is not looked for: the canonical JSON is served in its place.
    """
    root = artifact_root()
    try:
        canonical = store_uri(uri, root)
    except ValueError as error:
        raise _store_error(
            "artifact_uri",
            f"{error}: register versions with artifacts://<folder in the artifact store>",
            StoreProblem.OUTSIDE_STORE,
        ) from None
    folder = artifact_path(canonical, root)
    relative = store_relative(folder, root)
    if relative == ".":
        raise _store_error(
            "artifact_uri",
            f"{uri!r} names the artifact store itself, not a version's folder",
            StoreProblem.OUTSIDE_STORE,
        )
    if not folder.is_dir():
        raise _store_error(
            "artifact_uri", f"{uri!r}: the artifact store holds no folder {relative}", StoreProblem.NOT_IN_STORE
        )
    paths = []
    # Sizes first, for every file: a cheap check before any file is hashed.
    for position, spec in enumerate(artifacts):
        where = f"artifacts[{position}] ({spec.file_name!r})"
        name = f"{relative}/{spec.file_name}"
        try:
            path = file_inside(folder, spec.file_name)
        except ValueError as error:
            raise _store_error("artifacts", f"{where}: {error}", StoreProblem.OUTSIDE_STORE) from None
        if not path.is_file():
            raise _store_error(
                "artifacts", f"{where}: the artifact store holds no file {name}", StoreProblem.NOT_IN_STORE
            )
        size = path.stat().st_size
        if size != spec.size_bytes:
            raise _store_error(
                "artifacts",
                f"{where}: {name} has {size} bytes in the artifact store, the registration says {spec.size_bytes}",
                StoreProblem.SIZE_MISMATCH,
            )
        paths.append((where, name, path, spec.sha256))
    for where, name, path, expected in paths:
        actual = file_sha256(path)
        if actual != expected:
            raise _store_error(
                "artifacts",
                f"{where}: {name} has sha256 {actual} in the artifact store, the registration says {expected}",
                StoreProblem.SHA256_MISMATCH,
            )
    return canonical


@transaction.atomic
def create_model_family(
    *, name: str, architecture: str, actor: ActorLike, config: dict[str, Any] | None = None, description: str = ""
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
        created_by=as_actor(actor).user,
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
    actor: ActorLike,
    parent: ModelVersion | None = None,
    datasets: Iterable[str] = (),
    runs: Iterable[str] = (),
    contributing_updates: Iterable[str] = (),
) -> ModelVersion:
    """Register an immutable version as a candidate, with its files and lineage edges.

    `artifact_uri` names the version's folder in the artifact store (artifacts://, or a file:// URI or relative path
    inside it); it is recorded as `artifacts://<folder>`, relative to the store, and every listed file must lie there
    with its size and sha256. A version id is used once: registering it again is an error, never an overwrite.
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
    artifact_uri = _checked_in_store(artifact_uri, artifacts)
    party = as_actor(actor)
    try:
        with transaction.atomic():
            version = ModelVersion.objects.create(
                version_id=version_id,
                family=family,
                parent=parent,
                manifest=manifest,
                manifest_sha256=registered_manifest_sha256(manifest, artifacts),
                artifact_uri=artifact_uri,
                status=VersionStatus.CANDIDATE,
                created_by=party.user,
                created_by_label=party.label,
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
        actor=party,
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


# fednested manifest file partitions → registry artifact partitions. The fused experts file holds every expert of
# every layer, so it is registered without a layer or expert index.
REGISTRY_PARTITIONS = {
    "core": ArtifactPartition.CORE,
    "experts": ArtifactPartition.EXPERT,
    "gate": ArtifactPartition.GATE,
    "config": ArtifactPartition.CONFIG,
    "tokenizer": ArtifactPartition.TOKENIZER,
    "safeguards": ArtifactPartition.SAFEGUARDS,
}


def saved_version_artifacts(directory: Path, manifest: Manifest) -> list[ArtifactSpec]:
    """Registry entries for every file of a saved version (sha256 and size as its manifest records them) and for
    its manifest.json itself (hashed as it lies on disk: devices download and check it first)."""
    specs = [
        ArtifactSpec(
            file_name=name, sha256=entry.sha256, size_bytes=entry.bytes, partition=REGISTRY_PARTITIONS[entry.partition]
        )
        for name, entry in sorted(manifest.files.items())
    ]
    manifest_file = directory / MANIFEST_NAME
    specs.append(
        ArtifactSpec(
            file_name=MANIFEST_NAME,
            sha256=file_sha256(manifest_file),
            size_bytes=manifest_file.stat().st_size,
            partition=ArtifactPartition.MANIFEST,
        )
    )
    return specs


@transaction.atomic
def register_saved_version(
    directory: Path,
    *,
    family: ModelFamily,
    actor: ActorLike,
    parent: ModelVersion | None = None,
    datasets: Iterable[str] = (),
    runs: Iterable[str] = (),
    contributing_updates: Iterable[str] = (),
) -> ModelVersion:
    """Register a version directory written by `fednested.checkpoints.save_version` (inside the artifact store): its
    manifest, every file's sha256 (`register_version` checks them against the files) and its lineage. The one way a
    saved directory enters the registry."""
    root = artifact_root()
    try:
        relative = store_relative(directory, root)
    except ValueError as error:
        raise ValidationError({"directory": f"{error}: save versions under the store's versions/ folder"}) from None
    try:
        manifest = read_manifest(directory)
    except CheckpointError as error:
        raise ValidationError({"directory": redact_store_paths(str(error), root)}) from error
    if manifest.parent_version != (parent.version_id if parent is not None else None):
        raise ValidationError(
            {
                "parent": f"the manifest names parent {manifest.parent_version!r}, the registration "
                f"{parent.version_id if parent is not None else None!r}"
            }
        )
    return register_version(
        family=family,
        version_id=manifest.version_id,
        manifest=manifest.to_dict(),
        artifacts=saved_version_artifacts(directory, manifest),
        artifact_uri=artifact_uri(relative),
        actor=actor,
        parent=parent,
        datasets=datasets,
        runs=runs,
        contributing_updates=contributing_updates,
    )


@transaction.atomic
def set_version_status(version: ModelVersion, status: str, *, actor: ActorLike) -> ModelVersion:
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
        verb="registry.version.status_changed",
        target=version,
        data={"version_id": version.version_id, "from": old_status, "to": status},
    )
    return version


@transaction.atomic
def move_alias(*, name: str, version: ModelVersion, actor: ActorLike) -> Alias:
    """Point alias `name` at `version` (creating the alias on first use); audited with the old and new target."""
    if not SLUG_PATTERN.match(name):
        raise ValidationError({"name": f"alias {name!r} must be a lowercase slug"})
    user = as_actor(actor).user
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
        verb="registry.alias.moved",
        target=alias,
        data={"alias": name, "from": previous, "to": version.version_id},
    )
    return alias


# --- evaluations ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DomainEvaluation:
    """One domain's held-out scores of a version, and (optionally) its parent's on the same held-out set."""

    domain: str
    loss: float
    perplexity: float | None  # None when exp(loss) overflows
    tokens: int
    records: int = 0
    parent_loss: float | None = None
    parent_perplexity: float | None = None


def _check_score(where: str, name: str, value: Any, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValidationError({"results": f"{where}: {name} must be a finite number, got {value!r}"})
    if value < 0 or (positive and value == 0):
        raise ValidationError({"results": f"{where}: {name} must be {'> 0' if positive else '>= 0'}, got {value!r}"})
    return float(value)


def _check_evaluations(results: Sequence[DomainEvaluation], parent: ModelVersion | None) -> None:
    if not results:
        raise ValidationError({"results": "an evaluation needs at least one domain's scores"})
    seen: set[str] = set()
    for position, result in enumerate(results):
        where = f"results[{position}] ({result.domain!r})"
        if not isinstance(result.domain, str) or not DOMAIN_PATTERN.match(result.domain):
            raise ValidationError({"results": f"{where}: domain must use only A-Z a-z 0-9 . _ - (≤100)"})
        if result.domain in seen:
            raise ValidationError({"results": f"{where}: domain listed twice"})
        seen.add(result.domain)
        _check_score(where, "loss", result.loss, positive=False)
        if result.perplexity is not None:
            _check_score(where, "perplexity", result.perplexity, positive=True)
        for name, count in (("tokens", result.tokens), ("records", result.records)):
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValidationError({"results": f"{where}: {name} must be an integer >= 0, got {count!r}"})
        if result.tokens == 0:
            raise ValidationError({"results": f"{where}: no tokens were scored, so the loss means nothing"})
        has_parent_scores = result.parent_loss is not None or result.parent_perplexity is not None
        if has_parent_scores and parent is None:
            raise ValidationError({"results": f"{where}: parent scores given, but the version has no parent"})
        if result.parent_loss is not None:
            _check_score(where, "parent_loss", result.parent_loss, positive=False)
        if result.parent_perplexity is not None:
            _check_score(where, "parent_perplexity", result.parent_perplexity, positive=True)


@transaction.atomic
def record_version_evaluation(
    version: ModelVersion,
    results: Sequence[DomainEvaluation],
    *,
    actor: Actor,
    heldout: str = "",
) -> list[VersionEvaluation]:
    """Record a version's per-domain held-out scores (with its parent's, for before/after); audited.

    The scores replace any earlier evaluation of the version: the rows always describe one run on one held-out
    set, so the before/after columns compare like with like. Earlier runs stay in the audit trail.
    """
    version = ModelVersion.objects.select_for_update(of=("self",)).select_related("parent").get(pk=version.pk)
    parent = version.parent
    _check_evaluations(results, parent)
    previous = sorted(version.evaluations.values_list("domain", flat=True))
    version.evaluations.all().delete()
    now = timezone.now()
    rows = VersionEvaluation.objects.bulk_create(
        VersionEvaluation(
            version=version,
            domain=result.domain,
            loss=float(result.loss),
            perplexity=result.perplexity,
            tokens=result.tokens,
            records=result.records,
            parent_version=parent if result.parent_loss is not None else None,
            parent_loss=result.parent_loss,
            parent_perplexity=result.parent_perplexity,
            heldout=heldout[:500],
            evaluated_by_label=actor.label,
            evaluated_at=now,
        )
        for result in sorted(results, key=lambda result: result.domain)
    )
    parent_domains = {
        result.domain: {"loss": result.parent_loss, "perplexity": result.parent_perplexity}
        for result in results
        if result.parent_loss is not None
    }
    record_audit_event(
        actor=actor,
        verb="registry.version.evaluated",
        target=version,
        data={
            "version_id": version.version_id,
            "parent": parent.version_id if parent is not None else None,
            "heldout": heldout,
            "domains": {
                result.domain: {
                    "loss": result.loss,
                    "perplexity": result.perplexity,
                    "tokens": result.tokens,
                    "records": result.records,
                }
                for result in results
            },
            "parent_domains": parent_domains or None,
            "replaced_domains": previous,
        },
    )
    return rows
