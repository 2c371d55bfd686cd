"""Aggregate K LoRA updates per expert from their factors, exactly, in memory that does not grow with K·d².

The weighted mean of the dense deltas is one GEMM per (param, expert) on the concatenated factors:

    Σ_i ŵ_i·c_i·s_i·B_i·A_i  =  [ŵ_1c_1s_1·B_1 | … | ŵ_Kc_Ks_K·B_K] · [A_1; …; A_K]

(ŵ the normalised weight, c the clipping factor, s = alpha/rank), so it costs K·r·(out+in) floats of factors and one
out×in result instead of K dense deltas. The robust rules (trimmed mean, coordinate median) need every update's
value per coordinate; they run on row blocks of the dense deltas sized so that a block of all K updates stays under
`max_block_bytes`. Experts are processed one at a time and their factors are read lazily from the `FactorSource`s,
so the peak holds one expert's factors of K updates plus one result.

Screens before combining, per expert and on the update's joint norm over that expert's matrices (from r×r Gram
matrices, never dense): absolute clipping (`clip_norm`) and a norm bound relative to the window (Sun et al., 2019,
"Can you really backdoor federated learning?": updates above the bound are scaled down to it; here the bound is
`norm_bound_multiplier` × the median norm of the expert's contributors, so it follows the federation's scale).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fednested.aggregation.aggregate import AggregationConfig, ExpertKey, expert_of_delta
from fednested.aggregation.factors import FactorSource, LoraFactors, squared_norms
from fednested.aggregation.rules import weighted_coordinate_median, weighted_trimmed_mean
from fednested.deltas import DeltaKey

DEFAULT_MAX_BLOCK_BYTES = 64 * 1024 * 1024


@dataclass
class ExpertAggregation:
    """What happened to one expert: who contributed with which weight, their norms, and any scaling applied."""

    expert: ExpertKey
    contributors: list[str]
    weights: dict[str, float]
    norms: dict[str, float]
    # update id → factor < 1 its delta was scaled by (clipping or the norm bound), with why.
    scaled: dict[str, dict[str, Any]] = field(default_factory=dict)
    norm_bound: float | None = None
    trimmed_per_end: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "contributors": self.contributors,
            "weights": {key: round(value, 9) for key, value in self.weights.items()},
            "norms": {key: round(value, 9) for key, value in self.norms.items()},
            "scaled": self.scaled,
            "norm_bound": self.norm_bound,
            "trimmed_per_end": self.trimmed_per_end,
        }


@dataclass
class AggregationReport:
    """The record of one aggregation, kept with the candidate's lineage and the round."""

    method: str
    experts: dict[ExpertKey, ExpertAggregation] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    deltas: int = 0
    # update id → factor < 1 its whole update was scaled by for every expert (`update_scale`, DP's clip), with why.
    update_scale: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "deltas": self.deltas,
            "notes": self.notes,
            "experts": {expert: record.to_dict() for expert, record in sorted(self.experts.items())},
            **({"update_scale": self.update_scale} if self.update_scale else {}),
        }


def _group_by_expert(sources: Sequence[FactorSource]) -> dict[ExpertKey, list[DeltaKey]]:
    keys: dict[ExpertKey, set[DeltaKey]] = {}
    for source in sources:
        for key in source.delta_keys():
            keys.setdefault(expert_of_delta(key), set()).add(key)
    return {expert: sorted(found) for expert, found in sorted(keys.items())}


def _scaling(
    norms: Mapping[str, float], config: AggregationConfig
) -> tuple[dict[str, float], dict[str, dict[str, Any]], float | None]:
    """Per update: the factor its delta is multiplied by (clip and norm bound), the record, and the bound used."""
    factors = dict.fromkeys(norms, 1.0)
    record: dict[str, dict[str, Any]] = {}
    bound = None
    if config.norm_bound_multiplier is not None and len(norms) >= 2:
        bound = config.norm_bound_multiplier * statistics.median(norms.values())
    for update_id, norm in norms.items():
        limits = []
        if config.clip_norm is not None and norm > config.clip_norm:
            limits.append(("clip_norm", config.clip_norm))
        if bound is not None and bound > 0 and norm > bound:
            limits.append(("norm_bound", bound))
        if limits:
            why, limit = min(limits, key=lambda item: item[1])
            factors[update_id] = limit / norm
            record[update_id] = {"by": why, "norm": round(norm, 9), "limit": round(limit, 9), "factor": limit / norm}
    return factors, record, bound


def _weighted_mean(pairs: Sequence[tuple[LoraFactors, float, float]]) -> Tensor:
    """Σ w_i·c_i·s_i·B_i·A_i / Σ w_i as one GEMM over the concatenated factors (pairs: factors, w_i, c_i)."""
    total = sum(weight for _, weight, _ in pairs)
    left = torch.cat(
        [factors.lora_b * (factors.scale * weight * scaling / total) for factors, weight, scaling in pairs], dim=1
    )
    right = torch.cat([factors.lora_a for factors, _, _ in pairs], dim=0)
    return left @ right


