"""Aggregation windows (rounds): their settings and buffers, the champion line that staleness is counted on, and
when a window is ready to aggregate. Read by the update service and the aggregation worker alike."""

import math
from dataclasses import dataclass
from datetime import datetime

from django.db.models import QuerySet

from apps.federation.choices import RoundMode, RoundStatus, TaskKind, TaskStatus, UpdateStatus
from apps.federation.models import Round, TrainingTask, Update
from apps.governance.choices import ApprovalStatus
from apps.registry.choices import CHAMPION_ALIAS, VersionStatus
from apps.registry.models import Alias, ModelVersion
from fednested.aggregation import BufferPolicy
from fednested.aggregation.settings import RoundAggregationSettings
from fednested.checkpoints import CheckpointError, Manifest

# Edge updates that wait without a window are checked against these (the defaults of RoundAggregationSettings).
DEFAULT_SETTINGS = RoundAggregationSettings()


def round_settings(round_: Round | None) -> RoundAggregationSettings:
    """The window's aggregation settings; raises RoundSettingsError naming the round and the bad key."""
    if round_ is None:
        return DEFAULT_SETTINGS
    return RoundAggregationSettings.from_mapping(round_.config, where=f"round {round_.round_id!r} config")


def buffered_updates(round_: Round) -> QuerySet[Update]:
    """The window's updates waiting for aggregation, oldest first (the order aggregation sums them in)."""
    return (
        Update.objects.filter(round=round_, status=UpdateStatus.BUFFERED)
        .select_related("device", "base_version")
        .order_by("received_at", "id")
    )


def champion_version() -> ModelVersion | None:
    """The version the `champion` alias points at, if any."""
    alias = Alias.objects.select_related("version").filter(name=CHAMPION_ALIAS).first()
    return alias.version if alias is not None else None


def staleness_of(base: ModelVersion, champion: ModelVersion | None) -> int | None:
    """τ: how many promotions `base` is behind `champion`, i.e. its distance along the champion's parent chain
    (every candidate is built on the champion of its day, so that chain is the line of promotions).

    0 when base is the champion or there is no champion yet; None when base is not the champion or one of its
    ancestors (another branch, or a candidate never promoted): such an update cannot be placed on the line.
    """
    if champion is None or base.pk == champion.pk:
        return 0
    for steps, ancestor in enumerate(champion.ancestors(), start=1):
        if ancestor.pk == base.pk:
            return steps
    return None


def version_manifest(version: ModelVersion) -> Manifest:
    """The registered manifest as a fednested Manifest; raises CheckpointError when it is not one (no partition map)."""
    manifest = Manifest.from_dict(version.manifest, path=f"registry:{version.version_id}/manifest.json")
    if manifest.partition is None:
        raise CheckpointError(f"registry:{version.version_id}/manifest.json", "invalid", "no partition map")
    return manifest


def pending_candidate() -> ModelVersion | None:
    """A candidate built by a window that still awaits an officer's decision.

    While one waits, no window aggregates: a second candidate would be built on the same champion and one of the
    two would discard the other's updates. Updates keep arriving and buffering meanwhile, and their staleness is
    counted against whichever version is champion when they are finally aggregated.
    """
    round_ = (
        Round.objects.filter(candidate__status=VersionStatus.CANDIDATE)
        .select_related("candidate")
        .order_by("closed_at", "id")
        .first()
    )
    return round_.candidate if round_ is not None else None


@dataclass(frozen=True)
class Readiness:
    """Whether a window should aggregate now: `trigger` says why it is ready, `waiting` why a ready one waits."""

    ready: bool
    trigger: str | None = None
    waiting: str | None = None


def window_readiness(round_: Round, settings: RoundAggregationSettings, now: datetime) -> Readiness:
    """Asynchronous: K buffered, or the deadline with at least `min_updates_at_deadline`. Synchronous: every cohort
    member reported, or the deadline with at least `min_cohort_fraction` of them. Either waits while an earlier
    window's candidate awaits a decision."""
    if round_.status != RoundStatus.OPEN:
        return Readiness(ready=False)
    updates = buffered_updates(round_)
    late: str | None = None
    if round_.mode == RoundMode.SYNC:
        cohort = set(round_.cohort.values_list("pk", flat=True))
        reported = set(updates.values_list("device_id", flat=True)) & cohort
        needed = max(1, math.ceil(settings.min_cohort_fraction * len(cohort)))
        if cohort and reported == cohort:
            trigger: str | None = "cohort_complete"
        elif now >= round_.deadline_at and len(reported) >= needed:
            trigger = "deadline"
        else:
            trigger = None
            if now >= round_.deadline_at:
                late = (
                    f"the deadline passed with {len(reported)} of {len(cohort)} cohort devices reported; "
                    f"{needed} are needed (min_cohort_fraction {settings.min_cohort_fraction})"
                )
    else:
        # K counts devices, not updates: one device sending many update ids does not fill a window by itself.
        count = updates.values("device_id").distinct().count()
        policy = BufferPolicy(
            size=round_.buffer_size_k,
            max_wait=settings.max_wait,
            deadline_at=round_.deadline_at,
            min_size_at_deadline=min(settings.min_updates_at_deadline, round_.buffer_size_k),
        )
        oldest = updates.values_list("received_at", flat=True).first()
        decision = policy.decide(buffered=count, oldest_received_at=oldest, now=now)
        trigger = decision.reason.value if decision.ready and decision.reason is not None else None
    if trigger is None:
        return Readiness(ready=False, waiting=late)
    # One aggregation at a time: another window that is being aggregated, or whose task waits for a worker, would
    # build its candidate on the same champion.
    busy = (
        Round.objects.filter(status=RoundStatus.AGGREGATING).exclude(pk=round_.pk).values_list("round_id", flat=True)
    ).first() or (
        TrainingTask.objects.filter(
            kind=TaskKind.EXPERT_AGGREGATION, status__in=[TaskStatus.PENDING, TaskStatus.RUNNING], round__isnull=False
        )
        .exclude(round=round_)
        .values_list("round__round_id", flat=True)
        .first()
    )
    if busy is not None:
        return Readiness(ready=False, trigger=trigger, waiting=f"window {busy} is being aggregated")
    waiting_on = pending_candidate()
    if waiting_on is not None:
        return Readiness(ready=False, trigger=trigger, waiting=_why_pending(waiting_on))
    return Readiness(ready=True, trigger=trigger)


def _why_pending(candidate: ModelVersion) -> str:
    """What a window waits for: an officer's decision, or (when its evaluation failed and no officer was asked) an
    engineer who evaluates it again (POST /api/v1/tasks/, kind evaluation)."""
    if candidate.approval_requests.filter(status=ApprovalStatus.PENDING).exists():
        return f"candidate {candidate.version_id} awaits an officer's decision"
    failed = (
        TrainingTask.objects.filter(
            kind=TaskKind.EVALUATION, params__version_id=candidate.version_id, status=TaskStatus.FAILED
        )
        .order_by("-finished_at", "-id")
        .first()
    )
    if failed is not None:
        return (
            f"candidate {candidate.version_id} could not be evaluated (task {failed.pk}: {failed.error[:200]}); "
            "evaluate it again (POST /api/v1/tasks/, kind evaluation) so an officer can decide"
        )
    return f"candidate {candidate.version_id} is being evaluated"
