"""Aggregation job (middle loop): a window's buffered edge updates → bounded per-expert weights → the factored
aggregate applied to the *current champion* → a candidate version whose parent is that champion.

`aggregate_round_task(task_pk)` runs one TrainingTask of kind expert_aggregation. It claims the task and then the
window with conditional updates (so two workers never aggregate one window), re-checks every buffered update (device
still enrolled, staleness τ against today's champion, payload size and sha256), weights them (staleness
(1+τ)^-a, routed-token claims bounded by the device's history and the per-update share cap, reliability from the
device's record), and combines them expert by expert from their factors read lazily from the artifact store, so
memory does not grow with K·d². The candidate is saved, registered with its lineage, the updates are marked
applied, the window closes and (asynchronous) the next window of its series opens — the registry writes in one
transaction. When it fails after claiming the window, the window is reopened (its updates stay buffered). When its
worker dies instead (kill -9, lost machine), the task stays running and the window aggregating until
`release_lost_aggregations` (the ingest worker's periodic check) presumes it lost after FEDNESTED_AGGREGATION_TIMEOUT_S,
fails it and reopens the window; a candidate it had not registered leaves no registry row (its files, if any, are
replaced by the next attempt), and one it had registered stands with its updates applied once.
"""

import hashlib
import logging
import math
import os
import shutil
import signal
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import shared_task
from django.core.exceptions import ValidationError
from django.db import InterfaceError, OperationalError, transaction
from opentelemetry.trace import Span

from apps.federation.choices import DeviceStatus, RoundStatus, TaskKind, TaskStatus, UpdateStatus, task_run_ref
from apps.federation.jobs import AggregationParams
from apps.federation.models import Round, TrainingTask, Update
from apps.federation.payloads import adapter_config_of, checked_payload_path
from apps.federation.privacy import PrivacyLedger, privacy_ledger
from apps.federation.safeguards import write_safeguard_files
from apps.federation.server_state import (
    StateReference,
    discard_stale_staging,
    install_state,
    load_version_state,
    stage_state,
    staged_path,
)
from apps.federation.services import (
    claim_round_for_aggregation,
    close_round,
    continue_series,
    create_training_task,
    fail_training_task,
    finish_training_task,
    mark_updates_applied,
    reject_update,
    reopen_round_after_failure,
    start_training_task,
)
from apps.federation.windows import buffered_updates, champion_version, round_settings, staleness_of
from apps.governance.actors import Actor
from apps.registry.models import ModelVersion
from apps.registry.services import register_saved_version
from apps.registry.storage import artifact_path, artifact_root, redact_store_paths
from controlplane.metrics.families import timed_aggregation
from fednested.aggregation import RejectionCode, UpdateFacts, UpdateRejected, expert_of_delta
from fednested.aggregation.factors import FactorFile, FactorFileError
from fednested.aggregation.privacy import PrivacyBudgetExceeded, check_budget, epsilon_for
from fednested.aggregation.rejections import DEVICE_FAULTS
from fednested.aggregation.server_optimizers import (
    ServerOptimizer,
    ServerOptimizerStateError,
    resume_server_optimizer,
)
from fednested.aggregation.settings import RoundAggregationSettings
from fednested.aggregation.validation import check_delta_norms, expert_shapes_of
from fednested.aggregation.weights import bound_claimed_tokens, reliability_from_history
from fednested.aggregation.window import combine_window
from fednested.checkpoints import Manifest, load_version, save_version
from fednested.data.tokenizer import load_tokenizer
from fednested.deltas import delta_key, merge_expert_deltas, parse_delta_key
from fednested.messaging import AdapterSummary
from fednested.observability.tracing import resumed_span

logger = logging.getLogger(__name__)

ACTOR = Actor.automation("worker:aggregation")
# How many of a device's latest decided updates its reliability and its claim history are read from.
HISTORY_LENGTH = 20
# Updates whose traces the aggregation span links to, at most (the latest ones; the SDK keeps 128 links by default).
MAX_TRACE_LINKS = 128
# Test hook (tests/faults): the worker SIGKILLs itself at this point of every aggregation. after_claim: the window
# is held, nothing written; after_files_written: the candidate's files are in their staging directory, nothing
# registered; after_files_moved: inside the registering transaction, files in place, not committed;
# after_register: committed (candidate, applied updates, closed window), the task not yet marked succeeded.
CRASH_POINT_ENV = "FEDNESTED_AGGREGATION_CRASH_POINT"
CRASH_POINTS = ("after_claim", "after_files_written", "after_files_moved", "after_register")
if os.environ.get(CRASH_POINT_ENV, "") not in ("", *CRASH_POINTS):
    # Checked when the worker imports its tasks, so a misspelt point stops it at start rather than never firing.
    raise RuntimeError(f"{CRASH_POINT_ENV}={os.environ[CRASH_POINT_ENV]!r} is not one of {CRASH_POINTS}")


