"""Per-domain evaluation of a version beside its parent's: the comparison the version page shows officers.

`compare_domains` is pure; `latest_evaluation` is the one place that knows where the workers record evaluations.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from apps.governance.models import AuditEvent

EVALUATED_VERB = "registry.version.evaluated"
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


def _score(entry: Any, field: str) -> float | None:
    if not isinstance(entry, Mapping):
        return None
    value = entry.get(field)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def compare_domains(
    version_scores: Mapping[str, Mapping[str, Any]] | None, parent_scores: Mapping[str, Mapping[str, Any]] | None
) -> list[DomainComparison]:
    """Rows for every domain either side was evaluated on, sorted by name.

    Each side maps domain → {"loss": float, "perplexity": float, ...}; a missing side or value gives None there.
    """
    version_scores = version_scores or {}
    parent_scores = parent_scores or {}
    rows = []
    for domain in sorted(set(version_scores) | set(parent_scores)):
        mine, theirs = version_scores.get(domain), parent_scores.get(domain)
        rows.append(
            DomainComparison(
                domain=domain,
                loss=_score(mine, "loss"),
                parent_loss=_score(theirs, "loss"),
                perplexity=_score(mine, "perplexity"),
                parent_perplexity=_score(theirs, "perplexity"),
            )
        )
    return rows


@dataclass(frozen=True)
class RecordedEvaluation:
    """A version's per-domain scores as the evaluation worker recorded them, with its parent's from the same run."""

    scores: Mapping[str, Mapping[str, Any]]
    parent_scores: Mapping[str, Mapping[str, Any]] | None
    heldout: str
    recorded_at: datetime


def latest_evaluation(version: Any) -> RecordedEvaluation | None:
    """The newest evaluation recorded for `version`, or None if it was never evaluated.

    The evaluation worker records each run as an audit event (verb `registry.version.evaluated`) whose data holds
    `domains` (domain → {"loss", "perplexity", "tokens", "records"}) and `parent_domains` (the parent scored on the
    same held-out sets in the same run, so the two compare exactly).
    """
    event = (
        AuditEvent.objects.filter(verb=EVALUATED_VERB, object_type="registry.modelversion", object_id=str(version.pk))
        .order_by("-created_at", "-id")
        .first()
    )
    if event is None or not isinstance(event.data.get("domains"), Mapping):
        return None
    parent = event.data.get("parent_domains")
    return RecordedEvaluation(
        scores=event.data["domains"],
        parent_scores=parent if isinstance(parent, Mapping) else None,
        heldout=str(event.data.get("heldout", "")),
        recorded_at=event.created_at,
    )


def domain_losses(version: Any) -> dict[str, float]:
    """domain → held-out loss of the latest evaluation of `version` (empty if never evaluated)."""
    evaluation = latest_evaluation(version)
    if evaluation is None:
        return {}
    rows = compare_domains(evaluation.scores, None)
    return {row.domain: row.loss for row in rows if row.loss is not None}
