"""MLflow mirror of the jobs and the registry: which changes it follows (an outbox row each) and how the relay delivers
them. Django stays the source of truth; MLflow is where data scientists look.

`enqueue_mlflow_sync` follows `audit_recorded` (connected in GovernanceConfig.ready): a job finished, a version
registered, its status changed, an alias moved. It writes an outbox row of kind MLFLOW in the change's own
transaction, holding references only (a task's primary key, a version id), so an approval never waits for MLflow and
an MLflow server that is down loses nothing: the relay retries the row with backoff. `deliver_mlflow`, run by the
relay, reads the database as it is then and brings MLflow in line with it:

- every training, aggregation, core-update and evaluation job is one MLflow run in the experiment
  FEDNESTED_MLFLOW_EXPERIMENT: the task's params and its round's config as params, per-domain evaluation scores and the
  aggregation's figures as metrics, the version's manifest and lineage (and the round's record) as artifacts, tags
  linking the task, the round, the version and the updates;
- every model version is a version of the registered model named after its family (source: its `artifacts://`
  folder; tags: version_id, manifest_sha256), and the registered model's aliases follow the registry: each Django
  alias (`champion`) on the version it points at, `candidate` on the family's newest candidate.

Delivering a row twice changes nothing: runs are found by their `fednested.task` tag and model versions by their
`version_id` tag before anything is created. Once MLflow holds a run or a model version, an audit event records
where (verbs in MLFLOW_LINK_VERBS), which is what the version page and the API link to.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import transaction

from apps.federation.choices import TaskKind, TaskStatus, parse_task_run_ref, task_run_ref
from apps.federation.models import TrainingTask
from apps.governance.actors import Actor
from apps.governance.audit import record_audit_event
from apps.governance.models import AuditEvent
from apps.outbox.choices import OutboxKind
from apps.outbox.handlers import Delivery, Undeliverable
from apps.outbox.models import OutboxEvent
from apps.outbox.services import enqueue
from apps.registry.choices import CANDIDATE_ALIAS, LineageKind, VersionStatus
from apps.registry.models import Alias, ForgettingReport, ModelVersion, VersionEvaluation

if TYPE_CHECKING:
    # mlflow takes about a second to import: every process loads this module (the receiver is connected at start-up),
    # only the relay delivers, so the client is imported where a row is delivered.
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion as MlflowModelVersion

logger = logging.getLogger(__name__)

# The value of FEDNESTED_MLFLOW_TRACKING_URI that turns the mirror off: no rows are written, none delivered.
MLFLOW_OFF = "off"
# Who the audit events of the mirror name.
ACTOR = Actor.automation("worker:mlflow-sync")
# The changes MLflow mirrors, by audit verb (apps/federation/services.py, apps/registry/services.py).
TASK_VERBS = frozenset(
    {f"federation.task.{status}" for status in (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED)}
)
VERSION_VERBS = frozenset({"registry.version.registered", "registry.version.status_changed"})
ALIAS_VERB = "registry.alias.moved"
# What the mirror records in the audit trail once MLflow holds something: a job's run (one event per version the run
# made or evaluated) and a version's registered model version. Their targets are the versions.
RUN_LOGGED_VERB = "governance.mlflow.run_logged"
MODEL_VERSION_VERB = "governance.mlflow.model_version_registered"
MLFLOW_LINK_VERBS = (RUN_LOGGED_VERB, MODEL_VERSION_VERB)
OP_LOG_JOB_RUN = "log_job_run"
OP_SYNC_VERSION = "sync_version"
RUN_STATUS: dict[str, str] = {
    TaskStatus.SUCCEEDED: "FINISHED",
    TaskStatus.FAILED: "FAILED",
    TaskStatus.CANCELLED: "KILLED",
}
# Tags the mirror sets on runs; TAG_TASK is how a run is found again.
TAG_TASK = "fednested.task"
TAG_COMPLETE = "fednested.complete"
# The tag of a model version naming the run of the job that made it.
TAG_RUN = "fednested.run"
# MLflow's limits (mlflow/utils/validation.py): longer values are refused, so they are cut with a note.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
# Keys MLflow accepts: alphanumerics, underscores, dashes, periods, spaces and slashes.
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")
# MLflow's REST client retries a refused connection 7 times with backoff (minutes) before it raises: the relay retries
# with its own backoff and must not hold its batch that long, so one try, bounded, unless the operator says otherwise.
# Nor print a "View run" line on stdout for each run it ends (the relay logs as JSON).
MLFLOW_CLIENT_ENVIRONMENT = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


def mirror_enabled() -> bool:
    return bool(settings.FEDNESTED_MLFLOW_TRACKING_URI) and settings.FEDNESTED_MLFLOW_TRACKING_URI != MLFLOW_OFF


# --- following the changes ------------------------------------------------------------------------------------------


def enqueue_mlflow_sync(sender: object, *, event: AuditEvent, target: object = None, **kwargs: object) -> None:
    """`audit_recorded` receiver: an MLFLOW outbox row, in the change's transaction, for each change MLflow mirrors.

    Rows hold references only; the handler reads what they name when it delivers, so a row delivered late still
    mirrors the current state (an approval that happened meanwhile included).
    """
    if not mirror_enabled():
        return
    verb = event.verb
    data = event.data if isinstance(event.data, dict) else {}
    if verb in TASK_VERBS and event.object_id:
        _enqueue({"op": OP_LOG_JOB_RUN, "task_pk": int(event.object_id)}, key=f"task:{event.object_id}")
    elif verb in VERSION_VERBS and isinstance(data.get("version_id"), str):
        _enqueue({"op": OP_SYNC_VERSION, "version_id": data["version_id"]}, key=f"version:{data['version_id']}")
    elif verb == ALIAS_VERB:
        # Both ends: the new target gains the alias, the family of the old one may lose it.
        for version_id in dict.fromkeys((data.get("to"), data.get("from"))):
            if isinstance(version_id, str):
                _enqueue({"op": OP_SYNC_VERSION, "version_id": version_id}, key=f"version:{version_id}")


def _enqueue(payload: dict[str, object], *, key: str) -> None:
    enqueue(OutboxKind.MLFLOW, payload=payload, key=key)


# --- delivering ------------------------------------------------------------------------------------------------------


def deliver_mlflow(row: OutboxEvent, delivery: Delivery) -> None:
    """Outbox handler of kind MLFLOW: bring MLflow in line with what the row names, as the database has it now.

    Raises Undeliverable for a row that can never succeed (unknown op, a task or version that no longer exists, an
    argument MLflow refuses); anything else (MLflow unreachable, a 5xx) propagates and the relay retries.
    """
    if not mirror_enabled():
        raise Undeliverable(
            f"outbox row {row.event_id}: the MLflow mirror is off (FEDNESTED_MLFLOW_TRACKING_URI={MLFLOW_OFF!r})"
        )
    payload = row.payload if isinstance(row.payload, dict) else {}
    op = payload.get("op")
    from mlflow.exceptions import MlflowException

    try:
        if op == OP_LOG_JOB_RUN and isinstance(payload.get("task_pk"), int):
            log_job_run(payload["task_pk"])
        elif op == OP_SYNC_VERSION and isinstance(payload.get("version_id"), str):
            sync_version(payload["version_id"])
        else:
            raise Undeliverable(
                f"outbox row {row.event_id}: an MLFLOW payload is {{'op': 'log_job_run', 'task_pk': int}} or "
                f"{{'op': 'sync_version', 'version_id': str}}, got {json.dumps(payload)[:200]}"
            )
    except MlflowException as error:
        # A request MLflow answered with "invalid" stays invalid; a connection failure or a server error may pass.
        if error.error_code == "INVALID_PARAMETER_VALUE":
            raise Undeliverable(f"outbox row {row.event_id}: MLflow refused it: {error.message[:500]}") from error
        raise


def mlflow_client() -> MlflowClient:
    """A client of FEDNESTED_MLFLOW_TRACKING_URI (tracking and registry in one store)."""
    for name, value in MLFLOW_CLIENT_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    from mlflow import MlflowClient

    uri = settings.FEDNESTED_MLFLOW_TRACKING_URI
    if uri.startswith("sqlite:///"):
        # SQLite cannot create the folder of its file.
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client: MlflowClient) -> str:
    """The id of experiment FEDNESTED_MLFLOW_EXPERIMENT, created on first use (artifacts under
    FEDNESTED_MLFLOW_ARTIFACT_ROOT for a local store; a server keeps them where it was told to)."""
    from mlflow.exceptions import MlflowException

    name = settings.FEDNESTED_MLFLOW_EXPERIMENT
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    location = None
    if not settings.FEDNESTED_MLFLOW_TRACKING_URI.startswith(("http://", "https://")):
        location = Path(settings.FEDNESTED_MLFLOW_ARTIFACT_ROOT).resolve().as_uri()
    try:
        return str(client.create_experiment(name, artifact_location=location))
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        # Another relay created it in between.
        again = client.get_experiment_by_name(name)
        if again is None:
            raise
        return str(again.experiment_id)


def _ms(moment: datetime | None) -> int | None:
    return int(moment.timestamp() * 1000) if moment is not None else None


def _key(raw: str) -> str:
    return _KEY_UNSAFE.sub("_", raw)[:MAX_KEY]


def _text(value: object, limit: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 20] + " …(cut by fednested)"


def _flatten(prefix: str, value: object, out: dict[str, str]) -> None:
    """Nested params as dotted keys (MLflow params are flat strings); lists stay one JSON value."""
    if isinstance(value, Mapping) and value:
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[_key(prefix)] = _text(value, MAX_PARAM_VALUE)


def _finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


@dataclass(frozen=True)
class JobRun:
    """What one job's run holds, read from the database (tests compare MLflow against it)."""

    name: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    artifacts: dict[str, dict[str, Any]]  # path in the run → JSON document
    versions: tuple[ModelVersion, ...]  # the versions the job made or evaluated
    made: tuple[ModelVersion, ...]  # the versions the job made


