"""What the ingest worker and the aggregation task both need to know about a round: its settings, its buffer, and how
stale an update's base version is."""

from django.db.models import QuerySet

from apps.federation.choices import UpdateStatus
from apps.federation.models import Round, Update
from apps.registry.choices import CHAMPION_ALIAS
from apps.registry.models import Alias, ModelVersion
from fednested.aggregation import BufferPolicy
from fednested.aggregation.settings import RoundAggregationSettings
from fednested.checkpoints import CheckpointError, Manifest

# Edge updates without a round are checked against these (the defaults of RoundAggregationSettings).
DEFAULT_SETTINGS = RoundAggregationSettings()


def round_settings(round_: Round | None) -> RoundAggregationSettings:
    """The round's aggregation settings; raises RoundSettingsError naming the round and the bad key."""
    if round_ is None:
        return DEFAULT_SETTINGS
    return RoundAggregationSettings.from_mapping(round_.config, where=f"round {round_.round_id!r} config")


def buffer_policy(round_: Round, settings: RoundAggregationSettings) -> BufferPolicy:
    """K = the round's buffer size; the deadline is the round's, or earlier when the round sets max_wait_s."""
    return BufferPolicy(
        size=round_.buffer_size_k,
        max_wait=settings.max_wait,
        deadline_at=round_.deadline_at,
        min_size_at_deadline=min(settings.min_updates_at_deadline, round_.buffer_size_k),
    )


def buffered_updates(round_: Round) -> QuerySet[Update]:
    """The round's updates waiting for aggregation, oldest first (the order aggregation sums them in)."""
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
    """τ: how many versions `base` is behind `champion` along the champion's parent chain.

    0 when there is no champion yet, when base is the champion, or when base descends from it (a round on a newer
    candidate); None when base lies on another branch, so the update cannot be placed relative to the champion.
    """
    if champion is None or base.pk == champion.pk:
        return 0
    for steps, ancestor in enumerate(champion.ancestors(), start=1):
        if ancestor.pk == base.pk:
            return steps
    if any(ancestor.pk == champion.pk for ancestor in base.ancestors()):
        return 0
    return None


def version_manifest(version: ModelVersion) -> Manifest:
    """The registered manifest as a fednested Manifest; raises CheckpointError when it is not one (no partition map)."""
    manifest = Manifest.from_dict(version.manifest, path=f"registry:{version.version_id}/manifest.json")
    if manifest.partition is None:
        raise CheckpointError(f"registry:{version.version_id}/manifest.json", "invalid", "no partition map")
    return manifest