def _crash_if_asked(point: str) -> None:
    if os.environ.get(CRASH_POINT_ENV) == point:
        logger.warning("test hook %s=%s: killing this process", CRASH_POINT_ENV, point)
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class Contribution:
    """One buffered update, re-checked: its factors (read lazily) and the facts its weights come from."""

    update: Update
    factors: FactorFile
    facts: UpdateFacts[str]
    claim_note: str | None
    # ‖ΔW‖ of the whole update (all its experts' dense deltas together): what differential privacy clips.
    norm: float
    # sha256 over the update's factors (key, A, B and scale, in key order), whatever else its file holds: two
    # devices sending the same update are caught even when the files' metadata differ.
    content_digest: str


@dataclass(frozen=True)
class AggregationOutcome:
    """What one aggregation produced: the candidate (None if nothing could be aggregated) and what went where."""

    round_id: str
    version_id: str | None
    applied: tuple[str, ...]
    rejected: dict[str, str]
    weights: dict[str, dict[str, float]]
    record: dict[str, Any]


class CandidateAlreadyRegistered(RuntimeError):
    """The window's candidate version id is already registered, so aggregating it again would clobber its files."""


def candidate_version_id(round_: Round) -> str:
    """The candidate's id: one per window, so a retried task cannot register a second candidate for it."""
    return f"{round_.round_id}-candidate"


def device_history(update: Update) -> tuple[int, int, list[float]]:
    """(accepted, rejected for the device's own fault, claimed training tokens of accepted) over its latest decided
    updates; rejections for timing or the server's state (too stale, a closed round, …) do not count."""
    decided = (
        Update.objects.filter(device_id=update.device_id, status__in=[UpdateStatus.APPLIED, UpdateStatus.REJECTED])
        .exclude(pk=update.pk)
        .order_by("-received_at", "-id")
        .values_list("status", "rejection_code", "metrics")[:HISTORY_LENGTH]
    )
    accepted = rejected = 0
    tokens: list[float] = []
    faults = {code.value for code in DEVICE_FAULTS}
    for status, code, metrics in decided:
        if status == UpdateStatus.APPLIED:
            accepted += 1
            claimed = metrics.get("tokens") if isinstance(metrics, dict) else None
            if isinstance(claimed, int | float) and claimed > 0:
                tokens.append(float(claimed))
        elif code in faults:
            rejected += 1
    return accepted, rejected, tokens


