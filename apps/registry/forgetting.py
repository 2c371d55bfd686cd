"""Forgetting reports in the registry: which versions a candidate is compared with, their stored held-out losses, and
recording the report (fednested.evaluation.forgetting computes it; workers/evaluation.py scores what is missing)."""

from collections.abc import Mapping
from dataclasses import dataclass

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from apps.governance.actors import Actor
from apps.governance.audit import record_audit_event
from apps.governance.models import AuditEvent
from apps.registry.choices import VersionStatus
from apps.registry.models import ForgettingReport, ModelVersion, VersionEvaluation
from fednested.evaluation.forgetting import ForgettingReport as Report

CHAMPION_STATUS_VERB = "registry.version.status_changed"


@dataclass(frozen=True)
class ReportLineage:
    """The versions a candidate's report compares it with, oldest first: earlier champions and the parent."""

    earlier: list[ModelVersion]
    champions: list[ModelVersion]
    parent: ModelVersion | None


def _ever_champion(versions: list[ModelVersion]) -> set[int]:
    """Pks of `versions` that are or were champion: every status change is audited, so the trail says which were."""
    pks = {version.pk for version in versions if version.status == VersionStatus.CHAMPION}
    promoted = AuditEvent.objects.filter(
        verb=CHAMPION_STATUS_VERB,
        object_type="registry.modelversion",
        object_id__in=[str(version.pk) for version in versions],
        data__to=VersionStatus.CHAMPION,
    ).values_list("object_id", flat=True)
    return pks | {int(pk) for pk in promoted}


def report_lineage(version: ModelVersion, *, depth: int | None = None) -> ReportLineage:
    """The parent and the last `depth` (FEDNESTED_FORGETTING_LINEAGE_DEPTH) champions among `version`'s ancestors.

    The depth bounds the work: each compared version without stored scores on the held-out sets is scored again.
    """
    depth = settings.FEDNESTED_FORGETTING_LINEAGE_DEPTH if depth is None else depth
    ancestors = version.ancestors()
    champion_pks = _ever_champion(ancestors)
    champions = [ancestor for ancestor in ancestors if ancestor.pk in champion_pks][:depth]
    parent = version.parent
    chosen = {ancestor.pk for ancestor in champions} | ({parent.pk} if parent is not None else set())
    earlier = [ancestor for ancestor in reversed(ancestors) if ancestor.pk in chosen]
    return ReportLineage(earlier=earlier, champions=list(reversed(champions)), parent=parent)


def stored_losses(version: ModelVersion, heldout: str) -> dict[str, float] | None:
    """domain → `version`'s recorded loss, if its recorded evaluation was on the held-out sets `heldout`; else None."""
    rows = list(VersionEvaluation.objects.filter(version=version).values_list("domain", "loss", "heldout"))
    if not rows or any(row_heldout != heldout for _, _, row_heldout in rows):
        return None
    return {domain: loss for domain, loss, _ in rows}


@transaction.atomic
def record_forgetting_report(
    version: ModelVersion, report: Report, *, heldout: str, actor: Actor, scored: Mapping[str, str]
) -> ForgettingReport:
    """Store `report` as `version`'s forgetting report (replacing an earlier one); audited with its summary figures.

    `scored` says, per compared version, where its losses came from ('stored' rows or 'scored' again), so the trail
    shows what was measured in this run.
    """
    if report.candidate != version.version_id:
        raise ValueError(f"the report is of {report.candidate!r}, not of version {version.version_id!r}")
    data = {**report.to_json(), "heldout": heldout, "sources": dict(scored)}
    row, _ = ForgettingReport.objects.update_or_create(
        version=version,
        defaults={
            "report": data,
            "average_forgetting": report.average_forgetting,
            "backward_transfer": report.backward_transfer,
            "heldout": heldout[:500],
            "computed_by_label": actor.label,
            "computed_at": timezone.now(),
        },
    )
    record_audit_event(
        actor=actor,
        verb="registry.version.forgetting_reported",
        target=version,
        data={
            "version_id": version.version_id,
            "compared_with": list(report.versions[:-1]),
            "average_forgetting": report.average_forgetting,
            "backward_transfer": report.backward_transfer,
            "sources": dict(scored),
        },
    )
    return row
