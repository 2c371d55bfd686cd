"""Tier-1 jobs: what each kind of TrainingTask takes, and how a committed task reaches the code that runs it.

Each kind's params are declared once, here: `create_training_task` refuses a task whose params or references would
make its job fail, and the worker reads its params through the same declaration. A kind with no worker would have no
declaration, so no task of it could be created.

A task is handed over through the outbox (apps/outbox): a `celery_task` row written in the caller's transaction, so
a task whose row committed is always started, even when the broker was down at that moment. With a broker
(CELERY_BROKER_URL) the relay (`python -m workers.relay`) sends it by Celery task name, with the row's event id as
the Celery task id; controlplane/celery.py routes workers.<module>.* to the queue of that name. Without one (the
embedded mode, `make demo`) the job runs in a thread of the process that created it (`InProcessJobs`), started
after the commit, never in the request or the ingest loop that created it; the relay runs it instead if that
process died first. Either way a task delivered twice runs once: its worker claims the row pending → running.
Apps never import workers (ARCHITECTURE "Layout"): tasks are named here. A failure to start is recorded on the
TrainingTask row (and logged), never raised in the caller as if its own work had failed.
"""

import logging
import threading
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Self

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import connections, transaction
from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from apps.federation.choices import RoundStatus, TaskKind
from apps.federation.models import Round, TrainingTask
from apps.federation.windows import champion_version
from apps.governance.actors import Actor
from apps.outbox.choices import OutboxKind
from apps.outbox.handlers import Delivery, Undeliverable
from apps.outbox.models import OutboxEvent
from apps.outbox.services import claim_for_local_run, enqueue
from apps.registry.models import ModelVersion
from apps.registry.services import VERSION_ID_PATTERN
from apps.registry.storage import artifact_path, artifact_root
from fednested.config.models import Tier1CoreUpdateSettings, Tier1TrainingSettings
from fednested.observability.tracing import carry_context, inject_headers

logger = logging.getLogger(__name__)

ACTOR = Actor.automation("system:jobs")
# Where an evaluation finds its held-out sets unless its params name another folder of the store.
HELDOUT_FOLDER = "heldout"


# --- what each kind takes --------------------------------------------------------------------------------------------