def contribution_of(
    update: Update, *, settings_: RoundAggregationSettings, champion: ModelVersion, store: Path
) -> Contribution:
    """Re-check one buffered update against today's champion and open its factors (nothing dense, nothing whole)."""
    client_id = update.device.client_id
    if update.device.status != DeviceStatus.ACTIVE:
        raise UpdateRejected(
            RejectionCode.REVOKED_CLIENT,
            f"device {client_id!r} was revoked after this update was buffered",
            client_id=client_id,
        )
    staleness = staleness_of(update.base_version, champion)
    if staleness is None:
        raise UpdateRejected(
            RejectionCode.NOT_ON_LINEAGE,
            f"its base {update.base_version.version_id!r} is not an ancestor of the champion {champion.version_id!r}",
            client_id=client_id,
        )
    if staleness > settings_.max_staleness:
        raise UpdateRejected(
            RejectionCode.TOO_STALE,
            f"its base {update.base_version.version_id!r} is τ={staleness} promotions behind the champion "
            f"{champion.version_id!r}, the limit is {settings_.max_staleness}",
            client_id=client_id,
        )
    envelope: dict[str, Any] = update.envelope
    config = adapter_config_of(AdapterSummary.model_validate(envelope["adapter"], strict=False), client_id=client_id)
    path = checked_payload_path(
        update.payload_uri,
        sha256=update.payload_sha256,
        size_bytes=update.payload_bytes,
        max_bytes=settings_.limits.max_bytes,
        root=store,
        client_id=client_id,
    )
    try:
        factors = FactorFile(update.update_id, path, config.scale)
        # The window's limits may be stricter than the ones the update was first checked against (it may have
        # waited without a window), and one delta that overflows would fail the whole window: check each norm
        # again, one factor pair at a time, so a bad update is rejected alone.
        norms: dict[str, float] = {}
        digest = hashlib.sha256(f"scale={config.scale!r}".encode())
        for key in sorted(factors.delta_keys()):
            pair = factors.read(key)
            norms[key] = pair.norm()
            digest.update(key.encode())
            for tensor in (pair.lora_a, pair.lora_b):
                digest.update(repr(tuple(tensor.shape)).encode())
                digest.update(tensor.contiguous().numpy().tobytes())
    except FactorFileError as error:
        raise UpdateRejected(RejectionCode.MALFORMED, str(error), client_id=client_id) from None
    check_delta_norms(norms, settings_.limits, client_id=client_id)
    accepted, rejected, history = device_history(update)
    claimed = update.metrics.get("tokens") if isinstance(update.metrics, dict) else None
    routed, claim_note = bound_claimed_tokens(
        {str(expert): int(tokens) for expert, tokens in update.routed_tokens.items()},
        claimed_tokens=float(claimed) if isinstance(claimed, int | float) else 0.0,
        history=history,
        factor=settings_.claim_history_factor,
    )
    experts = frozenset(expert_of_delta(key) for key in factors.delta_keys())
    facts = UpdateFacts(
        update_id=update.update_id,
        experts=experts,
        staleness=staleness,
        examples=update.examples,
        routed_tokens=routed,
        reliability=reliability_from_history(accepted, rejected),
        sender=client_id,
    )
    return Contribution(
        update=update,
        factors=factors,
        facts=facts,
        claim_note=claim_note,
        norm=math.sqrt(sum(value * value for value in norms.values())),
        content_digest=digest.hexdigest(),
    )


def _without_duplicates(contributions: list[Contribution], rejected: dict[str, str]) -> list[Contribution]:
    """Each distinct update once: a copy of one applied earlier, or of one earlier in this window (whichever device
    sent it), is rejected as duplicate_update naming its twin. An attacker who replays one poisoned update from
    several enrolled devices gets one vote, which the robust rule then bounds; a copy perturbed or re-factored is
    no longer identical and is left to the robust rule and the norm bound, as any colluding devices are."""
    digests = [contribution.content_digest for contribution in contributions]
    applied = dict(
        Update.objects.filter(content_digest__in=digests, status=UpdateStatus.APPLIED)
        .order_by("received_at", "id")
        .values_list("content_digest", "update_id")
    )
    first: dict[str, Contribution] = {}
    kept: list[Contribution] = []
    for contribution in contributions:
        twin_id = applied.get(contribution.content_digest)
        twin = first.get(contribution.content_digest)
        if twin_id is None and twin is None:
            first[contribution.content_digest] = contribution
            kept.append(contribution)
            continue
        where = (
            f"update {twin_id}, applied earlier"
            if twin_id is not None
            else f"update {twin.update.update_id} from device {twin.update.device.client_id!r} in this window"
            if twin is not None
            else ""
        )
        reject_update(
            contribution.update,
            RejectionCode.DUPLICATE_UPDATE.value,
            f"at aggregation: its adapters are identical to {where}",
            actor=ACTOR,
        )
        rejected[contribution.update.update_id] = RejectionCode.DUPLICATE_UPDATE.value
    return kept


def _noised_keys(manifest: Manifest, contributions: list[Contribution]) -> dict[str, tuple[int, ...]]:
    """Every expert's delta of the weights the window's adapters target, with its shape: differential privacy noises
    all of them, so the candidate does not reveal which experts the devices trained (which weights adapters target
    is the federation's configuration, not a device's data)."""
    targeted = {parse_delta_key(key)[0] for contribution in contributions for key in contribution.factors.delta_keys()}
    keys: dict[str, tuple[int, ...]] = {}
    for name, (experts, *shape) in expert_shapes_of(manifest).items():
        if name in targeted:
            keys.update({delta_key(name, expert): tuple(shape) for expert in range(experts)})
    return keys


