"""Combine buffered edge updates per expert on the dense deltas ΔW_e = scale·B_e·A_e, never on A and B apart.

Each update brings its `ExpertDeltas` (from `fednested.deltas.expert_deltas_from_adapters`) and a weight per expert
(from `fednested.aggregation.weights`); the result is one `ExpertDeltas` that `fednested.deltas.merge_expert_deltas`
applies as W_e ← W_e + η·ΔW_e with the server learning rate η.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import Tensor

from fednested.adapters.lora import layer_index
from fednested.aggregation.rules import clip_factor, weighted_coordinate_median, weighted_mean, weighted_trimmed_mean
from fednested.aggregation.weights import WeightingConfig
from fednested.deltas import DeltaKey, ExpertDeltas, parse_delta_key

AggregationMethod = Literal["weighted_mean", "trimmed_mean", "coordinate_median"]
AGGREGATION_METHODS: tuple[AggregationMethod, ...] = get_args(AggregationMethod)
# What the direction screen compares: each expert's delta on its own, or the whole update over all its experts.
DirectionScope = Literal["expert", "update"]
DIRECTION_SCOPES: tuple[DirectionScope, ...] = get_args(DirectionScope)
# "layer.expert", as in the update envelope's routed_tokens (e.g. "3.7").
ExpertKey = str
# One buffered update: its dense deltas and its (normalised or raw) weight for each expert it carries.
WeightedDeltas = tuple[Mapping[DeltaKey, Tensor], Mapping[ExpertKey, float]]


# η beyond this turns any honest aggregate into a step that overflows the weights; FedAvg's η is 1.
MAX_SERVER_LEARNING_RATE = 100.0


@dataclass(frozen=True)
class AggregationConfig:
    """How one middle-loop step combines a buffer: weights, rule, optional clipping, and the server step size η."""

    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    method: AggregationMethod = "weighted_mean"
    # Joint Frobenius bound on one update's delta for one expert (all its matrices together); None = no clipping.
    clip_norm: float | None = None
    # Norm bound relative to the window (Sun et al., 2019): an update whose delta for an expert is longer than this
    # multiple of the median over that expert's contributors is scaled down to it; None = no bound.
    norm_bound_multiplier: float | None = None
    # Direction screen: an update whose cosine with the weighted mean of the OTHER contributors is below this gets
    # weight 0 (for that expert with scope "expert"; for every expert with scope "update"); None = no screen.
    # It catches what the norm bound cannot: a sign-flipped update of honest norm.
    min_cosine: float | None = None
    direction_scope: DirectionScope = "expert"
    # trimmed_mean only: fraction trimmed from each end per coordinate.
    trim_fraction: float = 0.1
    # η in W_e ← W_e + η·ΔW_e.
    server_learning_rate: float = 1.0

    def __post_init__(self) -> None:
        _check_method(self.method, self.trim_fraction, self.clip_norm)
        bound = self.norm_bound_multiplier
        if bound is not None and not (math.isfinite(bound) and bound >= 1):
            raise ValueError(f"norm_bound_multiplier must be None or a finite number >= 1, got {bound}")
        if self.min_cosine is not None and not (math.isfinite(self.min_cosine) and -1 <= self.min_cosine < 1):
            raise ValueError(f"min_cosine must be None or a number in [-1, 1), got {self.min_cosine}")
        if self.direction_scope not in DIRECTION_SCOPES:
            raise ValueError(
                f"unknown direction_scope {self.direction_scope!r}; choose one of {', '.join(DIRECTION_SCOPES)}"
            )
        if not (math.isfinite(self.server_learning_rate) and 0 < self.server_learning_rate <= MAX_SERVER_LEARNING_RATE):
            raise ValueError(
                f"server_learning_rate must be in (0, {MAX_SERVER_LEARNING_RATE:g}], got {self.server_learning_rate}"
            )


def expert_key(layer: int, expert: int) -> ExpertKey:
    """The envelope's name of expert `expert` of MoE layer `layer`: "layer.expert"."""
    return f"{layer}.{expert}"


