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
import statistics
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
    # No update's share of an expert's weight exceeds this (water-filling), applied to the routed-token claims and
    # again to the final weights when the expert has enough contributors for it (n·cap > 1). Below one half, so that
    # no single update holds the weighted median. None = no cap.
    max_update_share: float | None = 0.4

    def __post_init__(self) -> None:
        if not (math.isfinite(self.staleness_exponent) and self.staleness_exponent >= 0):
            raise ValueError(f"staleness_exponent must be a finite number >= 0, got {self.staleness_exponent}")
        share = self.max_update_share
        if share is not None and not (math.isfinite(share) and 0 < share <= 1):
            raise ValueError(f"max_update_share must be None or a number in (0, 1], got {share}")


@dataclass(frozen=True)
class UpdateFacts(Generic[ExpertId]):
    """What weighting needs to know about one update; `experts` are the experts it carries deltas for."""

    update_id: str
    experts: frozenset[ExpertId]
    staleness: int
    examples: int
    routed_tokens: Mapping[ExpertId, int] = field(default_factory=dict)
    reliability: float = 1.0
    # Who sent it (a device's client id): the share cap holds per sender, so one device sending many update ids
    # gets no more than one. Empty: the update is its own sender.
    sender: str = ""

    @property
    def sender_key(self) -> str:
        return self.sender or f"update:{self.update_id}"

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


def cap_shares(values: Sequence[float], cap: float) -> list[float]:
    """`values` as shares summing to 1 with none above `cap` (water-filling: capped entries are fixed at the cap,
    the rest keep their proportions). Zeros stay 0; when fewer than 1/cap entries are positive, they share equally."""
    if not (0 < cap <= 1):
        raise ValueError(f"cap must lie in (0, 1], got {cap}")
    positive = [index for index, value in enumerate(values) if value > 0]
    shares = [0.0] * len(values)
    if not positive:
        return shares
    if cap * len(positive) <= 1:
        for index in positive:
            shares[index] = 1.0 / len(positive)
        return shares
    capped: set[int] = set()
    while True:
        free = [index for index in positive if index not in capped]
        free_total = sum(values[index] for index in free)
        remaining = 1.0 - cap * len(capped)
        over = [index for index in free if values[index] / free_total * remaining > cap]
        if not over:
            for index in free:
                shares[index] = values[index] / free_total * remaining
            for index in capped:
                shares[index] = cap
            return shares
        capped.update(over)


@dataclass(frozen=True)
class WeightPlan(Generic[ExpertId]):
    """Normalised per-expert weights, and for each update the experts whose routed-token claim was capped."""

    weights: list[dict[ExpertId, float]]
    capped: dict[str, list[ExpertId]]


def _capped_by_sender(values: Sequence[float], senders: Sequence[str], cap: float) -> tuple[list[float], set[int]]:
    """Shares of `values` (summing to 1) with no sender's total above `cap`, each sender's share split among its
    entries in proportion; and which entries lost share to the cap."""
    totals: dict[str, float] = {}
    for sender, value in zip(senders, values, strict=True):
        totals[sender] = totals.get(sender, 0.0) + value
    order = list(totals)
    capped_totals = dict(zip(order, cap_shares([totals[sender] for sender in order], cap), strict=True))
    overall = sum(values)
    shares, lost = [], set()
    for index, (sender, value) in enumerate(zip(senders, values, strict=True)):
        share = capped_totals[sender] * value / totals[sender] if totals[sender] > 0 else 0.0
        if overall > 0 and value / overall > share + 1e-12:
            lost.add(index)
        shares.append(share)
    return shares, lost