def _privacy_refusal(settings_: RoundAggregationSettings, ledger: PrivacyLedger | None) -> str | None:
    """Why the window may not be aggregated with noise (one more aggregation would exceed the federation's ε
    budget), or None. Checked when a round opens for all it plans; checked again here because other series may
    have spent budget meanwhile."""
    if settings_.privacy is None or ledger is None:
        return None
    try:
        check_budget(ledger.noise_multipliers, settings_.privacy, planned=1)
    except PrivacyBudgetExceeded as error:
        return str(error)
    return None


def _resume_optimizer(champion: ModelVersion, settings_: RoundAggregationSettings, store: Path) -> ServerOptimizer:
    """The server optimiser, continuing the champion's state. A state that cannot be used (missing, altered, or
    another version's) is not trusted: the optimiser starts afresh and the candidate's lineage says why, so a bad
    file costs the moments' warm-up, never the window."""
    try:
        state = load_version_state(champion, store)
    except ServerOptimizerStateError as error:
        problem = redact_store_paths(str(error), store)
        logger.error("server optimiser state of %s is unusable, starting afresh: %s", champion.version_id, problem)
        return ServerOptimizer(
            settings_.server_optimizer,
            note=f"the state {champion.version_id} left could not be used ({problem}); started afresh",
        )
    optimizer, _ = resume_server_optimizer(settings_.server_optimizer, state)
    return optimizer


# What a noised window must not publish (lineage, the window's record, the API): per-update norms and clip factors,
# and the realised noise, are functions of the devices' data outside the Gaussian mechanism that ε accounts for.
PRIVATE_FIELDS = frozenset({"norms", "clipped", "noise_rms_drawn", "scaled", "update_scale"})


def _released(record: Any, *, private: bool) -> Any:
    """`record` as published: for a noised window, without the PRIVATE_FIELDS at any depth."""
    if not private:
        return record
    if isinstance(record, dict):
        return {key: _released(value, private=True) for key, value in record.items() if key not in PRIVATE_FIELDS}
    if isinstance(record, list):
        return [_released(value, private=True) for value in record]
    return record


def _evidence(
    settings_: RoundAggregationSettings,
    window: dict[str, Any],
    state: StateReference,
    champion: ModelVersion,
    ledger: PrivacyLedger | None,
) -> dict[str, Any]:
    """What officers are shown about how the candidate was made (lineage, API, version page): the rule and what it
    cut, the server optimiser and where its state went, and the privacy accounting when noise was added."""
    aggregation = settings_.aggregation
    optimizer = dict(window["server_optimizer"])
    optimizer["resumed_from"] = champion.version_id if optimizer.get("resumed") else None
    optimizer["state"] = state.to_dict()
    evidence: dict[str, Any] = {
        # Flat copies of the rule's settings, as earlier candidates recorded them.
        "method": aggregation.method,
        "clip_norm": aggregation.clip_norm,
        "norm_bound_multiplier": aggregation.norm_bound_multiplier,
        "trim_fraction": aggregation.trim_fraction,
        "server_learning_rate": settings_.server_optimizer.learning_rate,
        "staleness_exponent": aggregation.weighting.staleness_exponent,
        "max_update_share": aggregation.weighting.max_update_share,
        "rule": window["rule"],
        "server_optimizer": optimizer,
        "privacy": None,
    }
    privacy = window.get("privacy")
    if settings_.privacy is not None and ledger is not None and isinstance(privacy, dict):
        multipliers = (*ledger.noise_multipliers, settings_.privacy.noise_multiplier)
        drawn = privacy.get("noise_rms_drawn")
        evidence["rule"] = _released(window["rule"], private=True)
        evidence["privacy"] = {key: value for key, value in privacy.items() if key not in PRIVATE_FIELDS} | {
            # That noise was drawn, not how much: the size of the drawn noise, like each update's norm or clip
            # factor, would tell something about the devices' updates that ε does not account for.
            "noise_drawn": isinstance(drawn, float) and drawn > 0 and bool(privacy.get("noised_coordinates")),
            "clipped_updates": len(privacy.get("clipped") or {}),
            "delta": settings_.privacy.delta,
            "epsilon": epsilon_for(multipliers, settings_.privacy.delta),
            "epsilon_budget": settings_.privacy.epsilon_budget,
            "noised_aggregations": len(multipliers),
            "unprotected_aggregations": ledger.unprotected,
        }
    return evidence