def expert_of_delta(key: DeltaKey) -> ExpertKey:
    """Which expert a delta belongs to, e.g. "model.layers.1.mlp.experts.down_proj/expert=3" → "1.3"."""
    param_name, expert = parse_delta_key(key)
    return expert_key(layer_index(param_name), expert)


def experts_of(deltas: Mapping[DeltaKey, Tensor]) -> frozenset[ExpertKey]:
    """The experts an update carries deltas for (what `UpdateFacts.experts` needs)."""
    return frozenset(expert_of_delta(key) for key in deltas)


def _check_method(method: str, trim_fraction: float, clip_norm: float | None) -> None:
    if method not in AGGREGATION_METHODS:
        raise ValueError(f"unknown aggregation method {method!r}; choose one of {', '.join(AGGREGATION_METHODS)}")
    if not (0.0 <= trim_fraction < 0.5):
        raise ValueError(f"trim_fraction must lie in [0, 0.5), got {trim_fraction}")
    if clip_norm is not None and not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be None or a finite number > 0, got {clip_norm}")


def clip_update_per_expert(deltas: Mapping[DeltaKey, Tensor], clip_norm: float) -> ExpertDeltas:
    """Scale each expert's deltas in one update so that their joint Frobenius norm is at most `clip_norm`."""
    by_expert: dict[ExpertKey, list[DeltaKey]] = {}
    for key in deltas:
        by_expert.setdefault(expert_of_delta(key), []).append(key)
    clipped: ExpertDeltas = {}
    for keys in by_expert.values():
        factor = clip_factor([deltas[key] for key in keys], clip_norm)
        for key in keys:
            clipped[key] = deltas[key] if factor == 1.0 else deltas[key] * factor
    return clipped


def aggregate_expert_deltas(
    updates: Sequence[WeightedDeltas],
    method: AggregationMethod = "weighted_mean",
    clip_norm: float | None = None,
    trim_fraction: float = 0.1,
) -> ExpertDeltas:
    """One aggregated fp32 delta per (param, expert) key found in any update, combined with `method`.

    For each key, the contributors are the updates that carry it and give its expert a weight > 0; their deltas
    are optionally clipped per expert (`clip_update_per_expert`), stacked, and combined by the weighted mean, the
    weighted trimmed mean or the weighted coordinate-wise median (see `fednested.aggregation.rules`). Weights need
    not be normalised (each rule divides by the weight it keeps). A key with no contributor is left out, so
    merging leaves that expert unchanged. Raises ValueError naming the update index and key for an update whose
    weights miss one of its experts, a negative or non-finite weight, or shapes that disagree across updates.
    """
    _check_method(method, trim_fraction, clip_norm)
    if not updates:
        raise ValueError("aggregate_expert_deltas needs at least one update")
    contributors: dict[DeltaKey, list[tuple[Tensor, float]]] = {}
    for index, (deltas, weights) in enumerate(updates):
        for expert, weight in weights.items():
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"update #{index}: weight for expert {expert} must be finite and >= 0, got {weight}")
        scaled = clip_update_per_expert(deltas, clip_norm) if clip_norm is not None else deltas
        for key, delta in scaled.items():
            expert = expert_of_delta(key)
            if expert not in weights:
                raise ValueError(f"update #{index} carries delta {key!r} but no weight for expert {expert}")
            if weights[expert] > 0:
                contributors.setdefault(key, []).append((delta, weights[expert]))
    aggregated: ExpertDeltas = {}
    for key in sorted(contributors):
        tensors = [delta.detach().to(torch.float32) for delta, _ in contributors[key]]
        shapes = {tuple(tensor.shape) for tensor in tensors}
        if len(shapes) > 1:
            raise ValueError(f"delta {key!r} has different shapes across updates: {sorted(shapes)}")
        stack = torch.stack(tensors)
        weights_tensor = torch.tensor([weight for _, weight in contributors[key]], dtype=torch.float64)
        if method == "weighted_mean":
            aggregated[key] = weighted_mean(stack, weights_tensor)
        elif method == "trimmed_mean":
            aggregated[key] = weighted_trimmed_mean(stack, weights_tensor, trim_fraction)
        else:
            aggregated[key] = weighted_coordinate_median(stack, weights_tensor)
    return aggregated