class JobParams(BaseModel):
    """The params of one kind of job: JSON types exactly (strict: no "5" for 5, no true for 1), nothing undeclared (a
    misspelt key is an error, not a silent default)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    @classmethod
    def of(cls, task: TrainingTask) -> Self:
        """The params of `task` as its worker reads them; ValueError naming the task and each problem (a row written
        before params were checked at creation, or changed since)."""
        try:
            return cls.model_validate(task.params)
        except PydanticValidationError as error:
            raise ValueError(f"task {task.pk}: {'; '.join(param_problems(error, cls, task.kind))}") from None

    def problems(self, round_: Round | None) -> dict[str, list[str]]:
        """What only the registry or the artifact store can tell: field ('params', 'round') → what is wrong with what
        the task refers to. Empty when the job can run."""
        return {}


class AggregationParams(JobParams):
    """expert_aggregation (workers/aggregation.py): the task's round is the window whose buffered updates are
    aggregated into a candidate."""

    trigger: str | None = Field(
        default=None,
        pattern=r"^[a-z][a-z0-9_]{0,63}$",
        description="Why the window became ready (e.g. deadline, cohort_complete); recorded in the window's record.",
    )
    round_id: str | None = Field(
        default=None,
        max_length=64,
        description="The window's id as the ingest worker notes it; when given, it must be the task's round.",
    )

    def problems(self, round_: Round | None) -> dict[str, list[str]]:
        if round_ is None:
            return {"round": ["an expert_aggregation task needs the round (window) it aggregates"]}
        if self.round_id is not None and self.round_id != round_.round_id:
            return {"params": [f"round_id: {self.round_id!r} is not the task's round {round_.round_id!r}"]}
        if round_.status != RoundStatus.OPEN:
            return {"round": [f"round {round_.round_id!r} is {round_.status}: only an open window can be aggregated"]}
        return {}


def heldout_files(directory: Path) -> list[Path]:
    """The held-out sets of a folder: every `<domain>.jsonl` in it, sorted by domain."""
    return sorted(directory.glob("*.jsonl")) if directory.is_dir() else []


class EvaluationParams(JobParams):
    """evaluation (workers/evaluation.py): a registered version's per-domain held-out loss beside its parent's, then
    an approval request."""

    version_id: str = Field(
        pattern=VERSION_ID_PATTERN.pattern, description="The registered version to score (its parent is scored too)."
    )
    heldout_dir: str = Field(
        default=HELDOUT_FOLDER,
        min_length=1,
        max_length=512,
        description="Folder of held-out sets `<domain>.jsonl` in the artifact store (a relative path or artifacts://).",
    )
    # EvalConfig's own lower bound; the upper one keeps a scored batch's memory bounded.
    seq_len: int = Field(default=256, ge=2, le=4096, description="Tokens per scored row.")

    def heldout_path(self, root: Path) -> Path:
        """The held-out folder inside the store at `root`; ValueError (quoting the param, never the root) outside."""
        return artifact_path(self.heldout_dir, root)

    def problems(self, round_: Round | None) -> dict[str, list[str]]:
        problems = []
        if not ModelVersion.objects.filter(version_id=self.version_id).exists():
            problems.append(f"version_id: unknown version {self.version_id!r}")
        try:
            directory = self.heldout_path(artifact_root())
        except ValueError as error:
            problems.append(f"heldout_dir: {error}")
        else:
            if not heldout_files(directory):
                problems.append(
                    f"heldout_dir: no held-out sets (<domain>.jsonl) in {self.heldout_dir!r} of the artifact store"
                )
        return {"params": problems} if problems else {}


# Datasets one core update may name: each is decided by policy, hashed and read by every rank. A name's length keeps
# its registry lineage edge (`artifacts://<path>#sha256=<64 hex>`) within the edge's 200 characters.
MAX_CORE_UPDATE_DATASETS = 64
MAX_DATASET_PARAM_CHARS = 112
# What the job decides itself and a task may not set: the registry's champion and the store's layout, and the access
# check's policy file and principal (the deployment's settings, never a task's wish).
_CORE_UPDATE_OWNED = {
    "training": ("train_files", "eval_files"),
    "core_update": (
        "champion_dir",
        "output_dir",
        "dataset_policies",
        "principal",
        "principal_groups",
        "principal_roles",
    ),
}


class CoreUpdateParams(JobParams):
    """core_update (workers/training.py): the champion's core and experts trained on Tier-1 datasets under DeepSpeed,
    with the edge aggregates promoted since the last core update folded in; `training` and `core_update` are the
    tier1 config's sections (fednested/config/models.py, docs/tier1-core-update.md), declared there once."""

    datasets: list[Annotated[str, Field(min_length=1, max_length=MAX_DATASET_PARAM_CHARS)]] = Field(
        min_length=1,
        max_length=MAX_CORE_UPDATE_DATASETS,
        description="Tier-1 JSONL datasets: paths inside the artifact store (relative or artifacts://), each read "
        "only if the dataset policies (FEDNESTED_DATASET_POLICIES) allow the job's service principal.",
    )
    training: Tier1TrainingSettings = Field(
        default_factory=Tier1TrainingSettings,
        description="The tier1 config's training section (ranks, max_steps, zero_stage, precision, ...); "
        "deepspeed_config is a path inside the artifact store; the datasets are the `datasets` param.",
    )
    core_update: Tier1CoreUpdateSettings = Field(
        default_factory=Tier1CoreUpdateSettings,
        description="The tier1 config's core_update section (eta_core, eta_t1, eta_t2, accelerator, timeout_s, "
        "safeguards, fault_injection); the champion and where the candidate goes are the registry's.",
    )

    def dataset_paths(self, root: Path) -> list[Path]:
        """The datasets inside the store at `root`; ValueError (quoting the param, never the root) outside it."""
        return [artifact_path(dataset, root) for dataset in self.datasets]

    def deepspeed_config_path(self, root: Path) -> Path | None:
        extra = self.training.deepspeed_config
        return None if extra is None else artifact_path(str(extra), root)

    def problems(self, round_: Round | None) -> dict[str, list[str]]:
        problems = []
        for section, owned in _CORE_UPDATE_OWNED.items():
            given = getattr(self, section).model_fields_set
            problems += [f"{section}.{key}: set by the job, not by a task" for key in owned if key in given]
        root = artifact_root()
        # Only where they are: whether a dataset exists is not looked at before the policies allow it (at run time).
        for index, dataset in enumerate(self.datasets):
            try:
                artifact_path(dataset, root)
            except ValueError as error:
                problems.append(f"datasets.{index}: {error}")
        try:
            self.deepspeed_config_path(root)
        except ValueError as error:
            problems.append(f"training.deepspeed_config: {error}")
        found: dict[str, list[str]] = {"params": problems} if problems else {}
        if not settings.FEDNESTED_DATASET_POLICIES:
            found["kind"] = [
                "core_update tasks read datasets only as dataset policies allow, and FEDNESTED_DATASET_POLICIES "
                "names no policy file: no dataset can be allowed (deny by default)"
            ]
        if round_ is not None:
            found["round"] = ["a core_update task belongs to no round"]
        if champion_version() is None:
            found.setdefault("kind", []).append("no champion to train: approve a version (the `champion` alias) first")
        return found