@timed_aggregation
def aggregate_round(task: TrainingTask) -> AggregationOutcome | None:
    """Aggregate the task's window into a candidate; None when another task already claimed the window."""
    round_ = task.round
    if round_ is None:
        raise ValueError(f"task {task.pk}: an expert_aggregation task needs a round")
    # Read before the window is claimed, so that a bad row fails without holding the window.
    params = AggregationParams.of(task)
    if not claim_round_for_aggregation(round_, actor=ACTOR, task_pk=task.pk):
        logger.info("round %s is %s; task %s leaves it alone", round_.round_id, round_.status, task.pk)
        return None
    _crash_if_asked("after_claim")
    try:
        return _aggregate_claimed_round(task, round_, params)
    except Exception as error:
        # This task holds the window: hand it back, buffered updates and all, rather than leave it aggregating. A
        # task released as lost meanwhile holds it no longer, and this changes nothing.
        reopen_round_after_failure(
            round_,
            reason=redact_store_paths(f"task {task.pk}: {type(error).__name__}: {error}", artifact_root()),
            actor=ACTOR,
            task_pk=task.pk,
        )
        raise


class AggregationReleased(RuntimeError):
    """The task was presumed lost and released while it still ran: its result is discarded, the window is not its."""


def _still_owned(task: TrainingTask, round_: Round) -> None:
    """Inside the final transaction: the task is still running and still holds the window (locked), or it raises."""
    status = TrainingTask.objects.select_for_update().filter(pk=task.pk).values_list("status", flat=True).first()
    locked = Round.objects.select_for_update().get(pk=round_.pk)
    owner = locked.record.get("claimed_by_task") if isinstance(locked.record, dict) else None
    if status != TaskStatus.RUNNING or locked.status != RoundStatus.AGGREGATING or owner != task.pk:
        raise AggregationReleased(
            f"task {task.pk} is {status} and window {round_.round_id} is {locked.status} (held by task {owner}): "
            "the task was released as lost while it ran; its candidate is discarded"
        )


