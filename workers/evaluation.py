"""Evaluation job (outer loop): a candidate's per-domain held-out loss and perplexity beside its parent's, recorded in
the registry (VersionEvaluation), then an approval request to the governance officers.

The held-out sets of a deployment are JSONL files `<domain>.jsonl` in `<artifact root>/heldout/` (or the folder the
task's params name as `heldout_dir`); every version is scored on the same files, so losses compare across versions.
The candidate's forgetting report (fednested.evaluation.forgetting) compares it with its parent and the earlier
champions of its line on those files too: their stored scores are reused where they were taken on the same files.
"""

import math
from pathlib import Path

from celery import shared_task
from django.db import InterfaceError, OperationalError, transaction

from apps.accounts.models import User
from apps.accounts.roles import role_of
from apps.accounts.services import system_user
from apps.federation.jobs import EvaluationParams, heldout_files
from apps.federation.models import TrainingTask
from apps.federation.services import fail_training_task, finish_training_task, start_training_task
from apps.governance.actors import Actor
from apps.governance.gate import gate_verdict
from apps.governance.models import ApprovalRequest
from apps.governance.services import REQUESTER_ROLES, request_approval
from apps.registry.choices import VersionStatus
from apps.registry.forgetting import record_forgetting_report, report_lineage, stored_losses
from apps.registry.models import ModelVersion
from apps.registry.services import DomainEvaluation, record_version_evaluation
from apps.registry.storage import artifact_path, artifact_root, artifact_uri, redact_store_paths, store_relative
from fednested.checkpoints import CheckpointError, load_version
from fednested.data import Record, read_jsonl
from fednested.data.tokenizer import load_tokenizer
from fednested.evaluation.domains import DomainEval, EvalConfig, evaluate_domains
from fednested.evaluation.forgetting import ForgettingReport, forgetting_report
from fednested.observability.tracing import resumed_span

ACTOR = Actor.automation("worker:evaluation")


def heldout_sets(directory: Path) -> dict[str, list[Record]]:
    """Domain → records of every `<domain>.jsonl` in `directory`, sorted by domain; a bad line raises, naming it."""
    files = heldout_files(directory)
    if not files:
        raise FileNotFoundError(f"no held-out sets (<domain>.jsonl) in {directory}")
    return {path.stem: read_jsonl(path, strict=True).records for path in files}


def score_version(version: ModelVersion, records: dict[str, list[Record]], config: EvalConfig) -> dict[str, DomainEval]:
    """Per-domain loss and perplexity of a registered version, loaded (and sha256-verified) from the artifact store."""
    directory = artifact_path(version.artifact_uri, artifact_root())
    model, _ = load_version(directory, expected_version=version.version_id)
    return evaluate_domains(model, load_tokenizer(directory), records, config)


def finite_or_none(value: float) -> float | None:
    """A perplexity as the registry stores it: exp(loss) overflows to infinity for a hopeless model."""
    return value if math.isfinite(value) else None


def domain_evaluations(
    scores: dict[str, DomainEval], parent_scores: dict[str, DomainEval] | None
) -> list[DomainEvaluation]:
    """Registry rows for each domain: the version's scores, beside its parent's on the same held-out set."""
    rows = []
    for domain, result in sorted(scores.items()):
        before = parent_scores.get(domain) if parent_scores is not None else None
        rows.append(
            DomainEvaluation(
                domain=domain,
                loss=result.loss,
                perplexity=finite_or_none(result.perplexity),
                tokens=result.tokens,
                records=result.records,
                parent_loss=before.loss if before is not None else None,
                parent_perplexity=finite_or_none(before.perplexity) if before is not None else None,
            )
        )
    return rows


def lineage_report(
    version: ModelVersion,
    scores: dict[str, DomainEval],
    parent_scores: dict[str, DomainEval] | None,
    records: dict[str, list[Record]],
    config: EvalConfig,
    heldout: str,
) -> tuple[ForgettingReport, dict[str, str]]:
    """The candidate's forgetting report, and where each compared version's losses came from.

    The parent was just scored; earlier champions reuse their recorded scores when those were taken on the same
    held-out sets (`heldout`), and are scored again otherwise. A champion whose files are gone from the store is left
    out, and the sources say so and why.
    """
    lineage = report_lineage(version)
    losses: dict[str, dict[str, float]] = {version.version_id: {d: s.loss for d, s in scores.items()}}
    sources: dict[str, str] = {}
    for earlier in lineage.earlier:
        if earlier == lineage.parent and parent_scores is not None:
            losses[earlier.version_id], sources[earlier.version_id] = (
                {d: s.loss for d, s in parent_scores.items()},
                "scored",
            )
            continue
        stored = stored_losses(earlier, heldout)
        if stored is not None:
            losses[earlier.version_id], sources[earlier.version_id] = stored, "stored"
            continue
        try:
            scored = score_version(earlier, records, config)
        except (CheckpointError, FileNotFoundError) as error:
            sources[earlier.version_id] = "unavailable: " + redact_store_paths(str(error), artifact_root())
            continue
        losses[earlier.version_id], sources[earlier.version_id] = {d: s.loss for d, s in scored.items()}, "scored"
    compared = [earlier.version_id for earlier in lineage.earlier if earlier.version_id in losses]
    report = forgetting_report(
        [*compared, version.version_id],
        losses,
        parent=lineage.parent.version_id
        if lineage.parent is not None and lineage.parent.version_id in losses
        else None,
        champions=[champion.version_id for champion in lineage.champions if champion.version_id in losses],
    )
    return report, sources