def job_run(task: TrainingTask) -> JobRun:
    """The run of `task` as the database describes it now."""
    # The name the workers give the run in a version's lineage edges (apps.federation.choices.task_run_ref), so a
    # version's RUN edge and the MLflow run are one name.
    name = task_run_ref(task.kind, task.pk)
    params: dict[str, str] = {}
    _flatten("params", task.params, params)
    params["kind"] = task.kind
    tags = {TAG_TASK: str(task.pk), "fednested.task_kind": task.kind, "fednested.status": task.status}
    metrics: dict[str, float] = {}
    artifacts: dict[str, dict[str, Any]] = {}
    round_ = task.round
    if round_ is not None:
        tags["fednested.round"] = round_.round_id
        params["round.id"] = round_.round_id
        params["round.mode"] = round_.mode
        params["round.buffer_size_k"] = str(round_.buffer_size_k)
        _flatten("round.config", round_.config, params)
    if task.error:
        tags["fednested.error"] = _text(task.error, MAX_TAG_VALUE)  # stored redacted of PII (_move_task)
    # The versions the job made (their lineage names this run) or evaluated (its params name the version).
    made = ModelVersion.objects.filter(lineage_edges__kind=LineageKind.RUN, lineage_edges__source_ref=name)
    versions = list(made.select_related("family", "parent").order_by("pk"))
    produced = tuple(versions)
    evaluated = task.params.get("version_id") if task.kind == TaskKind.EVALUATION else None
    if isinstance(evaluated, str):
        versions += list(ModelVersion.objects.filter(version_id=evaluated).select_related("family", "parent"))
    if versions:
        tags["fednested.version"] = ",".join(version.version_id for version in versions)[:MAX_TAG_VALUE]
    for version in versions:
        if version.parent is not None:
            tags["fednested.parent"] = version.parent.version_id
        updates = list(
            version.lineage_edges.filter(kind=LineageKind.UPDATE).order_by("pk").values_list("source_ref", flat=True)
        )
        if updates:
            tags["fednested.updates"] = _text(",".join(updates), MAX_TAG_VALUE)
        artifacts[f"versions/{version.version_id}/manifest.json"] = version.manifest
        artifacts[f"versions/{version.version_id}/lineage.json"] = version_lineage(version)
    if task.kind == TaskKind.EXPERT_AGGREGATION and round_ is not None and round_.record:
        artifacts["aggregation/record.json"] = round_.record
        metrics.update(aggregation_metrics(round_.record))
    if task.kind == TaskKind.CORE_UPDATE:
        for version in produced:
            metrics.update(core_update_metrics(version.manifest))
    if task.kind == TaskKind.EVALUATION:
        for version in versions:
            metrics.update(evaluation_metrics(version))
            artifacts[f"versions/{version.version_id}/evaluation.json"] = {
                "version_id": version.version_id,
                "domains": [
                    {
                        "domain": row.domain,
                        "loss": row.loss,
                        "perplexity": row.perplexity,
                        "tokens": row.tokens,
                        "records": row.records,
                        "parent_loss": row.parent_loss,
                        "parent_perplexity": row.parent_perplexity,
                        "heldout": row.heldout,
                    }
                    for row in VersionEvaluation.objects.filter(version=version).order_by("domain")
                ],
            }
    return JobRun(name, params, metrics, tags, artifacts, tuple(versions), produced)