def _aggregate_claimed_round(task: TrainingTask, round_: Round, params: AggregationParams) -> AggregationOutcome:
    settings_ = round_settings(round_)
    store = artifact_root()
    # Before any version was approved there is no line yet: the window's own base stands in for the champion.
    champion = champion_version() or round_.base_version
    contributions: list[Contribution] = []
    rejected: dict[str, str] = {}
    for update in buffered_updates(round_):
        try:
            contributions.append(contribution_of(update, settings_=settings_, champion=champion, store=store))
        except UpdateRejected as rejection:
            reject_update(update, rejection.code.value, f"at aggregation: {rejection.message}", actor=ACTOR)
            rejected[update.update_id] = rejection.code.value
    contributions = _without_duplicates(contributions, rejected)
    # Read once: the budget check and the candidate's ε both compose over it (one aggregation runs at a time).
    ledger = privacy_ledger() if settings_.privacy is not None and contributions else None
    privacy_refusal = _privacy_refusal(settings_, ledger)
    if privacy_refusal is not None:
        for contribution in contributions:
            reject_update(
                contribution.update,
                RejectionCode.PRIVACY_BUDGET_SPENT.value,
                f"at aggregation: {privacy_refusal}",
                actor=ACTOR,
            )
            rejected[contribution.update.update_id] = RejectionCode.PRIVACY_BUDGET_SPENT.value
        with transaction.atomic():
            # The series stops here: every next window would be refused the same way until an operator acts.
            close_round(
                round_,
                actor=ACTOR,
                status=RoundStatus.CANCELLED,
                reason=f"privacy budget: {privacy_refusal}; the series stops",
            )
        return AggregationOutcome(round_.round_id, None, (), rejected, {}, {})
    if not contributions:
        with transaction.atomic():
            close_round(
                round_,
                actor=ACTOR,
                status=RoundStatus.CANCELLED,
                reason=f"no buffered update passed re-validation ({len(rejected)} rejected)",
            )
            continue_series(round_, base_version=champion, actor=ACTOR)
        return AggregationOutcome(round_.round_id, None, (), rejected, {}, {})
    version_id = candidate_version_id(round_)
    if ModelVersion.objects.filter(version_id=version_id).exists():
        # Never overwrite (or delete) the files of a registered version: they are what its registry entry vouches for.
        raise CandidateAlreadyRegistered(
            f"round {round_.round_id}: model version {version_id!r} is already registered; "
            f"its files under artifacts://versions/{version_id} are left as they are"
        )
    champion_directory = artifact_path(champion.artifact_uri, store)
    model, champion_manifest = load_version(champion_directory, expected_version=champion.version_id)
    optimizer = _resume_optimizer(champion, settings_, store)

    def merge(key: str, step: Any) -> None:
        # The optimiser's step already carries the server learning rate η.
        merge_expert_deltas(model, {key: step}, eta=1.0)

    result = combine_window(
        [contribution.factors for contribution in contributions],
        [contribution.facts for contribution in contributions],
        settings_,
        optimizer,
        merge,
        update_norms={contribution.update.update_id: contribution.norm for contribution in contributions},
        key_shapes=_noised_keys(champion_manifest, contributions) if settings_.privacy is not None else None,
    )
    report = result.report
    applied = tuple(contribution.update.update_id for contribution in contributions)
    weights_by_update = result.weights
    # Written under a name of this task's own and moved into place only while it still holds the window: a task
    # released as lost (and still running) can never write over the files of the attempt that replaced it.
    staging = store / "versions" / f".{version_id}.task-{task.pk}"
    safeguards_staging = store / "versions" / f".{version_id}.task-{task.pk}.safeguards"
    state_staging = f".{version_id}.task-{task.pk}.safetensors"
    # Staging files of earlier attempts at this candidate (their workers died before registering, or they were
    # released as lost): this task holds the window now, so none of them can ever be registered.
    for stale in (store / "versions").glob(f".{version_id}.task-*"):
        shutil.rmtree(stale, ignore_errors=True)
    discard_stale_staging(store, version_id)
    try:
        state = stage_state(optimizer, version_id=version_id, staging_name=state_staging, store=store)
        evidence = _evidence(settings_, result.record, state, champion, ledger)
        record: dict[str, Any] = {
            "trigger": params.trigger,
            "parent": champion.version_id,
            "updates": {
                contribution.update.update_id: {
                    "client_id": contribution.update.device.client_id,
                    "base_version": contribution.update.base_version.version_id,
                    "staleness": contribution.facts.staleness,
                    "reliability": round(contribution.facts.reliability, 6),
                    "share_capped_experts": result.capped.get(contribution.update.update_id, []),
                    **({"claim_bounded": contribution.claim_note} if contribution.claim_note else {}),
                }
                for contribution in contributions
            },
            "rejected": rejected,
            "aggregation": evidence,
            "report": _released(report.to_dict(), private=settings_.privacy is not None),
        }
        has_tokenizer = any(entry.partition == "tokenizer" for entry in champion_manifest.files.values())
        tokenizer = load_tokenizer(champion_directory) if has_tokenizer else None
        # The candidate's own Fisher (of the weights just merged: what devices will train on) and replay set.
        safeguards_staging.mkdir(parents=True)
        safeguard_files, safeguard_note = write_safeguard_files(
            model, tokenizer, safeguards_staging, version_id=version_id
        )
        save_version(
            model,
            staging,
            version_id=version_id,
            parent_version=champion.version_id,
            tokenizer=tokenizer,
            lineage={
                "round": round_.round_id,
                "task": task.pk,
                "updates": list(applied),
                "staleness": {update_id: entry["staleness"] for update_id, entry in record["updates"].items()},
                "aggregation": evidence | {"weights": weights_by_update, "notes": report.notes},
                **({"safeguards": safeguard_note} if safeguard_note else {}),
            },
            safeguard_files=safeguard_files,
        )
        # save_version copied them into the staged version: their own staging goes now, so a worker that dies
        # from here on leaves only the staged version (which the next attempt at this window discards).
        shutil.rmtree(safeguards_staging, ignore_errors=True)
        _crash_if_asked("after_files_written")
        version = _register_candidate(
            task, round_, staging, state_staging, champion, contributions, applied, record, version_id
        )
    finally:
        # Whatever happened (a full disk, a store refusing writes, a lost hold): no staged file of this attempt stays.
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(safeguards_staging, ignore_errors=True)
        staged_path(store, state_staging).unlink(missing_ok=True)
    logger.info(
        "round %s: %d updates onto %s → candidate %s (%d rejected)",
        round_.round_id,
        len(applied),
        champion.version_id,
        version.version_id,
        len(rejected),
    )
    return AggregationOutcome(round_.round_id, version_id, applied, rejected, weights_by_update, record)


