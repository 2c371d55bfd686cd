"""One window's updates → the steps merged into the champion's experts: weights, the robust rule or DP's clipped and
noised mean, then the server optimiser. The aggregation worker and the federated benchmark both call
`combine_window`, so what the benchmark measures is what the worker does.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fednested.aggregation.aggregate import expert_of_delta
from fednested.aggregation.factored import AggregationReport, aggregate_factored
from fednested.aggregation.factors import FactorSource
from fednested.aggregation.privacy import PrivacyConfig, secure_generator
from fednested.aggregation.server_optimizers import ServerOptimizer
from fednested.aggregation.settings import RoundAggregationSettings, dp_conflict
from fednested.aggregation.weights import UpdateFacts, bounded_expert_weights
from fednested.deltas import DeltaKey


@dataclass
class WindowResult:
    """What combining a window did: how many (param, expert) steps were emitted, the aggregation's report, and the
    JSON-able evidence kept with the candidate's lineage (optimiser, rule and what it cut, privacy)."""

    steps: int
    report: AggregationReport
    record: dict[str, Any]
    # update id → expert → the weight its delta had in that expert's aggregate (DP: 1/K for every expert it carries).
    weights: dict[str, dict[str, float]] = field(default_factory=dict)
    # update id → experts whose share cap (max_update_share) lowered its weight (never under DP: weights are uniform).
    capped: dict[str, list[str]] = field(default_factory=dict)


def combine_window(
    sources: Sequence[FactorSource],
    facts: Sequence[UpdateFacts[str]],
    settings: RoundAggregationSettings,
    optimizer: ServerOptimizer,
    emit: Callable[[DeltaKey, Tensor], None],
    *,
    update_norms: Mapping[str, float] | None = None,
    generator: torch.Generator | None = None,
    key_shapes: Mapping[DeltaKey, tuple[int, ...]] | None = None,
) -> WindowResult:
    """Combine the window's updates and hand each step to `emit(key, step)`; the caller merges it with eta = 1
    (the optimiser's η is in the step).

    Without DP the weights are `bounded_expert_weights` of `facts` and the rule is the round's
    (`aggregate_factored`). With DP (`settings.privacy`), see `_private_window`: `update_norms` (the joint L2 norm of
    each whole update, over all its deltas; read from the sources when None) decides its clip, `generator` draws the
    noise (a `secure_generator()` when None), and `key_shapes` — every (param, expert) delta of the model with its
    shape — makes the noise cover experts no update in the window carried, so that which experts were trained is
    not revealed either; without it only the keys the updates carry are noised (the record says so).
    `sources[i]` and `facts[i]` must describe the same update.
    """
    if len(sources) != len(facts):
        raise ValueError(f"{len(sources)} updates but {len(facts)} update facts")
    for source, fact in zip(sources, facts, strict=True):
        if source.update_id != fact.update_id:
            raise ValueError(f"sources and facts are misaligned: update {source.update_id} next to {fact.update_id}")
    if optimizer.config != settings.server_optimizer:
        raise ValueError(
            f"the optimiser is {optimizer.config.to_dict()} but the round's settings say "
            f"{settings.server_optimizer.to_dict()}: resume it from the settings (resume_server_optimizer)"
        )
    emitted = 0

    def step(key: DeltaKey, delta: Tensor) -> None:
        nonlocal emitted
        emit(key, optimizer.step(key, delta))
        emitted += 1

    privacy_record: dict[str, Any] | None = None
    if settings.privacy is None:
        plan = bounded_expert_weights(facts, settings.aggregation.weighting)
        report = aggregate_factored(sources, plan.weights, settings.aggregation, step)
        capped = plan.capped
        weights = {source.update_id: dict(plan.weights[i]) for i, source in enumerate(sources)}
    else:
        report, privacy_record = _private_window(
            sources,
            facts,
            settings,
            settings.privacy,
            step,
            update_norms=update_norms,
            generator=generator if generator is not None else secure_generator(),
            key_shapes=key_shapes,
        )
        capped = {}
        weights = {
            source.update_id: {expert_of_delta(key): 1 / len(sources) for key in sorted(source.delta_keys())}
            for source in sources
        }
    record = {
        "server_optimizer": {
            **optimizer.config.to_dict(),
            "resumed": optimizer.resumed,
            "note": optimizer.note,
            "keys_with_state": len(optimizer.steps),
        },
        "rule": _rule_record(settings, report, capped, uniform=settings.privacy is not None),
        "privacy": privacy_record,
    }
    return WindowResult(steps=emitted, report=report, record=record, weights=weights, capped=dict(capped))