def version_lineage(version: ModelVersion) -> dict[str, Any]:
    edges: dict[str, list[str]] = {}
    for kind, ref in version.lineage_edges.order_by("pk").values_list("kind", "source_ref"):
        edges.setdefault(kind, []).append(ref)
    return {
        "version_id": version.version_id,
        "family": version.family.name,
        "parent": version.parent.version_id if version.parent is not None else None,
        "manifest_sha256": version.manifest_sha256,
        "artifact_uri": version.artifact_uri,
        "edges": edges,
    }


def evaluation_metrics(version: ModelVersion) -> dict[str, float]:
    """Per-domain held-out scores (`<domain>/loss`, `/perplexity`, `/tokens`, the parent's as `/parent_loss`…) and
    the forgetting report's means, as the registry stores them."""
    metrics: dict[str, float] = {}
    for row in VersionEvaluation.objects.filter(version=version).order_by("domain"):
        for name in ("loss", "perplexity", "tokens", "records", "parent_loss", "parent_perplexity"):
            value = _finite(getattr(row, name))
            if value is not None:
                metrics[_key(f"{row.domain}/{name}")] = value
    report = ForgettingReport.objects.filter(version=version).first()
    if report is not None:
        for name in ("average_forgetting", "backward_transfer"):
            value = _finite(getattr(report, name))
            if value is not None:
                metrics[f"forgetting/{name}"] = value
    return metrics


