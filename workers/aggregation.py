"""Aggregation job (middle loop): a round's buffered edge updates → per-expert weighted deltas → a candidate version.

`aggregate_round_task(task_pk)` runs one TrainingTask of kind expert_aggregation. It claims the task and then the
round with conditional updates (so two workers never aggregate one round), re-checks every buffered payload, merges
W_e ← W_e + η·ΔW_e into the base version, saves and registers the candidate with its lineage, marks the updates
applied, closes the round and starts the candidate's evaluation — the registry writes in one transaction. When it
fails after claiming the round, the round is reopened (its updates stay buffered) and the task is marked failed.
"""

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import shared_task
from django.conf import settings
from django.db import InterfaceError, OperationalError, transaction

from apps.federation.choices import RoundStatus, TaskKind
from apps.federation.models import Round, TrainingTask, Update
from apps.federation.services import (
    claim_round_for_aggregation,
    close_round,
    create_training_task,
    fail_training_task,
    finish_training_task,
    mark_updates_applied,
    reject_update,
    reopen_round_after_failure,
    start_training_task,
)
from apps.registry.choices import ArtifactPartition
from apps.registry.models import ModelVersion
from apps.registry.services import ArtifactSpec, register_version
from apps.registry.storage import artifact_path
from fednested.aggregation import (
    RejectionCode,
    UpdateFacts,
    UpdateRejected,
    aggregate_expert_deltas,
    expert_weights,
    validate_update,
)
from fednested.aggregation.settings import RoundAggregationSettings
from fednested.checkpoints import MANIFEST_NAME, Manifest, file_sha256, load_version, save_version
from fednested.data.tokenizer import load_tokenizer
from fednested.deltas import ExpertDeltas, expert_deltas_from_adapters, expert_param_shapes, merge_expert_deltas
from fednested.messaging import AdapterSummary
from workers.payloads import adapter_config_of, decode_adapters, fetch_payload
from workers.rounds import buffered_updates, champion_version, round_settings, staleness_of

logger = logging.getLogger(__name__)

ACTOR_LABEL = "worker:aggregation"
# fednested manifest file partitions → registry artifact partitions. The fused experts file holds every expert of
# every layer, so it is registered without a layer or expert index.
_REGISTRY_PARTITIONS = {
    "core": ArtifactPartition.CORE,
    "experts": ArtifactPartition.EXPERT,
    "gate": ArtifactPartition.GATE,
    "config": ArtifactPartition.CONFIG,
    "tokenizer": ArtifactPartition.TOKENIZER,
}


@dataclass(frozen=True)
class Contribution:
    """One buffered update, re-checked: its dense deltas and the facts its weights come from."""

    update: Update
    deltas: ExpertDeltas
    facts: UpdateFacts[str]


@dataclass(frozen=True)
class AggregationOutcome:
    """What one aggregation produced: the candidate (None if nothing could be aggregated) and what went where."""

    round_id: str
    version_id: str | None
    applied: tuple[str, ...]
    rejected: dict[str, str]
    weights: dict[str, dict[str, float]]


class CandidateAlreadyRegistered(RuntimeError):
    """The round's candidate version id is already registered, so aggregating it again would clobber its files."""


def candidate_version_id(round_: Round) -> str:
    """The candidate's id: one per round, so a retried task cannot register a second candidate for it."""
    return f"{round_.round_id}-candidate"


