"""Core-update job (the middle loop's data-centre half): the champion's core and experts trained on Tier-1 datasets
under DeepSpeed (fednested.tier1), with the edge aggregates promoted since the last core update folded in, registered
as a candidate and handed to evaluation exactly as an edge aggregate is (workers/aggregation.py).

`run_core_update_task(task_pk)` runs one TrainingTask of kind core_update. It claims the task (pending → running),
decides every dataset against the Ranger-format policies (FEDNESTED_DATASET_POLICIES) for the job's service
principal before a byte of any is read, records each decision on the task and in the audit trail, and fails the job
naming the deciding policy when one is denied. Then `run_core_update` launches the ranks; the candidate is written in
a staging folder of this task and moved into `versions/` only inside the transaction that registers it. A rank that
crashes fails the task with its log tail, and nothing of the run stays in the store.

Which weights: the champion is the newest of a line `base → aggregate_1 → … → aggregate_n = champion`, where the base
is the last core update on the champion's line (or its first version). The ranks train the base's weights and fold
ΔW_edges (the sum of the aggregates' expert deltas) in with η_T2, so an edge delta counts once: with η_T2 = 1 and no
training the candidate's experts are the champion's. The candidate's parent is the champion, the version it replaces.
"""

import logging
import os
import shutil
from pathlib import Path

from celery import shared_task
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import InterfaceError, OperationalError, transaction

from apps.federation.choices import TaskKind, task_run_ref
from apps.federation.jobs import CoreUpdateParams
from apps.federation.models import TrainingTask
from apps.federation.services import create_training_task, fail_training_task, finish_training_task, start_training_task
from apps.federation.windows import champion_version
from apps.governance.actors import Actor
from apps.governance.audit import record_audit_event
from apps.registry.models import ModelVersion
from apps.registry.services import register_saved_version
from apps.registry.storage import artifact_path, artifact_root, redact_store_paths
from fednested.config.models import StorageSettings, Tier1Config
from fednested.governance.ranger import Decision, PolicyFileError, Principal
from fednested.observability.tracing import resumed_span
from fednested.tier1 import CoreUpdateResult, run_core_update
from fednested.tier1.access import decide_dataset_access, require_allowed

logger = logging.getLogger(__name__)

ACTOR = Actor.automation("worker:training")
POLICY_DECISION_VERB = "governance.policy.decision"
CORE_UPDATE_KIND = "core_update"
# Where a core update's run folder (plan, rank logs, trained delta, metrics) is kept once it succeeded.
RUNS_FOLDER = "runs"


class CoreUpdateJobError(RuntimeError):
    """A core_update job that cannot run as the registry and settings stand (no champion, no policy file...)."""


def core_update_version_id(task: TrainingTask) -> str:
    """The candidate's id: one per task, so a task delivered twice cannot register two candidates."""
    return f"core-task-{task.pk}"


def tier1_principal() -> Principal:
    """The service principal core_update jobs read datasets as (FEDNESTED_TIER1_PRINCIPAL[_GROUPS|_ROLES])."""
    return Principal(
        user=settings.FEDNESTED_TIER1_PRINCIPAL,
        groups=frozenset(settings.FEDNESTED_TIER1_PRINCIPAL_GROUPS),
        roles=frozenset(settings.FEDNESTED_TIER1_PRINCIPAL_ROLES),
    )


def line_since_last_core_update(champion: ModelVersion) -> tuple[ModelVersion, list[ModelVersion]]:
    """(base, aggregates): the last core update on the champion's line (or the line's first version) and the
    versions after it up to the champion, oldest first (empty when the champion is the base)."""
    line = [champion, *champion.ancestors()]
    for index, version in enumerate(line):
        lineage = version.manifest.get("lineage") if isinstance(version.manifest, dict) else None
        if isinstance(lineage, dict) and lineage.get("kind") == CORE_UPDATE_KIND:
            return version, line[:index][::-1]
    return line[-1], line[:-1][::-1]


@transaction.atomic
def record_policy_decisions(task_pk: int, decisions: list[Decision]) -> None:
    """Store every dataset decision on the task and audit each, allowed or denied, naming the deciding policy."""
    documents = [decision.to_json() for decision in decisions]
    TrainingTask.objects.filter(pk=task_pk).update(policy_decisions=documents)
    task = TrainingTask.objects.get(pk=task_pk)
    for document in documents:
        record_audit_event(actor=ACTOR, verb=POLICY_DECISION_VERB, target=task, data=document)


def _checked_access(task: TrainingTask, datasets: list[Path], store: Path) -> None:
    """Decide every dataset before any is read; raises for a missing or invalid policy file and for a denial."""
    if not settings.FEDNESTED_DATASET_POLICIES:
        raise CoreUpdateJobError(
            "FEDNESTED_DATASET_POLICIES names no policy file: core_update jobs read no dataset unless a policy allows "
            "it (deny by default)"
        )
    try:
        decisions = decide_dataset_access(
            Path(settings.FEDNESTED_DATASET_POLICIES), tier1_principal(), datasets, store_root=store
        )
    except PolicyFileError as error:
        raise CoreUpdateJobError(f"FEDNESTED_DATASET_POLICIES is not valid Ranger policy JSON: {error}") from error
    record_policy_decisions(task.pk, decisions)
    require_allowed(decisions)