def _private_window(
    sources: Sequence[FactorSource],
    facts: Sequence[UpdateFacts[str]],
    settings: RoundAggregationSettings,
    privacy: PrivacyConfig,
    step: Callable[[DeltaKey, Tensor], None],
    *,
    update_norms: Mapping[str, float] | None,
    generator: torch.Generator,
    key_shapes: Mapping[DeltaKey, tuple[int, ...]] | None,
) -> tuple[AggregationReport, dict[str, Any]]:
    """DP-FedAvg's aggregate: per key Σ_i c_i·Δ_i / K + N(0, (z·C/K)²) on every coordinate, then `step`.

    c_i = min(1, C_i / ‖Δ_i‖) on the whole update's joint norm, so one update moves the sum by at most C whatever it
    carries. C_i = C / m for a device that sent m updates in the window, so one device moves it by at most C too (the
    guarantee is per device, not per update id). Weights are uniform: routed-token or staleness weights are data
    (a device's claims) and would scale its contribution beyond C. K is the number of updates in the window for
    every key, also for keys some update does not carry: a per-key count would make the noise scale depend on who
    trained which expert. K is treated as public (the fixed denominator of DP-FedAvg).
    """
    problem = dp_conflict(settings.aggregation)
    if problem is not None:
        raise ValueError(problem)
    count = len(sources)
    if count == 0:
        raise ValueError("a DP aggregation needs at least one update")
    norms = (
        dict(update_norms)
        if update_norms is not None
        else {source.update_id: _joint_norm(source) for source in sources}
    )
    for source in sources:
        norm = norms.get(source.update_id)
        if norm is None or not (math.isfinite(norm) and norm >= 0):
            raise ValueError(f"update {source.update_id}: its whole-update norm must be finite and >= 0, got {norm}")
    per_sender = Counter(fact.sender_key for fact in facts)
    factors: dict[str, float] = {}
    for fact in facts:
        bound = privacy.clip_norm / per_sender[fact.sender_key]
        norm = norms[fact.update_id]
        factors[fact.update_id] = 1.0 if norm <= bound else bound / norm
    carriers = Counter(key for source in sources for key in source.delta_keys())
    weights = [{expert_of_delta(key): 1.0 for key in source.delta_keys()} for source in sources]
    std = privacy.noise_multiplier * privacy.clip_norm / count
    # What was really drawn, so the record shows the noise that was added, not only the noise that was meant.
    drawn_keys = drawn_coordinates = 0
    drawn_squares = 0.0

    def noised(key: DeltaKey, mean: Tensor) -> None:
        nonlocal drawn_keys, drawn_coordinates, drawn_squares
        if key_shapes is not None:
            expected = key_shapes.get(key)
            if expected is None:
                raise ValueError(f"delta {key!r} is not one of the model's expert deltas (key_shapes)")
            if tuple(mean.shape) != tuple(expected):
                raise ValueError(f"delta {key!r} has shape {list(mean.shape)}, the model's is {list(expected)}")
        # aggregate_factored's mean divides by the carriers of this key; DP divides by K.
        total = mean * (carriers[key] / count) if key in carriers else mean
        drawn = torch.normal(0.0, std, size=tuple(total.shape), generator=generator, dtype=torch.float32)
        drawn_keys += 1
        drawn_coordinates += drawn.numel()
        drawn_squares += float(drawn.to(torch.float64).square().sum())
        step(key, total + drawn)

    report = aggregate_factored(sources, weights, settings.aggregation, noised, update_scale=factors)
    untouched = sorted(set(key_shapes or {}) - set(carriers))
    for key in untouched:
        # Nobody carried it, but an update could have: its absence must look like noise too.
        noised(key, torch.zeros(tuple((key_shapes or {})[key]), dtype=torch.float32))
    record = {
        **privacy.to_dict(),
        "noise_std": std,
        "noise_rms_drawn": math.sqrt(drawn_squares / drawn_coordinates) if drawn_coordinates else 0.0,
        "noised_keys": drawn_keys,
        "noised_coordinates": drawn_coordinates,
        "noised_all_model_keys": key_shapes is not None,
        "untouched_keys_noised": len(untouched),
        "contributors": count,
        "weights": "uniform",
        "clipped": {update_id: factor for update_id, factor in factors.items() if factor < 1},
        "norms": {update_id: round(norms[update_id], 9) for update_id in factors},
        "senders_with_several_updates": {sender: n for sender, n in sorted(per_sender.items()) if n > 1},
    }
    return report, record


def _joint_norm(source: FactorSource) -> float:
    """‖Δ‖ over all of an update's deltas, one factor pair at a time (never dense)."""
    return math.sqrt(sum(source.read(key).norm() ** 2 for key in sorted(source.delta_keys())))


def _rule_record(
    settings: RoundAggregationSettings, report: AggregationReport, capped: Mapping[str, list[str]], *, uniform: bool
) -> dict[str, Any]:
    """The rule, its parameters and what it cut: per update, how many experts it was scaled down for and by what."""
    aggregation = settings.aggregation
    cut: dict[str, dict[str, Any]] = {}
    for expert in report.experts.values():
        for update_id, scaled in expert.scaled.items():
            entry = cut.setdefault(update_id, {"scaled_experts": 0, "by": {}, "min_factor": 1.0})
            entry["scaled_experts"] += 1
            entry["by"][scaled["by"]] = entry["by"].get(scaled["by"], 0) + 1
            entry["min_factor"] = min(entry["min_factor"], scaled["factor"])
    trimmed = Counter(
        expert.trimmed_per_end for expert in report.experts.values() if expert.trimmed_per_end is not None
    )
    return {
        "method": aggregation.method,
        # DP weighs every update alike (see _private_window); the staleness exponent and share cap then do not apply.
        "weights": "uniform (dp)" if uniform else "bounded_expert_weights",
        "clip_norm": aggregation.clip_norm,
        "norm_bound_multiplier": aggregation.norm_bound_multiplier,
        "trim_fraction": aggregation.trim_fraction,
        "staleness_exponent": aggregation.weighting.staleness_exponent,
        "max_update_share": aggregation.weighting.max_update_share,
        "experts": len(report.experts),
        "scaled": dict(sorted(cut.items())),
        "share_capped": {update_id: list(experts) for update_id, experts in sorted(capped.items()) if experts},
        # trimmed_mean: how many experts had n values trimmed from each end of every coordinate.
        "trimmed_per_end": {str(n): experts for n, experts in sorted(trimmed.items())},
        "update_scale": report.update_scale,
        "notes": list(report.notes),
        # Only with the direction screen on, so records of rounds without it keep their shape.
        **(
            {
                "min_cosine": aggregation.min_cosine,
                "direction_scope": aggregation.direction_scope,
                "direction": report.direction,
            }
            if aggregation.min_cosine is not None
            else {}
        ),
    }