def aggregation_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The aggregation's figures from its round record: how many updates went in and were rejected, their
    staleness and reliability (mean and max), and each update's weight."""
    metrics: dict[str, float] = {}
    raw_updates = record.get("updates")
    updates: Mapping[str, Any] = raw_updates if isinstance(raw_updates, Mapping) else {}
    rejected = record.get("rejected")
    metrics["updates/applied"] = float(len(updates))
    metrics["updates/rejected"] = float(len(rejected)) if isinstance(rejected, list | Mapping) else 0.0
    for figure in ("staleness", "reliability"):
        values = [
            value
            for entry in updates.values()
            if isinstance(entry, Mapping) and (value := _finite(entry.get(figure))) is not None
        ]
        if values:
            metrics[f"updates/{figure}_mean"] = sum(values) / len(values)
            metrics[f"updates/{figure}_max"] = max(values)
    aggregation = record.get("aggregation")
    weights = aggregation.get("weights") if isinstance(aggregation, Mapping) else None
    if isinstance(weights, Mapping):
        for update_id, weight in weights.items():
            value = _finite(weight)
            if value is not None:
                metrics[_key(f"weight/{update_id}")] = value
    return metrics


def core_update_metrics(manifest: Mapping[str, Any]) -> dict[str, float]:
    """A core update's training figures as its version's manifest records them (lineage.training: steps, first and
    last loss, tokens; fednested/tier1/core_update.py)."""
    lineage = manifest.get("lineage")
    training = lineage.get("training") if isinstance(lineage, Mapping) else None
    if not isinstance(training, Mapping):
        return {}
    return {
        _key(f"training/{name}"): value for name, raw in sorted(training.items()) if (value := _finite(raw)) is not None
    }


def find_job_run_id(client: MlflowClient, experiment: str, task_pk: int) -> tuple[str, bool] | None:
    """The run already logged for task `task_pk` (its id, and whether it was logged to the end), if any."""
    runs = client.search_runs(
        [experiment], filter_string=f"tags.`{TAG_TASK}` = '{task_pk}'", max_results=1, order_by=["start_time ASC"]
    )
    if not runs:
        return None
    return runs[0].info.run_id, runs[0].data.tags.get(TAG_COMPLETE) == "true"