def approval_requester(task: TrainingTask) -> User:
    """Who asks the officers: the engineer who opened the round, or the system account for automated rounds.

    Either way the request is not the deciding officer's own, so the requester ≠ decider rule holds.
    """
    opened_by = task.round.opened_by if task.round is not None else None
    if opened_by is not None and role_of(opened_by) in REQUESTER_ROLES:
        return opened_by
    return system_user()


def evaluate_candidate(task: TrainingTask) -> ApprovalRequest | None:
    """Score the task's version and its parent, record the scores in the registry, and ask officers to approve it
    when it is a candidate. A version already decided (the champion, scored again by the champion-evaluation
    schedule, apps/schedules) gets its scores and forgetting report only: None."""
    # The params were checked when the task was created; the store and the registry are checked again here, since
    # either may have changed since.
    params = EvaluationParams.of(task)
    version = ModelVersion.objects.select_related("parent").get(version_id=params.version_id)
    try:
        heldout = params.heldout_path(artifact_root())
    except ValueError as error:
        raise ValueError(f"task {task.pk}: params 'heldout_dir': {error}") from None
    records = heldout_sets(heldout)
    config = EvalConfig(seq_len=params.seq_len)
    scores = score_version(version, records, config)
    parent_scores = score_version(version.parent, records, config) if version.parent is not None else None
    rows = domain_evaluations(scores, parent_scores)
    heldout_uri = artifact_uri(store_relative(heldout, artifact_root()))
    report, sources = lineage_report(version, scores, parent_scores, records, config, heldout_uri)
    requester = approval_requester(task)
    with transaction.atomic():
        record_version_evaluation(version, rows, actor=ACTOR, heldout=heldout_uri)
        record_forgetting_report(version, report, heldout=heldout_uri, actor=ACTOR, scored=sources)
        if version.status != VersionStatus.CANDIDATE:
            return None
        lines = [
            f"{row.domain}: loss {row.loss:.4f}"
            + (f" (parent {row.parent_loss:.4f})" if row.parent_loss is not None else "")
            for row in rows
        ]
        round_id = task.round.round_id if task.round is not None else None
        note = f"Aggregated by {ACTOR.label} from round {round_id}. Held-out: " + "; ".join(lines)
        if report.average_forgetting is not None:
            note += (
                f". Average forgetting {report.average_forgetting:.4f} nats, backward transfer "
                f"{report.backward_transfer:+.4f} over {len(report.versions) - 1} earlier version(s)"
            )
        # Officers see at once whether the gate holds the candidate; approve_version asks the gate again.
        verdict = gate_verdict(version)
        if verdict.held:
            note += f". Held by the promotion gate: {verdict.summary()}"
        return request_approval(version, actor=requester, note=note)


@shared_task(  # type: ignore[untyped-decorator]
    name="workers.evaluation.evaluate_version_task",
    acks_late=True,
    autoretry_for=(OperationalError, InterfaceError),
    retry_backoff=True,
    max_retries=5,
)
def evaluate_version_task(task_pk: int) -> int | None:
    """Run TrainingTask `task_pk` (kind evaluation); returns the approval request's pk (None: not this worker's, or
    a version that is no candidate)."""
    if not start_training_task(task_pk, actor=ACTOR):
        return None
    task = TrainingTask.objects.select_related("round__opened_by").get(pk=task_pk)
    try:
        # Created by the aggregation that registered the candidate: its span continues that trace.
        with resumed_span("evaluate_version", traceparent=task.traceparent, attributes={"fednested.task_pk": task.pk}):
            request = evaluate_candidate(task)
    except Exception as error:
        # The task's error is shown through the API: files by their place in the store, not the server's path.
        message = redact_store_paths(f"{type(error).__name__}: {error}", artifact_root())
        fail_training_task(task_pk, error=message, actor=ACTOR)
        raise
    finish_training_task(task_pk, actor=ACTOR)
    return request.pk if request is not None else None