def _tier1_config(
    params: CoreUpdateParams, *, base_dir: Path, datasets: list[Path], staging: Path, store: Path
) -> Tier1Config:
    """The tier1 config of this run: the task's sections, with the datasets, champion and folders the job decides.
    The policy check is done (and recorded) by the job already, so the launcher does not decide again."""
    training = params.training.model_copy(
        update={"train_files": datasets, "deepspeed_config": params.deepspeed_config_path(store)}
    )
    core_update = params.core_update.model_copy(update={"champion_dir": base_dir, "output_dir": staging})
    return Tier1Config(
        training=training,
        core_update=core_update,
        storage=StorageSettings(artifact_root=store, checkpoint_dir=store / RUNS_FOLDER),
    )


def core_update(task: TrainingTask) -> ModelVersion:
    """Run a claimed core_update task up to its registered candidate (and its evaluation task)."""
    params = CoreUpdateParams.of(task)
    store = artifact_root()
    champion = champion_version()
    if champion is None:
        raise CoreUpdateJobError("no champion to train: the `champion` alias points at no version")
    try:
        datasets = params.dataset_paths(store)
    except ValueError as error:
        raise CoreUpdateJobError(f"datasets: {error}") from error
    _checked_access(task, datasets, store)
    base, aggregates = line_since_last_core_update(champion)
    version_id = core_update_version_id(task)
    if ModelVersion.objects.filter(version_id=version_id).exists():
        raise CoreUpdateJobError(f"version {version_id!r} is already registered; versions are immutable")
    staging = store / "versions" / f".{version_id}.task-{task.pk}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        config = _tier1_config(
            params,
            base_dir=artifact_path(base.artifact_uri, store),
            datasets=datasets,
            staging=staging,
            store=store,
        )
        result = run_core_update(
            config,
            edge_base=artifact_path(base.artifact_uri, store) if aggregates else None,
            edge_aggregates=[artifact_path(version.artifact_uri, store) for version in aggregates],
            version_id=version_id,
            parent_version=champion.version_id,
            lineage_store=store,
        )
        version = _register_candidate(task, result, champion, store)
    finally:
        # A refused plan, a crashed rank, a failed registration: no staged file of this task stays in the store.
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(
        "core update task %s: %s trained on %d dataset(s), %d edge aggregate(s) folded in → candidate %s",
        task.pk,
        base.version_id,
        len(datasets),
        len(aggregates),
        version.version_id,
    )
    return version


def _register_candidate(
    task: TrainingTask, result: CoreUpdateResult, champion: ModelVersion, store: Path
) -> ModelVersion:
    """The one transaction that makes the candidate real: its folder moved into versions/, registered with its
    datasets and run, and an evaluation task created for it; the folder goes again if any of that fails."""
    directory = store / "versions" / result.version_id
    # `artifacts://<path>#sha256=<hex>` (the lineage names files store-relative: run_core_update's lineage_store):
    # at most 200 characters, as a lineage edge holds (MAX_DATASET_PARAM_CHARS).
    datasets = [f"{entry['path']}#sha256={entry['sha256']}" for entry in result.lineage["datasets"]]
    with transaction.atomic():
        if directory.exists():
            raise CoreUpdateJobError(f"versions/{result.version_id} exists already in the store; it is left as it is")
        os.replace(result.version_dir, directory)
        try:
            version = register_saved_version(
                directory,
                family=champion.family,
                actor=ACTOR,
                parent=champion,
                datasets=datasets,
                runs=[task_run_ref(TaskKind.CORE_UPDATE, task.pk)],
            )
            try:
                create_training_task(
                    kind=TaskKind.EVALUATION, actor=Actor.automation(), params={"version_id": version.version_id}
                )
            except ValidationError as error:
                # The candidate stands; only its evaluation cannot start (e.g. no held-out sets in the store yet).
                logger.error(
                    "candidate %s registered, but its evaluation cannot start: %s",
                    version.version_id,
                    "; ".join(error.messages),
                )
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
    return version


@shared_task(  # type: ignore[untyped-decorator]
    name="workers.training.run_core_update_task",
    acks_late=True,
    # Only errors raised before the task row is claimed are retried: after the claim a retry finds the row running
    # and does nothing, so the failure is recorded on the row instead.
    autoretry_for=(OperationalError, InterfaceError),
    retry_backoff=True,
    max_retries=5,
)
def run_core_update_task(task_pk: int) -> str | None:
    """Run TrainingTask `task_pk` (kind core_update); returns the candidate's version id (None: not this worker's)."""
    if not start_training_task(task_pk, actor=ACTOR):
        logger.info("training task %s is not pending; another worker has it", task_pk)
        return None
    task = TrainingTask.objects.get(pk=task_pk)
    try:
        with resumed_span("core_update", traceparent=task.traceparent, attributes={"fednested.task_pk": task.pk}):
            version = core_update(task)
    except Exception as error:
        # Shown through the API: files by their place in the store, not the server's path; a rank's log tail kept.
        message = redact_store_paths(f"{type(error).__name__}: {error}", artifact_root())
        fail_training_task(task_pk, error=message, actor=ACTOR)
        raise
    finish_training_task(task_pk, actor=ACTOR)
    return str(version.version_id)