def log_job_run(task_pk: int) -> str:
    """Log TrainingTask `task_pk` as an MLflow run (once: a run logged to the end is left alone); its run id."""
    from mlflow.entities import Metric, Param, RunTag

    task = TrainingTask.objects.select_related("round").filter(pk=task_pk).first()
    if task is None:
        raise Undeliverable(f"training task {task_pk} does not exist (any more); there is no run to log")
    client = mlflow_client()
    experiment = experiment_id(client)
    run = job_run(task)
    found = find_job_run_id(client, experiment, task.pk)
    if found is not None and found[1]:
        run_id = found[0]
    else:
        if found is not None:
            # An earlier delivery died half-way: the same run is completed (params are logged with the same values).
            run_id = found[0]
        else:
            created = client.create_run(
                experiment, start_time=_ms(task.started_at or task.created_at), tags=run.tags, run_name=run.name
            )
            run_id = created.info.run_id
        stamp = _ms(task.finished_at or task.started_at or task.created_at) or 0
        params = [Param(key, value) for key, value in sorted(run.params.items())]
        metrics = [Metric(key, value, stamp, 0) for key, value in sorted(run.metrics.items())]
        tags = [RunTag(key, value) for key, value in sorted(run.tags.items())]
        # log_batch takes at most 100 params and 1000 metrics per call.
        for start in range(0, max(len(params), len(metrics), 1), 100):
            client.log_batch(
                run_id,
                params=params[start : start + 100],
                metrics=metrics[start : start + 100],
                tags=tags if start == 0 else [],
            )
        for path, document in sorted(run.artifacts.items()):
            client.log_dict(run_id, document, path)
        if task.status in RUN_STATUS:
            client.set_terminated(run_id, status=RUN_STATUS[task.status], end_time=_ms(task.finished_at))
        client.set_tag(run_id, TAG_COMPLETE, "true")
    for version in run.made:
        # The version may be registered in MLflow before its job's run exists (the job registers, then finishes):
        # the run is tagged on the model version then, since a model version's run_id cannot be set later.
        mirrored = find_model_version(client, version.family.name, version.version_id)
        if mirrored is not None and mirrored.tags.get(TAG_RUN) != run_id:
            client.set_model_version_tag(version.family.name, mirrored.version, TAG_RUN, run_id)
    _record_links(
        RUN_LOGGED_VERB,
        run.versions,
        {"run_id": run_id, "experiment_id": experiment, "task": task.pk, "kind": task.kind},
        key="run_id",
    )
    return run_id


def _record_links(verb: str, versions: Iterable[ModelVersion], data: Mapping[str, object], *, key: str) -> None:
    """An audit event per version saying where MLflow holds it, unless one with the same `key` value already says so
    (a row delivered twice, a version synced again)."""
    with transaction.atomic():
        for version in versions:
            known = AuditEvent.objects.filter(verb=verb, object_type="registry.modelversion", object_id=str(version.pk))
            if any(isinstance(event.data, dict) and event.data.get(key) == data[key] for event in known):
                continue
            record_audit_event(
                actor=ACTOR,
                verb=verb,
                target=version,
                data={"version_id": version.version_id, **data},
            )


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def find_model_version(client: MlflowClient, model: str, version_id: str) -> MlflowModelVersion | None:
    found = client.search_model_versions(f"name = '{_quote(model)}' and tags.version_id = '{_quote(version_id)}'")
    return min(found, key=lambda item: int(item.version)) if found else None


def ensure_registered_model(client: MlflowClient, version: ModelVersion) -> str:
    from mlflow.exceptions import MlflowException

    name = version.family.name
    try:
        client.create_registered_model(
            name,
            tags={"fednested.family": name, "architecture": version.family.architecture},
            description=f"fednested model family {name!r}; mirrored from the control plane's registry.",
        )
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return name


def producing_run_id(client: MlflowClient, version: ModelVersion) -> str | None:
    """The MLflow run of the job that made `version`, if it is logged already (the job finishes after registering)."""
    refs = version.lineage_edges.filter(kind=LineageKind.RUN).values_list("source_ref", flat=True)
    experiment = experiment_id(client)
    for ref in refs:
        parsed = parse_task_run_ref(ref)
        if parsed is not None and parsed[0] in (TaskKind.EXPERT_AGGREGATION, TaskKind.CORE_UPDATE):
            found = find_job_run_id(client, experiment, parsed[1])
            if found is not None:
                return found[0]
    return None