def bounded_expert_weights(updates: Sequence[UpdateFacts[ExpertId]], config: WeightingConfig) -> WeightPlan[ExpertId]:
    """ŵ[i, e] with each sender's share of expert e capped at `max_update_share`.

    What a device claims (routed tokens, and examples when weighted) is capped first, before the server's own
    factors (staleness, reliability) are applied; then, where the expert has more than 1/cap senders, the final
    normalised weights are capped too, so no factor lets one sender own an expert. With fewer senders the final
    cap cannot hold: their claims then count equally and staleness still counts. The cap is per sender (device),
    so many update ids from one device weigh no more than one.
    """
    cap = config.max_update_share
    if cap is None:
        return WeightPlan(expert_weights_uncapped(updates, config), {})
    server = [
        staleness_weight(update.staleness, config.staleness_exponent)
        * (update.reliability if config.by_reliability else 1.0)
        for update in updates
    ]
    experts = sorted({expert for update in updates for expert in update.experts}, key=str)
    capped: dict[str, list[ExpertId]] = {}

    def mark(index: int, expert: ExpertId) -> None:
        listed = capped.setdefault(updates[index].update_id, [])
        if expert not in listed:
            listed.append(expert)

    raw: list[dict[ExpertId, float]] = [{} for _ in updates]
    for expert in experts:
        carriers = [index for index, update in enumerate(updates) if expert in update.experts]
        claims = [
            float(updates[index].routed_tokens.get(expert, 0) if config.by_routed_tokens else 1)
            * float(updates[index].examples if config.by_examples else 1)
            for index in carriers
        ]
        shares, lost = _capped_by_sender(claims, [updates[index].sender_key for index in carriers], cap)
        for position, (index, share) in enumerate(zip(carriers, shares, strict=True)):
            raw[index][expert] = server[index] * share
            if position in lost:
                mark(index, expert)
    weights = normalise_per_expert(raw)
    for expert in experts:
        carriers = [index for index, weight in enumerate(weights) if weight.get(expert, 0.0) > 0]
        senders = [updates[index].sender_key for index in carriers]
        if cap * len(set(senders)) <= 1:
            continue
        shares, lost = _capped_by_sender([weights[index][expert] for index in carriers], senders, cap)
        for position, (index, share) in enumerate(zip(carriers, shares, strict=True)):
            weights[index][expert] = share
            if position in lost:
                mark(index, expert)
    return WeightPlan(weights, capped)


def expert_weights_uncapped(
    updates: Sequence[UpdateFacts[ExpertId]], config: WeightingConfig
) -> list[dict[ExpertId, float]]:
    """ŵ[i, e] from the raw claims, without the share cap (what the cap is measured against)."""
    return normalise_per_expert([raw_expert_weights(update, config) for update in updates])


def expert_weights(updates: Sequence[UpdateFacts[ExpertId]], config: WeightingConfig) -> list[dict[ExpertId, float]]:
    """Normalised per-expert weights ŵ[i, e] for a buffer of updates, in the order given (claims capped)."""
    return bounded_expert_weights(updates, config).weights


def reliability_from_history(accepted: int, rejected: int) -> float:
    """A device's reliability ρ from its own record: the posterior mean (accepted + 1) / (accepted + rejected + 2)
    of a Beta(1, 1) prior: 0.5 for a device with no record, near 1 after a long clean record; every rejected update
    (bad signature, NaN, oversized, …) pulls it down."""
    if accepted < 0 or rejected < 0:
        raise ValueError(f"counts must be >= 0, got accepted={accepted}, rejected={rejected}")
    return (accepted + 1) / (accepted + rejected + 2)


def bound_claimed_tokens(
    routed_tokens: Mapping[ExpertId, int], *, claimed_tokens: float, history: Sequence[float], factor: float
) -> tuple[dict[ExpertId, int], str | None]:
    """Routed-token counts scaled down when the update claims more training tokens than `factor` × the median of
    the device's earlier accepted claims (`history`, at least 3 of them); the reason says by how much."""
    if len(history) < 3 or claimed_tokens <= 0:
        return dict(routed_tokens), None
    ceiling = factor * statistics.median(history)
    if claimed_tokens <= ceiling:
        return dict(routed_tokens), None
    ratio = ceiling / claimed_tokens
    bounded = {expert: int(tokens * ratio) for expert, tokens in routed_tokens.items()}
    return bounded, (
        f"claims {claimed_tokens:.0f} training tokens, over {factor:g}× the median {statistics.median(history):.0f} "
        f"of the device's last {len(history)} accepted updates; routed tokens scaled by {ratio:.4g}"
    )