@dataclass(frozen=True)
class JobKind:
    """A kind of job that something runs: the Celery task (in workers/) and the params it reads."""

    task_name: str
    params: type[JobParams]


# TaskKind → its job; a kind without an entry here would be refused at creation rather than left pending forever.
JOBS: dict[str, JobKind] = {
    TaskKind.CORE_UPDATE: JobKind("workers.training.run_core_update_task", CoreUpdateParams),
    TaskKind.EXPERT_AGGREGATION: JobKind("workers.aggregation.aggregate_round_task", AggregationParams),
    TaskKind.EVALUATION: JobKind("workers.evaluation.evaluate_version_task", EvaluationParams),
}


def param_problems(error: PydanticValidationError, params: type[JobParams], kind: str) -> list[str]:
    """One line per problem, each starting with the param it is about."""
    lines = []
    for problem in error.errors(include_url=False):
        key = ".".join(str(part) for part in problem["loc"]) or "params"
        if problem["type"] == "missing":
            field = params.model_fields.get(key)
            lines.append(f"{key}: required — {field.description if field else 'it has no default'}")
        elif problem["type"] == "extra_forbidden":
            lines.append(f"{key}: not a parameter of {kind} tasks (they take {', '.join(params.model_fields)})")
        else:
            shown = repr(problem["input"])
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            lines.append(f"{key}: {problem['msg']}, got {shown}")
    return lines


def checked_params(kind: str, params: Any, round_: Round | None) -> JobParams:
    """The params of a new task of `kind`, parsed, once they, its round and what they refer to let its job run; else
    ValidationError naming 'kind', 'params' (each line starting with the param) or 'round'."""
    if kind not in TaskKind.values:
        raise ValidationError({"kind": f"unknown task kind {kind!r}: use one of {', '.join(JOBS)}"})
    job = JOBS.get(kind)
    if job is None:
        raise ValidationError(
            {"kind": f"no worker runs {kind} tasks on this control plane: create one of {', '.join(JOBS)}"}
        )
    if not isinstance(params, Mapping):
        raise ValidationError({"params": f"params must be a JSON object, got {type(params).__name__}"})
    try:
        parsed = job.params.model_validate(dict(params))
    except PydanticValidationError as error:
        raise ValidationError({"params": param_problems(error, job.params, kind)}) from None
    problems = parsed.problems(round_)
    if problems:
        raise ValidationError(problems)
    return parsed


# --- starting a committed task ---------------------------------------------------------------------------------------


