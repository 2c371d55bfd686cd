"""DataHub lineage: which changes are mirrored (an outbox row each) and how the relay delivers them.

`enqueue_datahub_sync` follows `audit_recorded` (connected in GovernanceConfig.ready): a version registered, its
status or aliases changed, a job finished. It writes an outbox row of kind DATAHUB in the change's own transaction,
holding references only (a version id, a task's primary key), so the approval or the job never waits for DataHub and
a DataHub that is down loses nothing. `deliver_datahub`, run by the relay, reads the database as it is then, builds
the metadata change proposals (fednested/governance/datahub.py) and writes them to the sink: the JSON file
FEDNESTED_DATAHUB_FILE by default (a metadata file `datahub check metadata-file` and `datahub ingest` read), or a
DataHub GMS over REST when FEDNESTED_DATAHUB_GMS_URL is set. A sink that refuses raises: the relay retries with
backoff; a GMS answer that no retry can change (400, 413, 422) parks the row with the server's message.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.conf import settings

from apps.federation.choices import TaskKind, TaskStatus, parse_task_run_ref, task_run_ref
from apps.federation.models import TrainingTask, Update
from apps.governance.models import AuditEvent
from apps.outbox.choices import OutboxKind
from apps.outbox.handlers import Delivery, Undeliverable
from apps.outbox.models import OutboxEvent
from apps.outbox.services import enqueue
from apps.registry.choices import LineageKind
from apps.registry.models import Alias, LineageEdge, ModelVersion, VersionEvaluation

if TYPE_CHECKING:
    # acryl-datahub takes most of a second to import: every process loads this module (the receiver is connected at
    # start-up), only the relay delivers, so the library is imported where a row is delivered.
    from datahub.emitter.mcp import MetadataChangeProposalWrapper

    from fednested.governance.datahub import DatasetFacts, ModelFacts, RunFacts

logger = logging.getLogger(__name__)

# The changes DataHub mirrors, by audit verb (apps/registry/services.py, apps/federation/services.py).
VERSION_VERBS = frozenset({"registry.version.registered", "registry.version.status_changed", "registry.alias.moved"})
TASK_VERBS = frozenset(
    {f"federation.task.{status}" for status in (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED)}
)
# The environment (DataHub "fabric") every URN names.
DATAHUB_ENV = "PROD"
# A GMS answer no retry changes: the proposal itself is refused (malformed, too large, unprocessable). Any other
# refusal (401/403 until the token is fixed, 404 until the URL is, 429, 5xx) is retried.
PERMANENT_HTTP_STATUSES = frozenset({400, 413, 422})
# Bound on one call to the GMS, so a server that accepts the connection and never answers cannot hold the relay.
GMS_TIMEOUT_S = 30.0


# --- which changes are mirrored --------------------------------------------------------------------------------------


def enqueue_datahub_sync(sender: object, *, event: AuditEvent, target: object = None, **kwargs: Any) -> None:
    """Receiver of `audit_recorded`: an outbox row naming the version or task DataHub must show anew (in the
    change's transaction); nothing for an event DataHub does not mirror, or with FEDNESTED_DATAHUB_ENABLED off."""
    if not settings.FEDNESTED_DATAHUB_ENABLED:
        return
    payload: dict[str, object]
    if event.verb in VERSION_VERBS:
        version = target.version if isinstance(target, Alias) else target
        if not isinstance(version, ModelVersion):
            return
        payload = {"version_id": version.version_id}
        key = version.version_id
    elif event.verb in TASK_VERBS and isinstance(target, TrainingTask):
        payload = {"task_pk": target.pk}
        key = task_run_ref(target.kind, target.pk)
    else:
        return
    enqueue(OutboxKind.DATAHUB, payload={**payload, "audit_event": event.pk}, key=key)


# --- what the database says ------------------------------------------------------------------------------------------


def task_of_run(ref: str) -> TrainingTask | None:
    """The job a lineage run name refers to, or None for a run no job of ours ran (e.g. the bootstrap's)."""
    # A job's run is named by apps.federation.choices.task_run_ref (the workers' lineage edges, the MLflow runs and
    # DataHub's DataProcessInstance ids are one name); a name whose kind is not the task's refers to no job of ours.
    parsed = parse_task_run_ref(ref)
    if parsed is None:
        return None
    kind, pk = parsed
    task = TrainingTask.objects.select_related("round", "created_by").filter(pk=pk).first()
    return task if task is not None and task.kind == kind else None


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def update_dataset(update: Update) -> DatasetFacts:
    """An edge update as a dataset: its device's domain and references, never its tensors or messages."""
    from fednested.governance.datahub import DatasetFacts

    return DatasetFacts(
        name=update.update_id,
        kind="update",
        properties={
            "domain": update.device.domain or "unspecified",
            "device": update.device.client_id,
            "examples": str(update.examples),
            "payload_sha256": update.payload_sha256,
            "payload_bytes": str(update.payload_bytes),
            "base_version": update.base_version.version_id,
            "staleness": "" if update.staleness is None else str(update.staleness),
            "status": update.status,
            "round": update.round.round_id if update.round is not None else "",
        },
    )


def _updates(update_ids: Sequence[str]) -> list[Update]:
    return list(
        Update.objects.filter(update_id__in=update_ids)
        .select_related("device", "base_version", "round")
        .order_by("update_id")
    )


def model_facts(version: ModelVersion) -> ModelFacts:
    """A version as DataHub shows it: status, parent, digest, aliases, the runs that made and evaluated it."""
    from fednested.governance.datahub import ModelFacts

    evaluations = TrainingTask.objects.filter(kind=TaskKind.EVALUATION, params__version_id=version.version_id)
    return ModelFacts(
        family=version.family.name,
        version_id=version.version_id,
        created_ms=_ms(version.created_at),
        status=version.status,
        parent=version.parent.version_id if version.parent is not None else None,
        manifest_sha256=version.manifest_sha256,
        aliases=sorted(version.aliases.values_list("name", flat=True)),
        training_runs=list(
            version.lineage_edges.filter(kind=LineageKind.RUN)
            .order_by("source_ref")
            .values_list("source_ref", flat=True)
        ),
        evaluation_runs=[task_run_ref(task.kind, task.pk) for task in evaluations.order_by("pk")],
    )


def run_facts(ref: str) -> tuple[RunFacts, list[DatasetFacts], list[ModelVersion]]:
    """A run as DataHub shows it, with its input datasets and the versions it produced (or evaluated).

    Inputs: the training datasets and edge updates in the lineage of the versions it produced, and their parents;
    an aggregation that produced nothing (it failed) still names the updates its window held; an evaluation's input
    is the version it scored, whose per-domain losses are its metrics.
    """
    from fednested.governance.datahub import DatasetFacts, RunFacts

    task = task_of_run(ref)
    edges = LineageEdge.objects.filter(kind=LineageKind.RUN, source_ref=ref).select_related("version__family")
    outputs = [edge.version for edge in edges.order_by("version__version_id")]
    input_edges = LineageEdge.objects.filter(version__in=outputs).select_related("source_version__family")
    datasets = [
        DatasetFacts(name=edge.source_ref, kind="dataset", properties={"lineage": "training dataset"})
        for edge in input_edges.filter(kind=LineageKind.DATASET).order_by("source_ref")
    ]
    update_ids = list(input_edges.filter(kind=LineageKind.UPDATE).values_list("source_ref", flat=True))
    if task is not None and task.kind == TaskKind.EXPERT_AGGREGATION and not outputs and task.round is not None:
        update_ids = list(Update.objects.filter(round=task.round).values_list("update_id", flat=True))
    datasets.extend(update_dataset(update) for update in _updates(update_ids))
    input_models = [
        (edge.source_version.family.name, edge.source_version.version_id)
        for edge in input_edges.filter(kind=LineageKind.PARENT).order_by("source_ref")
        if edge.source_version is not None
    ]
    related = list(outputs)
    metrics: dict[str, float] = {}
    params: dict[str, object] = {}
    properties: dict[str, str] = {}
    if task is None:
        created = min((version.created_at for version in outputs), default=None)
        actor = outputs[0].created_by_label if outputs else "system"
        status, finished_ms, succeeded = "", None, None
        properties["source"] = "named in the registered lineage"
    else:
        created = task.started_at or task.created_at
        actor = task.created_by.get_username() if task.created_by is not None else "fednested"
        status = task.status
        finished = task.status in (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED)
        finished_ms = _ms(task.finished_at) if finished and task.finished_at is not None else None
        succeeded = task.status == TaskStatus.SUCCEEDED if finished else None
        params = dict(task.params)
        properties["task"] = str(task.pk)
        if task.round is not None:
            properties["round"] = task.round.round_id
        if task.kind == TaskKind.EVALUATION:
            scored = ModelVersion.objects.select_related("family").filter(version_id=params.get("version_id")).first()
            if scored is not None:
                related.append(scored)
                input_models.append((scored.family.name, scored.version_id))
                for evaluation in VersionEvaluation.objects.filter(version=scored).order_by("domain"):
                    metrics[f"loss.{evaluation.domain}"] = evaluation.loss
    run = RunFacts(
        ref=ref,
        kind=task.kind if task is not None else "registered run",
        created_ms=_ms(created) if created is not None else 0,
        actor=actor,
        status=status,
        finished_ms=finished_ms,
        succeeded=succeeded,
        inputs_datasets=[(dataset.name, dataset.kind) for dataset in datasets],
        inputs_models=input_models,
        outputs_models=[(version.family.name, version.version_id) for version in outputs],
        params=params,
        metrics=metrics,
        properties=properties,
    )
    return run, datasets, related


def proposals_for(payload: dict[str, Any]) -> list[MetadataChangeProposalWrapper]:
    """The proposals an outbox row stands for, from the database as it is now; Undeliverable when the row names
    nothing that exists (a payload no release of ours writes)."""
    from fednested.governance.datahub import lineage_proposals

    if isinstance(payload.get("version_id"), str):
        version = (
            ModelVersion.objects.select_related("family", "parent").filter(version_id=payload["version_id"]).first()
        )
        if version is None:
            raise Undeliverable(f"DataHub row names version {payload['version_id']!r}, which is not in the registry")
        refs = list(version.lineage_edges.filter(kind=LineageKind.RUN).values_list("source_ref", flat=True))
        seeds = [version]
    elif isinstance(payload.get("task_pk"), int) and not isinstance(payload.get("task_pk"), bool):
        task = TrainingTask.objects.filter(pk=payload["task_pk"]).first()
        if task is None:
            raise Undeliverable(f"DataHub row names training task {payload['task_pk']}, which does not exist")
        refs, seeds = [task_run_ref(task.kind, task.pk)], []
    else:
        raise Undeliverable(f"DataHub row payload {sorted(payload)} names neither a version_id nor a task_pk")
    runs: list[RunFacts] = []
    datasets: list[DatasetFacts] = []
    versions: dict[str, ModelVersion] = {version.version_id: version for version in seeds}
    for ref in sorted(set(refs)):
        run, inputs, related = run_facts(ref)
        runs.append(run)
        datasets.extend(inputs)
        versions.update((version.version_id, version) for version in related)
    models = [model_facts(version) for _, version in sorted(versions.items())]
    return lineage_proposals(models=models, runs=runs, datasets=datasets, env=DATAHUB_ENV)


# --- the sinks -------------------------------------------------------------------------------------------------------


def append_to_metadata_file(path: Path, proposals: Sequence[MetadataChangeProposalWrapper]) -> None:
    """Append `proposals` to the JSON array in `path` (creating it), in place and under an exclusive lock, so the
    file stays one valid metadata file however many relays write it. OSError when the file cannot be written;
    ValueError when it is not an array this sink could extend (a cut write: move it aside)."""
    if not proposals:
        return
    body = ",\n".join(json.dumps(proposal.to_obj(simplified_structure=True), indent=4) for proposal in proposals)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    with os.fdopen(fd, "r+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        end = handle.seek(0, os.SEEK_END)
        if end == 0:
            handle.write(f"[\n{body}\n]\n".encode())
        else:
            # Only the tail is read: the closing bracket and the character before it (an element, or "[").
            tail_start = max(0, end - 4096)
            handle.seek(tail_start)
            tail = handle.read().rstrip()
            if not tail.endswith(b"]"):
                raise ValueError(
                    f"DataHub metadata file {path} does not end with ']': it is not a file this sink wrote, or a write "
                    "was cut; move it aside (the relay retries and starts a new one)"
                )
            bracket = tail_start + len(tail) - 1
            empty = tail[:-1].rstrip().endswith(b"[")
            handle.seek(bracket)
            handle.write(f"{'' if empty else ','}\n{body}\n]\n".encode())
            handle.truncate()
        handle.flush()
        os.fsync(handle.fileno())


def emit_to_gms(url: str, token: str, proposals: Sequence[MetadataChangeProposalWrapper]) -> None:
    """Send `proposals` to a DataHub GMS in one batch (Rest.li `ingestProposalBatch`), with no retries of the
    emitter's own: the relay retries the row. Undeliverable when the GMS refuses them for good."""
    from datahub.configuration.common import OperationalError
    from datahub.emitter.emit_mode import EmitMode
    from datahub.emitter.rest_emitter import DatahubRestEmitter

    emitter = DatahubRestEmitter(
        gms_server=url,
        token=token or None,
        timeout_sec=GMS_TIMEOUT_S,
        retry_max_times=0,
        openapi_ingestion=False,
    )
    try:
        emitter.emit_mcps(list(proposals), emit_mode=EmitMode.SYNC_PRIMARY)
    except OperationalError as error:
        response = getattr(error.__cause__, "response", None)
        status = getattr(response, "status_code", None)
        if status in PERMANENT_HTTP_STATUSES:
            # The emitter's first argument carries the server's own message.
            detail = error.args[0] if error.args else str(error)
            raise Undeliverable(f"DataHub GMS at {url} refused the proposals (HTTP {status}): {detail}") from error
        raise
    finally:
        emitter.close()


def deliver_datahub(row: OutboxEvent, delivery: Delivery) -> None:
    """Outbox handler of kind DATAHUB: the row's proposals, built now, to the configured sink."""
    proposals = proposals_for(dict(row.payload))
    url = settings.FEDNESTED_DATAHUB_GMS_URL
    if url:
        emit_to_gms(url, settings.FEDNESTED_DATAHUB_GMS_TOKEN, proposals)
        where = url
    else:
        append_to_metadata_file(settings.FEDNESTED_DATAHUB_FILE, proposals)
        where = str(settings.FEDNESTED_DATAHUB_FILE)
    logger.info("DataHub: %d proposals for %s to %s", len(proposals), row.key or row.event_id, where)