def contribution_of(
    update: Update,
    *,
    base_manifest: Manifest,
    shapes: dict[str, tuple[int, int, int]],
    settings_: RoundAggregationSettings,
    champion: ModelVersion | None,
    artifact_root: Path,
) -> Contribution:
    """Fetch, re-check (sha256, tensors, norms, staleness against today's champion) and densify one update."""
    client_id = update.device.client_id
    staleness = staleness_of(update.base_version, champion)
    if staleness is None or staleness > settings_.max_staleness:
        behind = "is off the champion's lineage" if staleness is None else f"is {staleness} versions behind"
        raise UpdateRejected(
            RejectionCode.TOO_STALE,
            f"by aggregation time its base {update.base_version.version_id!r} {behind} the champion "
            f"(limit {settings_.max_staleness})",
            client_id=client_id,
        )
    envelope: dict[str, Any] = update.envelope
    config = adapter_config_of(AdapterSummary.model_validate(envelope["adapter"], strict=False), client_id=client_id)
    raw = fetch_payload(
        update.payload_uri,
        sha256=update.payload_sha256,
        size_bytes=update.payload_bytes,
        max_bytes=settings_.limits.max_bytes,
        root=artifact_root,
        client_id=client_id,
    )
    validated = validate_update(
        decode_adapters(raw, client_id=client_id), config, base_manifest, settings_.limits, client_id=client_id
    )
    facts = UpdateFacts(
        update_id=update.update_id,
        experts=validated.experts,
        staleness=staleness,
        examples=update.examples,
        routed_tokens={str(expert): int(tokens) for expert, tokens in update.routed_tokens.items()},
    )
    return Contribution(
        update=update, deltas=expert_deltas_from_adapters(validated.adapters, config, shapes), facts=facts
    )


def artifact_specs(manifest: Manifest) -> list[ArtifactSpec]:
    """Registry file entries for every file of a saved version, from its manifest (sha256 and sizes as recorded)."""
    return [
        ArtifactSpec(
            file_name=name, sha256=entry.sha256, size_bytes=entry.bytes, partition=_REGISTRY_PARTITIONS[entry.partition]
        )
        for name, entry in sorted(manifest.files.items())
    ]


def aggregate_round(task: TrainingTask) -> AggregationOutcome | None:
    """Aggregate the task's round into a candidate; None when another task already claimed the round."""
    round_ = task.round
    if round_ is None:
        raise ValueError(f"task {task.pk}: an expert_aggregation task needs a round")
    if not claim_round_for_aggregation(round_, actor_label=ACTOR_LABEL):
        logger.info("round %s is %s; task %s leaves it alone", round_.round_id, round_.status, task.pk)
        return None
    try:
        return _aggregate_claimed_round(task, round_)
    except Exception as error:
        # This task holds the round: hand it back, buffered updates and all, rather than leave it aggregating.
        reopen_round_after_failure(
            round_, reason=f"task {task.pk}: {type(error).__name__}: {error}", actor_label=ACTOR_LABEL
        )
        raise


