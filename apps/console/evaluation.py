"""Per-domain evaluation of a version beside its parent's: the comparison the version page shows officers.

The evaluation worker records one `registry.VersionEvaluation` row per domain, with the parent's scores on the same
held-out set; `DomainComparison` turns a row into what the page shows (change, relative change, verdict).
"""

from dataclasses import dataclass
from datetime import datetime

from apps.registry.models import ModelVersion, VersionEvaluation

# Relative loss changes smaller than this read as "no change": evaluation noise on held-out sets of a few
# hundred tokens is about this size, and calling it an improvement would mislead an officer.
UNCHANGED_RELATIVE_TOLERANCE = 0.005


@dataclass(frozen=True)
class DomainComparison:
    """One row of the per-domain table: loss and perplexity of the version and its parent on one domain."""

    domain: str
    loss: float | None
    parent_loss: float | None
    perplexity: float | None
    parent_perplexity: float | None

    @property
    def loss_delta(self) -> float | None:
        if self.loss is None or self.parent_loss is None:
            return None
        return self.loss - self.parent_loss

    @property
    def relative_change(self) -> float | None:
        delta = self.loss_delta
        if delta is None or self.parent_loss is None or self.parent_loss == 0:
            return None
        return delta / self.parent_loss

    @property
    def verdict(self) -> str:
        """'better', 'worse', 'same', or 'unknown' when one side was not evaluated on this domain."""
        change = self.relative_change
        if change is None:
            return "unknown"
        if abs(change) < UNCHANGED_RELATIVE_TOLERANCE:
            return "same"
        return "better" if change < 0 else "worse"


@dataclass(frozen=True)
class VersionEvaluationSummary:
    """A version's recorded evaluation: one comparison per domain, and when, by whom and on what it was scored."""

    rows: list[DomainComparison]
    evaluated_at: datetime
    evaluated_by: str
    heldout: str

    @property
    def has_parent_scores(self) -> bool:
        return any(row.parent_loss is not None for row in self.rows)


def compare(row: VersionEvaluation, fallback_parent: VersionEvaluation | None = None) -> DomainComparison:
    """The comparison of one recorded row; `fallback_parent` (the parent's own row) fills in missing parent scores."""
    parent_loss, parent_perplexity = row.parent_loss, row.parent_perplexity
    if parent_loss is None and fallback_parent is not None:
        parent_loss, parent_perplexity = fallback_parent.loss, fallback_parent.perplexity
    return DomainComparison(
        domain=row.domain,
        loss=row.loss,
        parent_loss=parent_loss,
        perplexity=row.perplexity,
        parent_perplexity=parent_perplexity,
    )


def evaluation_summary(version: ModelVersion) -> VersionEvaluationSummary | None:
    """The version's per-domain comparisons, or None if it was never evaluated."""
    rows = list(VersionEvaluation.objects.filter(version=version).order_by("domain"))
    if not rows:
        return None
    parent_rows: dict[str, VersionEvaluation] = {}
    if version.parent_id is not None and any(row.parent_loss is None for row in rows):
        # Rows recorded without the parent's scores: fall back to the parent's own evaluation of the domain.
        parent_rows = {row.domain: row for row in VersionEvaluation.objects.filter(version_id=version.parent_id)}
    return VersionEvaluationSummary(
        rows=[compare(row, parent_rows.get(row.domain)) for row in rows],
        evaluated_at=max(row.evaluated_at for row in rows),
        evaluated_by=rows[0].evaluated_by_label,
        heldout=rows[0].heldout,
    )


def domain_losses(version: ModelVersion) -> dict[str, float]:
    """domain → recorded held-out loss of `version` (empty if never evaluated)."""
    return dict(VersionEvaluation.objects.filter(version=version).order_by("domain").values_list("domain", "loss"))
