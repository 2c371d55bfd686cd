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
A direction screen (`min_cosine`) then gives weight 0 to an update whose cosine with the weighted mean of the other
contributors is below the threshold: a sign-flipped update has an honest norm, so only its direction gives it away.
The cosines come from the K×K inner products ⟨s_i·B_i·A_i, s_j·B_j·A_j⟩_F = s_i·s_j·Σ (B_iᵀB_j) ⊙ (A_i·A_jᵀ) of
r×r blocks, never from dense deltas.
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
from fednested.aggregation.factors import NORM_CHUNK, FactorSource, LoraFactors, squared_norms
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
    # With the direction screen on: update id → cosine with the others' weighted mean (None where undefined).
    cosines: dict[str, float | None] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "contributors": self.contributors,
            "weights": {key: round(value, 9) for key, value in self.weights.items()},
            "norms": {key: round(value, 9) for key, value in self.norms.items()},
            "scaled": self.scaled,
            "norm_bound": self.norm_bound,
            "trimmed_per_end": self.trimmed_per_end,
            **(
                {"cosines": {key: None if value is None else round(value, 6) for key, value in self.cosines.items()}}
                if self.cosines is not None
                else {}
            ),
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
    # Whole-update direction screen (scope "update"): update id → its cosine, the threshold and whether it was dropped.
    direction: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "deltas": self.deltas,
            "notes": self.notes,
            "experts": {expert: record.to_dict() for expert, record in sorted(self.experts.items())},
            **({"update_scale": self.update_scale} if self.update_scale else {}),
            **({"direction": self.direction} if self.direction else {}),
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


def inner_products(pairs: Sequence[LoraFactors]) -> Tensor:
    """The K×K float64 matrix of ⟨s_i·B_i·A_i, s_j·B_j·A_j⟩_F for one delta key, from r×r blocks (never B·A).

    ⟨s_iB_iA_i, s_jB_jA_j⟩ = s_i·s_j·trace((B_iᵀB_j)(A_jA_iᵀ)) = s_i·s_j·Σ (B_iᵀB_j) ⊙ (A_iA_jᵀ). Blocks of
    NORM_CHUNK updates at a time, so the extra memory is (NORM_CHUNK·r)² values, not (K·r)²; ranks may differ.
    """
    count = len(pairs)
    gram = torch.zeros(count, count, dtype=torch.float64)
    for first in range(0, count, NORM_CHUNK):
        left = pairs[first : first + NORM_CHUNK]
        b_left = torch.cat([pair.lora_b for pair in left], dim=1).to(torch.float64)
        a_left = torch.cat([pair.lora_a for pair in left], dim=0).to(torch.float64)
        owner_left = _owner_matrix(left)
        for second in range(first, count, NORM_CHUNK):
            right = pairs[second : second + NORM_CHUNK]
            b_right = torch.cat([pair.lora_b for pair in right], dim=1).to(torch.float64)
            a_right = torch.cat([pair.lora_a for pair in right], dim=0).to(torch.float64)
            # Summing each r_i×r_j block of the elementwise product: P_leftᵀ · M · P_right with one-hot owners.
            block = owner_left.T @ ((b_left.T @ b_right) * (a_left @ a_right.T)) @ _owner_matrix(right)
            gram[first : first + len(left), second : second + len(right)] = block
            gram[second : second + len(right), first : first + len(left)] = block.T
    scales = torch.tensor([pair.scale for pair in pairs], dtype=torch.float64)
    return gram * scales[:, None] * scales[None, :]


def _owner_matrix(pairs: Sequence[LoraFactors]) -> Tensor:
    """[Σ r_i, len(pairs)] one-hot: row k belongs to the pair whose rank-block holds it."""
    ranks = [int(pair.lora_a.shape[0]) for pair in pairs]
    owner = torch.zeros(sum(ranks), len(pairs), dtype=torch.float64)
    row = 0
    for index, rank in enumerate(ranks):
        owner[row : row + rank, index] = 1.0
        row += rank
    return owner


