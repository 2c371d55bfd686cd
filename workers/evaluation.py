"""Evaluation job (outer loop): a candidate's per-domain held-out loss and perplexity beside its parent's, then an
approval request to the governance officers.

The held-out sets of a deployment are JSONL files `<domain>.jsonl` in `<artifact root>/heldout/` (or the folder the
task's params name as `heldout_dir`); every version is scored on the same files, so losses compare across versions.
"""

import logging
from pathlib import Path
from typing import Any

from celery import shared_task
from django.conf import settings
from django.db import InterfaceError, OperationalError, transaction

from apps.accounts.roles import role_of
from apps.federation.models import TrainingTask
from apps.federation.services import fail_training_task, finish_training_task, start_training_task
from apps.governance.audit import record_audit_event
from apps.governance.models import ApprovalRequest
from apps.governance.services import REQUESTER_ROLES, request_approval
from apps.registry.models import ModelVersion
from fednested.checkpoints import load_version
from fednested.data import Record, read_jsonl
from fednested.data.tokenizer import load_tokenizer
from fednested.evaluation.domains import DomainEval, EvalConfig, evaluate_domains
from workers.payloads import artifact_path

logger = logging.getLogger(__name__)

ACTOR_LABEL = "worker:evaluation"
HELDOUT_FOLDER = "heldout"


def heldout_sets(directory: Path) -> dict[str, list[Record]]:
    """Domain → records of every `<domain>.jsonl` in `directory`, sorted by domain; a bad line raises, naming it."""
    files = sorted(directory.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no held-out sets (<domain>.jsonl) in {directory}")
    return {path.stem: read_jsonl(path, strict=True).records for path in files}


def score_version(version: ModelVersion, records: dict[str, list[Record]], config: EvalConfig) -> dict[str, DomainEval]:
    """Per-domain loss and perplexity of a registered version, loaded (and sha256-verified) from the artifact store."""
    directory = artifact_path(version.artifact_uri, Path(settings.FEDNESTED_ARTIFACT_ROOT))
    model, _ = load_version(directory, expected_version=version.version_id)
    return evaluate_domains(model, load_tokenizer(directory), records, config)


def _as_json(scores: dict[str, DomainEval]) -> dict[str, dict[str, Any]]:
    return {
        domain: {
            "loss": result.loss,
            "perplexity": result.perplexity,
            "tokens": result.tokens,
            "records": result.records,
        }
        for domain, result in scores.items()
    }


def evaluate_candidate(task: TrainingTask) -> ApprovalRequest | None:
    """Score the task's version and its parent, record the scores, and ask officers to approve the version.

    The request is made in the name of the engineer who opened the round (approval needs a person who is not the
    deciding officer); with no such engineer the scores are recorded and no request is opened.
    """
    version_id = task.params.get("version_id")
    if not isinstance(version_id, str):
        raise ValueError(f"task {task.pk}: params need 'version_id' (the version to evaluate), got {task.params!r}")
    version = ModelVersion.objects.select_related("parent").get(version_id=version_id)
    folder = task.params.get("heldout_dir") or str(Path(settings.FEDNESTED_ARTIFACT_ROOT) / HELDOUT_FOLDER)
    records = heldout_sets(Path(folder))
    config = EvalConfig(seq_len=int(task.params.get("seq_len", 256)))
    scores = _as_json(score_version(version, records, config))
    parent_scores = _as_json(score_version(version.parent, records, config)) if version.parent is not None else None
    requester = task.round.opened_by if task.round is not None else None
    with transaction.atomic():
        record_audit_event(
            actor=None,
            actor_label=ACTOR_LABEL,
            verb="registry.version.evaluated",
            target=version,
            data={"version_id": version_id, "heldout": folder, "domains": scores, "parent_domains": parent_scores},
        )
        if requester is None or role_of(requester) not in REQUESTER_ROLES:
            logger.warning("version %s evaluated; no engineer to request approval in the name of", version_id)
            return None
        lines = [
            f"{domain}: loss {score['loss']:.4f}"
            + (f" (parent {parent_scores[domain]['loss']:.4f})" if parent_scores and domain in parent_scores else "")
            for domain, score in scores.items()
        ]
        note = f"Aggregated by {ACTOR_LABEL} from round {task.params.get('round_id')}. Held-out: " + "; ".join(lines)
        return request_approval(version, actor=requester, note=note)


@shared_task(  # type: ignore[untyped-decorator]
    name="workers.evaluation.evaluate_version_task",
    acks_late=True,
    autoretry_for=(OperationalError, InterfaceError),
    retry_backoff=True,
    max_retries=5,
)
def evaluate_version_task(task_pk: int) -> int | None:
    """Run TrainingTask `task_pk` (kind evaluation); returns the approval request's pk, if one was opened."""
    if not start_training_task(task_pk, actor_label=ACTOR_LABEL):
        return None
    task = TrainingTask.objects.select_related("round__opened_by").get(pk=task_pk)
    try:
        request = evaluate_candidate(task)
    except Exception as error:
        fail_training_task(task_pk, error=f"{type(error).__name__}: {error}", actor_label=ACTOR_LABEL)
        raise
    finish_training_task(task_pk, actor_label=ACTOR_LABEL)
    return request.pk if request is not None else None
