"""Per-domain evaluation of a version beside its parent's: the comparison the version page shows officers.

`compare_domains` is pure; `evaluation_of` is the one place that knows where the workers store evaluations.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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


def evaluation_of(version: Any) -> Mapping[str, Mapping[str, Any]] | None:
    """Per-domain scores of `version` (domain → {"loss", "perplexity", "tokens"}), or None if never evaluated."""
    manifest = getattr(version, "manifest", None)
    if not isinstance(manifest, Mapping):
        return None
    scores = manifest.get("evaluation")
    return scores if isinstance(scores, Mapping) else None
