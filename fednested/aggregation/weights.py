"""Per-expert aggregation weights for buffered edge updates: staleness, routed tokens, data size, reliability.

The raw weight of update i for expert e is the product of the enabled factors

    w[i, e] = (1 + τ_i)^(-a)  ·  t[i, e]  ·  n_i  ·  ρ_i

with τ_i how many versions the update's base is behind the current champion (FedAsync's polynomial staleness
function; a = 0.5 is FedBuff's 1/sqrt(1 + τ)), t[i, e] the tokens the device routed to expert e, n_i its number of
training examples and ρ_i its reliability in [0, 1]. Each factor can be switched off (it is then 1). Weights are then
normalised per expert, ŵ[i, e] = w[i, e] / Σ_j w[j, e], so an expert's aggregate is a convex combination of the
deltas that touched it, and an expert no update routed tokens to keeps weight 0 everywhere (it is left unchanged).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

ExpertId = TypeVar("ExpertId", bound=Hashable)


@dataclass(frozen=True)
class WeightingConfig:
    """Which factors make up an update's per-expert weight (see the module docstring for the formula)."""

    # a in (1 + τ)^(-a); 0 turns staleness weighting off.
    staleness_exponent: float = 0.5
    by_routed_tokens: bool = True
    # Off by default: routed tokens already grow with the amount of local data, so both would count it twice.
    by_examples: bool = False
    by_reliability: bool = True

    def __post_init__(self) -> None:
        if not (math.isfinite(self.staleness_exponent) and self.staleness_exponent >= 0):
            raise ValueError(f"staleness_exponent must be a finite number >= 0, got {self.staleness_exponent}")


@dataclass(frozen=True)
class UpdateFacts(Generic[ExpertId]):
    """What weighting needs to know about one update; `experts` are the experts it carries deltas for."""

    update_id: str
    experts: frozenset[ExpertId]
    staleness: int
    examples: int
    routed_tokens: Mapping[ExpertId, int] = field(default_factory=dict)
    reliability: float = 1.0

    def __post_init__(self) -> None:
        if self.staleness < 0:
            raise ValueError(f"update {self.update_id}: staleness must be >= 0, got {self.staleness}")
        if self.examples < 0:
            raise ValueError(f"update {self.update_id}: examples must be >= 0, got {self.examples}")
        if not (0.0 <= self.reliability <= 1.0):
            raise ValueError(f"update {self.update_id}: reliability must lie in [0, 1], got {self.reliability}")
        negative = {expert: tokens for expert, tokens in self.routed_tokens.items() if tokens < 0}
        if negative:
            raise ValueError(f"update {self.update_id}: routed token counts must be >= 0, got {negative}")


def staleness_weight(staleness: int, exponent: float) -> float:
    """(1 + τ)^(-a): 1 for an update on the current champion, decreasing in τ; a = 0 gives 1 for every τ."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    return float((1.0 + staleness) ** (-exponent))


def raw_expert_weights(update: UpdateFacts[ExpertId], config: WeightingConfig) -> dict[ExpertId, float]:
    """The unnormalised weight w[i, e] of one update for each expert it carries (formula in the module docstring).

    An expert the device routed no tokens to gets weight 0 when routed-token weighting is on: the device never
    exercised that expert, so its delta there carries no information.
    """
    per_update = staleness_weight(update.staleness, config.staleness_exponent)
    if config.by_examples:
        per_update *= update.examples
    if config.by_reliability:
        per_update *= update.reliability
    weights: dict[ExpertId, float] = {}
    for expert in update.experts:
        tokens = update.routed_tokens.get(expert, 0) if config.by_routed_tokens else 1
        weights[expert] = per_update * tokens
    return weights


def normalise_per_expert(weights: Sequence[Mapping[ExpertId, float]]) -> list[dict[ExpertId, float]]:
    """Scale each expert's weights across updates to sum to 1; an expert whose weights are all 0 stays all 0.

    Raises ValueError naming the update index and expert for a negative or non-finite weight.
    """
    totals: dict[ExpertId, float] = {}
    for index, update_weights in enumerate(weights):
        for expert, weight in update_weights.items():
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"update #{index}, expert {expert!r}: weight must be finite and >= 0, got {weight}")
            totals[expert] = totals.get(expert, 0.0) + weight
    return [
        {expert: (weight / totals[expert] if totals[expert] > 0 else 0.0) for expert, weight in update_weights.items()}
        for update_weights in weights
    ]


def expert_weights(updates: Sequence[UpdateFacts[ExpertId]], config: WeightingConfig) -> list[dict[ExpertId, float]]:
    """Normalised per-expert weights ŵ[i, e] for a buffer of updates, in the order given."""
    return normalise_per_expert([raw_expert_weights(update, config) for update in updates])