@dataclass
class _DirectionTerms:
    """Per contributor of one expert, the three sums a leave-one-out cosine is made of (added over experts for the
    whole-update screen): ⟨c_iΔ_i, r_i⟩, ‖r_i‖² and ‖c_iΔ_i‖², r_i the weighted mean of the others' c_jΔ_j."""

    dot: dict[str, float] = field(default_factory=dict)
    reference: dict[str, float] = field(default_factory=dict)
    own: dict[str, float] = field(default_factory=dict)

    def add(self, other: _DirectionTerms) -> None:
        for mine, theirs in ((self.dot, other.dot), (self.reference, other.reference), (self.own, other.own)):
            for update_id, value in theirs.items():
                mine[update_id] = mine.get(update_id, 0.0) + value

    def cosines(self) -> dict[str, float | None]:
        """cos_i, or None where it is undefined (no other contributor, or a zero delta or reference)."""
        result: dict[str, float | None] = {}
        for update_id, own in self.own.items():
            denominator = math.sqrt(max(own, 0.0) * max(self.reference.get(update_id, 0.0), 0.0))
            result[update_id] = (
                max(-1.0, min(1.0, self.dot.get(update_id, 0.0) / denominator)) if denominator > 0 else None
            )
        return result


# The direction screen decides only among at least this many updates with a defined cosine: with two, each one's
# reference is the other, so both have the same cosine and a screen could only keep or drop both.
MIN_SCREENED = 3


def _screened(cosines: Mapping[str, float | None], screen: float) -> dict[str, float | None]:
    """The updates the direction screen cuts: those below `screen`, if they are a strict minority of at least
    MIN_SCREENED updates with a cosine; otherwise none. A screen that would cut half the window or more is not
    finding outliers: it would be cutting honest disagreement (two devices of opposite domains), so it keeps all."""
    defined = {update_id: cosine for update_id, cosine in cosines.items() if cosine is not None}
    below: dict[str, float | None] = {update_id: cosine for update_id, cosine in defined.items() if cosine < screen}
    if len(defined) < MIN_SCREENED or 2 * len(below) >= len(defined):
        return {}
    return below


def _direction_terms(
    gram: Tensor, update_ids: Sequence[str], weights: Sequence[float], scaling: Sequence[float]
) -> _DirectionTerms:
    """The leave-one-out sums from the expert's K×K inner products (gram), weights w and screen factors c.

    With u_j = w_j·c_j, g = G·u and S = uᵀ·G·u: ⟨c_iΔ_i, Σ_{j≠i} u_jΔ_j⟩ = c_i·(g_i − u_i·G_ii) and
    ‖Σ_{j≠i} u_jΔ_j‖² = S − 2·u_i·g_i + u_i²·G_ii; both are divided by W_{−i} = Σ_{j≠i} w_j (a mean, not a sum)."""
    w = torch.tensor(list(weights), dtype=torch.float64)
    c = torch.tensor(list(scaling), dtype=torch.float64)
    u = w * c
    g = gram @ u
    total = float(u @ g)
    diagonal = torch.diagonal(gram)
    others = float(w.sum()) - w
    terms = _DirectionTerms()
    for index, update_id in enumerate(update_ids):
        rest = float(others[index])
        if rest <= 0:
            terms.own[update_id] = float(c[index] ** 2 * diagonal[index])
            continue
        u_i, g_i, d_i = float(u[index]), float(g[index]), float(diagonal[index])
        terms.dot[update_id] = float(c[index]) * (g_i - u_i * d_i) / rest
        terms.reference[update_id] = (total - 2 * u_i * g_i + u_i * u_i * d_i) / (rest * rest)
        terms.own[update_id] = float(c[index] ** 2) * d_i
    return terms


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


@dataclass
class _PreparedExpert:
    """One expert's contributors with their factors, joint norms, screen factors and (screen on) direction terms."""

    contributing: list[tuple[FactorSource, float]]
    factors: dict[str, dict[DeltaKey, LoraFactors]]
    norms: dict[str, float]
    scaling: dict[str, float]
    scaled: dict[str, dict[str, Any]]
    bound: float | None
    terms: _DirectionTerms | None