def _robust(pairs: Sequence[tuple[LoraFactors, float, float]], method: str, trim: float, max_block: int) -> Tensor:
    """Trimmed mean or coordinate median over row blocks of the dense deltas (pairs: factors, weight, scaling)."""
    first = pairs[0][0]
    rows, columns = first.out_features, int(first.lora_a.shape[1])
    # The stack (4 bytes a value) and what sorting it keeps alive (values, int64 order, gathered weights: ~16 more).
    block = max(1, max_block // max(1, len(pairs) * columns * 20))
    weights = torch.tensor([weight for _, weight, _ in pairs], dtype=torch.float64)
    result = torch.empty(rows, columns, dtype=torch.float32)
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        stack = torch.stack([factors.dense_rows(start, stop) * scaling for factors, _, scaling in pairs])
        if method == "trimmed_mean":
            result[start:stop] = weighted_trimmed_mean(stack, weights, trim)
        else:
            result[start:stop] = weighted_coordinate_median(stack, weights)
    return result


def aggregate_factored(
    sources: Sequence[FactorSource],
    weights: Sequence[Mapping[ExpertKey, float]],
    config: AggregationConfig,
    emit: Callable[[DeltaKey, Tensor], None],
    *,
    max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
    update_scale: Mapping[str, float] | None = None,
    update_scale_reason: str = "dp_clip",
) -> AggregationReport:
    """Combine the updates expert by expert and hand each aggregated fp32 delta to `emit(key, delta)`.

    `weights[i]` holds update i's weight per expert (normalised or not: each rule divides by the weight it keeps);
    an expert with weight 0 or absent from an update's map gets nothing from that update. Keys no update
    contributes to are not emitted, so merging leaves those experts unchanged. Raises ValueError naming the update
    for misaligned inputs, negative or non-finite weights, or factor shapes that disagree across updates.

    `update_scale` maps an update id to a factor in (0, 1] multiplied into that update's scaling for every expert, on
    top of the per-expert screens (DP's clip of the whole update to a joint norm: the delta is multiplied by the
    product of both); updates it does not name keep 1. Factors < 1 are recorded in the report's `update_scale`
    under `update_scale_reason`.
    """
    if len(sources) != len(weights):
        raise ValueError(f"{len(sources)} updates but {len(weights)} weight maps")
    if not sources:
        raise ValueError("aggregate_factored needs at least one update")
    for source, update_weights in zip(sources, weights, strict=True):
        for expert, weight in update_weights.items():
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"update {source.update_id}: weight for expert {expert} must be finite and >= 0")
    seen: set[str] = set()
    for source in sources:
        if source.update_id in seen:
            raise ValueError(f"update {source.update_id} is given twice; an update is aggregated once")
        seen.add(source.update_id)
    whole = dict(update_scale or {})
    for update_id, factor in whole.items():
        if update_id not in seen:
            raise ValueError(f"update_scale names update {update_id}, which is not being aggregated")
        if not (math.isfinite(factor) and 0 < factor <= 1):
            raise ValueError(f"update {update_id}: update_scale must be in (0, 1], got {factor}")
    report = AggregationReport(method=config.method)
    report.update_scale = {
        update_id: {"by": update_scale_reason, "factor": factor} for update_id, factor in whole.items() if factor < 1
    }
    trim_warned: list[str] = []
    for expert, keys in _group_by_expert(sources).items():
        contributing = [
            (source, update_weights[expert])
            for source, update_weights in zip(sources, weights, strict=True)
            if update_weights.get(expert, 0.0) > 0 and any(key in source.delta_keys() for key in keys)
        ]
        if not contributing:
            continue
        factors = {
            source.update_id: {key: source.read(key) for key in keys if key in source.delta_keys()}
            for source, _ in contributing
        }
        squared = dict.fromkeys(factors, 0.0)
        for key in keys:
            holders = [update_id for update_id, pairs in factors.items() if key in pairs]
            for update_id, value in zip(holders, squared_norms([factors[u][key] for u in holders]), strict=True):
                squared[update_id] += value
        norms = {update_id: math.sqrt(value) for update_id, value in squared.items()}
        scaling, scaled, bound = _scaling(norms, config)
        for update_id in scaling:
            scaling[update_id] *= whole.get(update_id, 1.0)
        record = ExpertAggregation(
            expert=expert,
            contributors=[source.update_id for source, _ in contributing],
            weights={source.update_id: weight for source, weight in contributing},
            norms=norms,
            scaled=scaled,
            norm_bound=bound,
        )
        for key in keys:
            present = [
                (source.update_id, weight) for source, weight in contributing if key in factors[source.update_id]
            ]
            shapes = {(tuple(factors[u][key].lora_a.shape[1:]), factors[u][key].out_features) for u, _ in present}
            if len(shapes) > 1:
                by_update = {
                    u: (list(factors[u][key].lora_a.shape[1:]), factors[u][key].out_features) for u, _ in present
                }
                raise ValueError(f"delta {key!r} has different shapes across updates (in, out): {by_update}")
            if config.method == "weighted_mean":
                delta = _weighted_mean([(factors[u][key], weight, scaling[u]) for u, weight in present])
            else:
                trimmed = math.floor(config.trim_fraction * len(present))
                if config.method == "trimmed_mean":
                    record.trimmed_per_end = trimmed
                    if trimmed == 0 and expert not in trim_warned:
                        trim_warned.append(expert)
                delta = _robust(
                    [(factors[u][key], weight, scaling[u]) for u, weight in present],
                    config.method,
                    config.trim_fraction,
                    max_block_bytes,
                )
            emit(key, delta)
            report.deltas += 1
        report.experts[expert] = record
        # Drop this expert's factors before the next expert's are read: the peak holds one expert's, not two.
        del factors
    if trim_warned:
        report.notes.append(
            f"trimmed_mean with trim_fraction={config.trim_fraction} trims nothing for {len(trim_warned)} expert(s) "
            f"({', '.join(trim_warned[:8])}{'…' if len(trim_warned) > 8 else ''}): with that many contributors "
            f"floor(trim_fraction·n) = 0, so they got the plain weighted mean; raise trim_fraction or K"
        )
    return report