def _register_candidate(
    task: TrainingTask,
    round_: Round,
    staging: Path,
    state_staging: str,
    champion: ModelVersion,
    contributions: list[Contribution],
    applied: tuple[str, ...],
    record: dict[str, Any],
    version_id: str,
) -> ModelVersion:
    """The one transaction that makes the candidate real: files (and the optimiser's state) moved into place,
    registry, updates, window."""
    store = artifact_root()
    directory = store / "versions" / version_id
    with transaction.atomic():
        _still_owned(task, round_)
        if directory.exists():
            # Left by an attempt that died before registering it; nothing refers to an unregistered directory.
            shutil.rmtree(directory)
        os.replace(staging, directory)
        install_state(store, state_staging, version_id)
        _crash_if_asked("after_files_moved")
        version = register_saved_version(
            directory,
            family=champion.family,
            actor=ACTOR,
            parent=champion,
            runs=[task_run_ref(TaskKind.EXPERT_AGGREGATION, task.pk)],
            contributing_updates=applied,
        )
        updates = [contribution.update for contribution in contributions]
        mark_updates_applied(updates, version=version, actor=ACTOR)
        for contribution in contributions:
            Update.objects.filter(pk=contribution.update.pk).update(
                staleness=contribution.facts.staleness, content_digest=contribution.content_digest
            )
        close_round(
            round_,
            actor=ACTOR,
            reason=f"aggregated {len(applied)} updates onto {champion.version_id} into {version_id}",
        )
        Round.objects.filter(pk=round_.pk).update(candidate=version, record=record)
        continue_series(round_, base_version=champion, actor=ACTOR)
        try:
            create_training_task(
                kind=TaskKind.EVALUATION,
                actor=Actor.automation(),
                round_=round_,
                params={"version_id": version_id},
            )
        except ValidationError as error:
            # The candidate stands (the devices' updates are in it); only its evaluation cannot start, e.g. no
            # held-out sets in the store yet. Said on the window, for an engineer to create the task once they are.
            problem = "; ".join(error.messages)
            record["evaluation_not_started"] = problem
            Round.objects.filter(pk=round_.pk).update(record=record)
            logger.error("candidate %s registered, but its evaluation cannot start: %s", version_id, problem)
    return version


def aggregation_span(task: TrainingTask) -> AbstractContextManager[Span]:
    """The aggregation's span: it continues the trace of the update that filled the window (the last one buffered
    into it: its device's upload, publish and ingestion), and links to the window's other updates and to what
    created the task, so each of the K uploads' traces is one click away (docs/operations/observability.md)."""
    traceparents = list(
        Update.objects.filter(round=task.round, status=UpdateStatus.BUFFERED)
        .exclude(traceparent="")
        .order_by("-received_at", "-id")
        .values_list("traceparent", flat=True)[:MAX_TRACE_LINKS]
    )
    filling = traceparents[0] if traceparents else task.traceparent
    round_id = task.round.round_id if task.round is not None else ""
    return resumed_span(
        "aggregate_round",
        traceparent=filling,
        links=[*traceparents[1:], task.traceparent],
        attributes={
            "fednested.task_pk": task.pk,
            "fednested.round_id": round_id,
            "fednested.updates": len(traceparents),
        },
        log_round_id=round_id or None,
    )


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
    if not start_training_task(task_pk, actor=ACTOR):
        logger.info("training task %s is not pending; another worker has it", task_pk)
        return None
    task = TrainingTask.objects.select_related("round__base_version__family").get(pk=task_pk)
    try:
        with aggregation_span(task):
            outcome = aggregate_round(task)
    except Exception as error:
        # The task's error is shown through the API: files by their place in the store, not the server's path.
        message = redact_store_paths(f"{type(error).__name__}: {error}", artifact_root())
        fail_training_task(task_pk, error=message, actor=ACTOR)
        raise
    _crash_if_asked("after_register")
    finish_training_task(task_pk, actor=ACTOR)
    return outcome.version_id if outcome is not None else None