def _prepare_expert(
    expert: ExpertKey,
    keys: Sequence[DeltaKey],
    sources: Sequence[FactorSource],
    weights: Sequence[Mapping[ExpertKey, float]],
    config: AggregationConfig,
    whole: Mapping[str, float],
    *,
    with_terms: bool,
) -> _PreparedExpert | None:
    """Read one expert's factors from its contributors and apply the norm screens; None when nobody contributes."""
    contributing = [
        (source, update_weights[expert])
        for source, update_weights in zip(sources, weights, strict=True)
        if update_weights.get(expert, 0.0) > 0 and any(key in source.delta_keys() for key in keys)
    ]
    if not contributing:
        return None
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
    terms = None
    if with_terms:
        ids = [source.update_id for source, _ in contributing]
        index = {update_id: position for position, update_id in enumerate(ids)}
        # A key some contributors lack counts as a zero delta for them, so the expert's products are sums over keys.
        gram = torch.zeros(len(ids), len(ids), dtype=torch.float64)
        for key in keys:
            rows = [index[u] for u in ids if key in factors[u]]
            if not rows:
                continue
            products = inner_products([factors[ids[row]][key] for row in rows])
            positions = torch.tensor(rows, dtype=torch.long)
            gram[positions[:, None], positions[None, :]] += products
        terms = _direction_terms(gram, ids, [weight for _, weight in contributing], [scaling[u] for u in ids])
    return _PreparedExpert(contributing, factors, norms, scaling, scaled, bound, terms)


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

    With `config.min_cosine` set, an update whose leave-one-out cosine (after the norm screens) is below it gets
    weight 0: for that expert (`direction_scope` "expert"), or for every expert when the cosine of its whole update
    is (scope "update"; a first pass over the experts sums the terms, reading each expert's factors once more).
    A cosine is undefined, and the update kept, when it is the only contributor or a delta or reference is zero.
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
    screen = config.min_cosine
    grouped = _group_by_expert(sources)
    # Whole-update screen: a first pass sums every expert's leave-one-out terms (factors are read and let go expert
    # by expert, so the peak does not grow), and an update below the threshold is dropped from every expert.
    dropped: dict[str, float | None] = {}
    if screen is not None and config.direction_scope == "update":
        whole_terms = _DirectionTerms()
        for expert, keys in grouped.items():
            prepared = _prepare_expert(expert, keys, sources, weights, config, whole, with_terms=True)
            if prepared is not None and prepared.terms is not None:
                whole_terms.add(prepared.terms)
        dropped = _screened(whole_terms.cosines(), screen)
        report.direction = {
            update_id: {
                "by": "direction",
                "scope": "update",
                "cosine": None if cosine is None else round(cosine, 6),
                "limit": screen,
                "dropped": update_id in dropped,
            }
            for update_id, cosine in sorted(whole_terms.cosines().items())
        }
    trim_warned: list[str] = []
    for expert, keys in grouped.items():
        prepared = _prepare_expert(
            expert,
            keys,
            sources,
            weights,
            config,
            whole,
            with_terms=screen is not None and config.direction_scope == "expert",
        )
        if prepared is None:
            continue
        factors, scaling = prepared.factors, prepared.scaling
        record = ExpertAggregation(
            expert=expert,
            contributors=[source.update_id for source, _ in prepared.contributing],
            weights={source.update_id: weight for source, weight in prepared.contributing},
            norms=prepared.norms,
            scaled=prepared.scaled,
            norm_bound=prepared.bound,
        )
        cut = {update_id: cosine for update_id, cosine in dropped.items() if update_id in record.weights}
        if prepared.terms is not None and screen is not None:
            record.cosines = prepared.terms.cosines()
            cut = _screened(record.cosines, screen)
        for update_id, cosine in cut.items():
            # Weight 0, not a factor 0: the mean then divides by the weight of the updates that stay.
            record.weights[update_id] = 0.0
            record.scaled[update_id] = {
                "by": "direction",
                "cosine": None if cosine is None else round(cosine, 6),
                "limit": screen,
                "factor": 0.0,
            }
        kept = [(source, weight) for source, weight in prepared.contributing if source.update_id not in cut]
        for key in keys:
            present = [(source.update_id, weight) for source, weight in kept if key in factors[source.update_id]]
            if not present:
                continue
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
        del factors, prepared
    if trim_warned:
        report.notes.append(
            f"trimmed_mean with trim_fraction={config.trim_fraction} trims nothing for {len(trim_warned)} expert(s) "
            f"({', '.join(trim_warned[:8])}{'…' if len(trim_warned) > 8 else ''}): with that many contributors "
            f"floor(trim_fraction·n) = 0, so they got the plain weighted mean; raise trim_fraction or K"
        )
    return report