def ensure_model_version(client: MlflowClient, version: ModelVersion) -> MlflowModelVersion:
    """`version` as a version of its family's registered model, created once; its status tag kept current."""
    model = ensure_registered_model(client, version)
    existing = find_model_version(client, model, version.version_id)
    if existing is None:
        run_id = producing_run_id(client, version)
        existing = client.create_model_version(
            model,
            source=version.artifact_uri,
            run_id=run_id,
            tags={
                "version_id": version.version_id,
                "manifest_sha256": version.manifest_sha256,
                "parent": version.parent.version_id if version.parent is not None else "",
                "status": version.status,
                **({TAG_RUN: run_id} if run_id else {}),
            },
            description=f"fednested version {version.version_id}",
        )
    elif existing.tags.get("status") != version.status:
        client.set_model_version_tag(model, existing.version, "status", version.status)
    link = f"{model}/{existing.version}"
    _record_links(
        MODEL_VERSION_VERB,
        [version],
        {"model": model, "model_version": str(existing.version), "link": link},
        key="link",
    )
    return existing


def desired_aliases(version: ModelVersion) -> dict[str, ModelVersion]:
    """The aliases the registered model of `version`'s family must carry, as the registry has them: each Django alias
    on a version of the family, and `candidate` on the family's newest candidate (unless Django names one itself)."""
    family = version.family
    wanted = {
        alias.name: alias.version
        for alias in Alias.objects.filter(version__family=family).select_related("version", "version__family")
    }
    if CANDIDATE_ALIAS not in wanted and not Alias.objects.filter(name=CANDIDATE_ALIAS).exists():
        newest = (
            ModelVersion.objects.filter(family=family, status=VersionStatus.CANDIDATE)
            .select_related("family", "parent")
            .order_by("-created_at", "-pk")
            .first()
        )
        if newest is not None:
            wanted[CANDIDATE_ALIAS] = newest
    return wanted


def sync_version(version_id: str) -> MlflowModelVersion:
    """Register `version_id` in MLflow (once), keep its status tag current and its family's aliases where the registry
    has them (moving, setting or deleting them)."""
    version = ModelVersion.objects.select_related("family", "parent").filter(version_id=version_id).first()
    if version is None:
        raise Undeliverable(f"version {version_id!r} does not exist in the registry; there is nothing to register")
    client = mlflow_client()
    mirrored = ensure_model_version(client, version)
    model = version.family.name
    current = dict(client.get_registered_model(model).aliases)
    wanted = desired_aliases(version)
    for alias, target in wanted.items():
        target_version = mirrored if target.pk == version.pk else ensure_model_version(client, target)
        if str(current.get(alias)) != str(target_version.version):
            client.set_registered_model_alias(model, alias, target_version.version)
    for alias in current:
        if alias not in wanted:
            client.delete_registered_model_alias(model, alias)
    return mirrored


# --- reading the links ------------------------------------------------------------------------------------------------


def mlflow_links(version: ModelVersion) -> dict[str, Any]:
    """Where MLflow holds `version`: its registered model version and the runs of the jobs that made or evaluated it
    (from the mirror's audit events), with UI links when FEDNESTED_MLFLOW_UI_URL is set."""
    ui = settings.FEDNESTED_MLFLOW_UI_URL.rstrip("/")
    events = AuditEvent.objects.filter(
        verb__in=MLFLOW_LINK_VERBS, object_type="registry.modelversion", object_id=str(version.pk)
    ).order_by("pk")
    runs: dict[str, dict[str, Any]] = {}
    model_version: dict[str, Any] | None = None
    for event in events:
        data = event.data if isinstance(event.data, dict) else {}
        if event.verb == RUN_LOGGED_VERB and isinstance(data.get("run_id"), str):
            runs[data["run_id"]] = {
                "run_id": data["run_id"],
                "task": data.get("task"),
                "kind": data.get("kind"),
                "url": f"{ui}/#/experiments/{data.get('experiment_id')}/runs/{data['run_id']}" if ui else None,
            }
        elif event.verb == MODEL_VERSION_VERB and isinstance(data.get("model"), str):
            model_version = {
                "model": data["model"],
                "version": data.get("model_version"),
                "url": f"{ui}/#/models/{data['model']}/versions/{data.get('model_version')}" if ui else None,
            }
    return {"runs": list(runs.values()), "model_version": model_version}
