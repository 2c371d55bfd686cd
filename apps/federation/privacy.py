"""The federation's differential-privacy ledger: every noised aggregation it ever released, read from the registry.

Each candidate's manifest records the noise multiplier its aggregation really used (`lineage.aggregation.privacy`),
so the ledger is the registry itself: no second counter that could drift from what was released. Every registered
candidate counts, promoted or not, because officers and the evaluation saw each one. ε is composed over all of them
with the RDP accountant of `fednested.aggregation.privacy`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ValidationError

from apps.registry.models import ModelVersion
from fednested.aggregation.privacy import PrivacyBudgetExceeded, PrivacyConfig, check_budget, epsilon_for


@dataclass(frozen=True)
class PrivacyLedger:
    """The noise multipliers of every noised aggregation so far, and how many aggregations added no noise."""

    noise_multipliers: tuple[float, ...]
    unprotected: int

    def epsilon(self, delta: float) -> float:
        return epsilon_for(self.noise_multipliers, delta)


def _noise_multiplier(manifest: Any) -> float | bool | None:
    """The noise multiplier of a candidate's aggregation; None for one without noise; False for no aggregation."""
    lineage = manifest.get("lineage") if isinstance(manifest, dict) else None
    aggregation = lineage.get("aggregation") if isinstance(lineage, dict) else None
    if not isinstance(aggregation, dict):
        return False
    privacy = aggregation.get("privacy")
    if not isinstance(privacy, dict):
        return None
    value = privacy.get("noise_multiplier")
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    return None


def privacy_ledger() -> PrivacyLedger:
    """Every aggregated version in the registry, in the order they were registered."""
    multipliers: list[float] = []
    unprotected = 0
    manifests = ModelVersion.objects.filter(manifest__lineage__has_key="aggregation").order_by("created_at", "id")
    for manifest in manifests.values_list("manifest", flat=True).iterator(chunk_size=500):
        value = _noise_multiplier(manifest)
        if value is None:
            unprotected += 1
        elif value is not False:
            multipliers.append(float(value))
    return PrivacyLedger(tuple(multipliers), unprotected)


def check_round_budget(privacy: PrivacyConfig | None, *, planned: int, field: str = "config") -> float | None:
    """ε after the ledger plus `planned` more aggregations with `privacy`; a ValidationError on `field` saying by how
    much when that exceeds the budget. None when the round adds no noise."""
    if privacy is None:
        return None
    ledger = privacy_ledger()
    try:
        return check_budget(ledger.noise_multipliers, privacy, planned=planned)
    except PrivacyBudgetExceeded as error:
        raise ValidationError({field: str(error)}) from error