class InProcessJobs:
    """Runs jobs one at a time, in order, in a thread of this process: the embedded mode's stand-in for a Celery
    worker (no broker).

    The thread starts with the first job and ends when none is left. It is not a daemon: a process that is done
    (the ingest worker after SIGTERM, runserver after Ctrl-C) exits only once the job in hand and those queued behind
    it have finished. Each job runs on the thread's own database connection, closed after it.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._queue: deque[Callable[[], None]] = deque()
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], None]) -> None:
        with self._changed:
            self._queue.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._drain, name="fednested-jobs")
                self._thread.start()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every submitted job has finished; False if some still run after `timeout_s` seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: self._thread is None, timeout=timeout_s)

    def _drain(self) -> None:
        while True:
            with self._changed:
                if not self._queue:
                    # Under the lock: a job submitted from now on starts a new thread.
                    self._thread = None
                    self._changed.notify_all()
                    return
                job = self._queue.popleft()
            try:
                job()
            except Exception:
                # `_run_here` records failures itself; this is the last line of defence for the thread.
                logger.exception("in-process job %r failed", job)
            finally:
                connections.close_all()


IN_PROCESS = InProcessJobs()


def send_training_task_on_commit(task_pk: int, kind: str) -> None:
    """Hand TrainingTask `task_pk` to the worker for `kind`: an outbox row in the caller's transaction, delivered
    once that commits (by the relay; in the embedded mode by this process's job thread, right after the commit)."""
    name = JOBS[kind].task_name
    row = enqueue(OutboxKind.CELERY_TASK, topic=name, key=str(task_pk), payload={"task": name, "args": [task_pk]})
    if settings.FEDNESTED_JOBS_IN_PROCESS:
        # carry_context: the job thread continues the creator's trace (fednested.observability.tracing).
        job = carry_context(partial(_run_claimed, row.event_id, task_pk, name))
        transaction.on_commit(partial(IN_PROCESS.submit, job))


def deliver_celery_task(row: OutboxEvent, delivery: Delivery) -> None:
    """Outbox handler of `celery_task` rows: send the task to its queue (the broker acknowledges it before this
    returns), or in the embedded mode start it in this process's job thread. Undeliverable for a malformed row."""
    name, task_pk = _task_of(row)
    if settings.FEDNESTED_JOBS_IN_PROCESS:
        IN_PROCESS.submit(carry_context(partial(_run_here, task_pk, name)))
        return
    from controlplane.celery import app

    # No queue named: the app's routes send workers.<module>.* to the queue of that module. The row's id is the
    # Celery task id, so a second send of the row (the relay died before marking it sent) is recognisably the same.
    # The trace context goes in the message headers, where the worker's Celery instrumentation reads it.
    app.send_task(name, args=[task_pk], task_id=str(row.event_id), headers=dict(inject_headers()))


def _task_of(row: OutboxEvent) -> tuple[str, int]:
    payload = row.payload if isinstance(row.payload, dict) else {}
    name, args = payload.get("task"), payload.get("args")
    if not isinstance(name, str) or not name or not isinstance(args, list) or len(args) != 1:
        raise Undeliverable(f"outbox row {row.event_id}: a celery_task payload is {{'task': name, 'args': [task pk]}}")
    task_pk = args[0]
    if not isinstance(task_pk, int) or isinstance(task_pk, bool):
        raise Undeliverable(f"outbox row {row.event_id}: the task pk must be an integer, got {task_pk!r}")
    return name, task_pk


def _fail(task_pk: int, message: str) -> None:
    from apps.federation.services import fail_training_task

    # A no-op when the task already recorded its own failure (it is no longer pending/running).
    fail_training_task(task_pk, error=message, actor=ACTOR)


def _run_claimed(event_id: uuid.UUID, task_pk: int, name: str) -> None:
    """The embedded mode's fast way: run the task here unless the relay took its outbox row first."""
    if claim_for_local_run(event_id):
        _run_here(task_pk, name)
    else:
        logger.info("training task %s: its outbox row %s was delivered by the relay", task_pk, event_id)


def _run_here(task_pk: int, name: str) -> None:
    """Run the Celery task `name` on TrainingTask `task_pk` in this thread, as a worker would."""
    from controlplane.celery import app

    app.loader.import_default_modules()
    registered = app.tasks.get(name)
    if registered is None:
        message = f"no Celery task named {name!r} is registered (is the workers package installed?)"
        logger.error("training task %s not started: %s", task_pk, message)
        _fail(task_pk, message)
        return
    try:
        registered.apply(args=[task_pk], throw=True)
    except Exception as error:
        # The task records its own failure once it claimed the row; this covers what failed before (or instead).
        logger.exception("training task %s (%s) failed", task_pk, name)
        _fail(task_pk, f"{type(error).__name__}: {error}")