def _aggregate_claimed_round(task: TrainingTask, round_: Round) -> AggregationOutcome:
    settings_ = round_settings(round_)
    artifact_root = Path(settings.FEDNESTED_ARTIFACT_ROOT)
    base = round_.base_version
    base_directory = artifact_path(base.artifact_uri, artifact_root)
    model, base_manifest = load_version(base_directory, expected_version=base.version_id)
    shapes = expert_param_shapes(model)
    champion = champion_version()
    contributions: list[Contribution] = []
    rejected: dict[str, str] = {}
    for update in buffered_updates(round_):
        try:
            contributions.append(
                contribution_of(
                    update,
                    base_manifest=base_manifest,
                    shapes=shapes,
                    settings_=settings_,
                    champion=champion,
                    artifact_root=artifact_root,
                )
            )
        except UpdateRejected as rejection:
            reject_update(update, rejection.code.value, f"at aggregation: {rejection.message}", actor_label=ACTOR_LABEL)
            rejected[update.update_id] = rejection.code.value
    if not contributions:
        close_round(
            round_,
            actor=None,
            actor_label=ACTOR_LABEL,
            status=RoundStatus.CANCELLED,
            reason=f"no buffered update passed re-validation ({len(rejected)} rejected)",
        )
        return AggregationOutcome(round_.round_id, None, (), rejected, {})
    aggregation = settings_.aggregation
    weights = expert_weights([contribution.facts for contribution in contributions], aggregation.weighting)
    aggregated = aggregate_expert_deltas(
        [(contribution.deltas, weight) for contribution, weight in zip(contributions, weights, strict=True)],
        method=aggregation.method,
        clip_norm=aggregation.clip_norm,
        trim_fraction=aggregation.trim_fraction,
    )
    merge_expert_deltas(model, aggregated, eta=aggregation.server_learning_rate)
    applied = tuple(contribution.update.update_id for contribution in contributions)
    weights_by_update = dict(zip(applied, weights, strict=True))
    version_id = candidate_version_id(round_)
    directory = artifact_root / "versions" / version_id
    if ModelVersion.objects.filter(version_id=version_id).exists():
        # Never overwrite (or delete) the files of a registered version: they are what its registry entry vouches for.
        raise CandidateAlreadyRegistered(
            f"round {round_.round_id}: model version {version_id!r} is already registered; "
            f"its files under {directory} are left as they are"
        )
    if directory.exists():
        # Left by an attempt that died before registering it; nothing refers to an unregistered directory.
        shutil.rmtree(directory)
    has_tokenizer = any(entry.partition == "tokenizer" for entry in base_manifest.files.values())
    manifest = save_version(
        model,
        directory,
        version_id=version_id,
        parent_version=base.version_id,
        tokenizer=load_tokenizer(base_directory) if has_tokenizer else None,
        lineage={
            "round": round_.round_id,
            "task": task.pk,
            "updates": list(applied),
            "aggregation": {
                "method": aggregation.method,
                "clip_norm": aggregation.clip_norm,
                "trim_fraction": aggregation.trim_fraction,
                "server_learning_rate": aggregation.server_learning_rate,
                "staleness_exponent": aggregation.weighting.staleness_exponent,
                "weights": weights_by_update,
            },
        },
    )
    specs = [
        *artifact_specs(manifest),
        ArtifactSpec(
            file_name=MANIFEST_NAME,
            sha256=file_sha256(directory / MANIFEST_NAME),
            size_bytes=(directory / MANIFEST_NAME).stat().st_size,
            partition=ArtifactPartition.MANIFEST,
        ),
    ]
    with transaction.atomic():
        version = register_version(
            family=base.family,
            version_id=version_id,
            manifest=manifest.to_dict(),
            artifacts=specs,
            artifact_uri=directory.resolve().as_uri(),
            actor=None,
            actor_label=ACTOR_LABEL,
            parent=base,
            runs=[f"aggregation-task-{task.pk}"],
            contributing_updates=applied,
        )
        mark_updates_applied(
            [contribution.update for contribution in contributions], version=version, actor_label=ACTOR_LABEL
        )
        close_round(
            round_, actor=None, actor_label=ACTOR_LABEL, reason=f"aggregated {len(applied)} updates into {version_id}"
        )
        create_training_task(
            kind=TaskKind.EVALUATION,
            actor=None,
            round_=round_,
            params={"version_id": version_id, "round_id": round_.round_id},
        )
    logger.info(
        "round %s: %d updates → candidate %s (%d rejected)", round_.round_id, len(applied), version_id, len(rejected)
    )
    return AggregationOutcome(round_.round_id, version_id, applied, rejected, weights_by_update)


@shared_task(  # type: ignore[untyped-decorator]
    name="workers.aggregation.aggregate_round_task",
    acks_late=True,
    # Only errors raised before the task row is claimed are retried: after the claim a retry finds the row running
    # and does nothing, so the failure is recorded on the row instead.
    autoretry_for=(OperationalError, InterfaceError),
    retry_backoff=True,
    max_retries=5,
)
def aggregate_round_task(task_pk: int) -> str | None:
    """Run TrainingTask `task_pk` (kind expert_aggregation); returns the candidate's version id, if one was made."""
    if not start_training_task(task_pk, actor_label=ACTOR_LABEL):
        logger.info("training task %s is not pending; another worker has it", task_pk)
        return None
    task = TrainingTask.objects.select_related("round__base_version__family").get(pk=task_pk)
    try:
        outcome = aggregate_round(task)
    except Exception as error:
        fail_training_task(task_pk, error=f"{type(error).__name__}: {error}", actor_label=ACTOR_LABEL)
        raise
    finish_training_task(task_pk, actor_label=ACTOR_LABEL)
    return outcome.version_id if outcome is not None else None
