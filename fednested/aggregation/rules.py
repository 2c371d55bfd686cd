"""Aggregation rules over a stack of same-shaped dense deltas: weighted mean, trimmed mean, coordinate median, clipping.

Each rule takes `stack` of shape (n, *shape) — one row per contributing update — and `weights` of shape (n,), all
positive; weights need not sum to 1 (each rule divides by what it keeps). Framework-free, like Flower's aggregate.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def _check_stack(stack: Tensor, weights: Tensor) -> None:
    if stack.dim() < 1 or stack.shape[0] == 0:
        raise ValueError(f"need at least one delta to aggregate, got a stack of shape {tuple(stack.shape)}")
    if weights.shape != (stack.shape[0],):
        raise ValueError(f"weights must have shape ({stack.shape[0]},), got {tuple(weights.shape)}")
    if not bool(torch.isfinite(weights).all()) or bool((weights <= 0).any()):
        raise ValueError(f"weights must be finite and > 0 (drop zero-weight updates first), got {weights.tolist()}")


def _broadcastable(weights: Tensor, stack: Tensor) -> Tensor:
    return weights.to(stack.dtype).reshape((-1,) + (1,) * (stack.dim() - 1))


def weighted_mean(stack: Tensor, weights: Tensor) -> Tensor:
    """Σ_i w_i·x_i / Σ_i w_i: FedAvg on the dense deltas."""
    _check_stack(stack, weights)
    w = _broadcastable(weights, stack)
    return (w * stack).sum(dim=0) / w.sum()


def weighted_trimmed_mean(stack: Tensor, weights: Tensor, trim_fraction: float) -> Tensor:
    """Per coordinate, drop the floor(β·n) smallest and largest values, then take the weighted mean of the rest.

    With equal weights this is the coordinate-wise trimmed mean of Yin et al. (2018); a client with outlying
    coordinates loses them instead of pulling the mean. β must lie in [0, 0.5) so that at least one value stays.
    """
    _check_stack(stack, weights)
    if not (0.0 <= trim_fraction < 0.5):
        raise ValueError(f"trim_fraction must lie in [0, 0.5), got {trim_fraction}")
    n = stack.shape[0]
    trimmed = math.floor(trim_fraction * n)
    if trimmed == 0:
        return weighted_mean(stack, weights)
    values, order = stack.sort(dim=0)
    kept_weights = weights.to(stack.dtype)[order]
    kept_weights[:trimmed] = 0
    kept_weights[n - trimmed :] = 0
    return (kept_weights * values).sum(dim=0) / kept_weights.sum(dim=0)


def weighted_coordinate_median(stack: Tensor, weights: Tensor) -> Tensor:
    """Per coordinate, the weighted median: the value where the cumulative weight of the sorted values reaches half.

    When the cumulative weight hits exactly half (e.g. an even count of equal weights) the two middle values are
    averaged, so with equal weights this equals the ordinary median. Robust to any minority of arbitrary values.
    """
    _check_stack(stack, weights)
    values, order = stack.sort(dim=0)
    # float64 so that "exactly half" survives the cumulative sum for weights such as 1/6.
    cumulative = weights.to(torch.float64)[order].cumsum(dim=0)
    half = cumulative[-1] / 2
    tolerance = half * 1e-9
    lower = (cumulative < half - tolerance).sum(dim=0, keepdim=True)
    upper = (cumulative <= half + tolerance).sum(dim=0, keepdim=True).clamp(max=stack.shape[0] - 1)
    return ((values.gather(0, lower) + values.gather(0, upper)) / 2).squeeze(0)


def clip_factor(tensors: Sequence[Tensor], max_norm: float) -> float:
    """The factor min(1, C / ‖x‖) that brings the joint Frobenius norm of `tensors` down to at most C.

    Clipping one update's delta for an expert as a whole (all its weight matrices together) bounds how far any
    single client can move that expert, whatever its aggregation weight (as in DP-FedAvg and robust FL).
    """
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"max_norm must be a finite number > 0, got {max_norm}")
    norm = joint_norm(tensors)
    return 1.0 if norm <= max_norm else max_norm / norm


def joint_norm(tensors: Sequence[Tensor]) -> float:
    """Frobenius norm of all `tensors` taken as one vector, computed in float64."""
    return math.sqrt(sum(float(tensor.detach().to(torch.float64).square().sum()) for tensor in tensors))
