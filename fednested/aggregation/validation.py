"""Checks an edge update's adapter tensors against the base model before they may be aggregated.

Every failure is an `UpdateRejected` with a fixed `RejectionCode` and a message naming the offending tensors, so
the ingest worker can store the reason and the device's operator can act on it. Checks run cheapest first, and the
delta norms are computed from the r×r Gram matrices, so a rejected update never costs a dense ΔW.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fednested.adapters.lora import (
    LORA_FACTORS,
    AdapterError,
    ExpertLoraConfig,
    adapter_key,
    layer_index,
    parse_adapter_key,
)
from fednested.aggregation.aggregate import ExpertKey, expert_key
from fednested.aggregation.rejections import RejectionCode, UpdateRejected
from fednested.checkpoints.manifest import Manifest
from fednested.deltas import DeltaKey, ExpertShapes, delta_key

# How many offending tensors a message lists before it says "and N more".
_SHOWN = 5
DEFAULT_DTYPES: frozenset[torch.dtype] = frozenset({torch.float32, torch.float16, torch.bfloat16})
# A sanity ceiling on ‖scale·B·A‖ that holds whatever a window configures: trained LoRA deltas are orders of
# magnitude smaller (weights are O(1)), and far above it the fp32 sums of a window's deltas can overflow to inf,
# which would fail the whole window's aggregation instead of the one update.
ABSOLUTE_MAX_DELTA_NORM = 1e6


@dataclass(frozen=True)
class UpdateLimits:
    """What an acceptable update looks like beyond fitting the base: size, dtypes, and delta norms.

    Norms are Frobenius norms of the dense ΔW = scale·B·A: per (param, expert) and over all of them together.
    """

    max_bytes: int = 64 * 1024 * 1024
    max_delta_norm: float | None = None
    max_total_norm: float | None = None
    allowed_dtypes: frozenset[torch.dtype] = field(default_factory=lambda: DEFAULT_DTYPES)

    def __post_init__(self) -> None:
        if self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {self.max_bytes}")
        for name in ("max_delta_norm", "max_total_norm"):
            bound = getattr(self, name)
            if bound is not None and not (math.isfinite(bound) and bound > 0):
                raise ValueError(f"{name} must be None or a finite number > 0, got {bound}")
        if not self.allowed_dtypes or not all(dtype.is_floating_point for dtype in self.allowed_dtypes):
            raise ValueError(f"allowed_dtypes must be a non-empty set of float dtypes, got {set(self.allowed_dtypes)}")


@dataclass(frozen=True)
class ValidatedUpdate:
    """Adapters that passed every check (as fp32), the experts they touch, and the measured delta norms."""

    adapters: dict[str, Tensor]
    experts: frozenset[ExpertKey]
    delta_norms: dict[DeltaKey, float]
    total_norm: float
    payload_bytes: int


def expert_shapes_of(base: Manifest | ExpertShapes) -> ExpertShapes:
    """Fused expert parameter name → [num_experts, out, in], from a version manifest's partition map or as given."""
    if not isinstance(base, Manifest):
        return base
    if base.partition is None:
        raise ValueError(f"manifest of {base.version_id!r} has no partition map; it is not a model version")
    return {name: entry.shape for name, entry in base.partition.fused_expert_params().items()}


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown if len(items) <= _SHOWN else f"{shown} and {len(items) - _SHOWN} more"


def _reject(code: RejectionCode, message: str, client_id: str | None) -> UpdateRejected:
    return UpdateRejected(code, message, client_id=client_id)


def validate_update(
    adapters: Mapping[str, Tensor],
    adapter_config: ExpertLoraConfig,
    base: Manifest | ExpertShapes,
    limits: UpdateLimits,
    *,
    client_id: str | None = None,
) -> ValidatedUpdate:
    """Accept or reject one update's adapter tensors; raises `UpdateRejected(code, message)` on the first failing check.

    In order: size (`oversized`), names — only lora_A/lora_B of an existing expert of a fused expert tensor that
    the adapter config targets, both factors present (`bad_tensor_names`), dtype (`bad_dtype`), shapes A [r, in],
    B [out, r] (`bad_shapes`), finiteness, naming each tensor and its count of NaN/Inf values (`non_finite`), and
    the Frobenius norm of each dense delta scale·B·A and of all of them together (`norm_exceeded`).
    """
    if not adapters:
        raise _reject(RejectionCode.MALFORMED, "the payload holds no adapter tensors", client_id)
    payload_bytes = sum(tensor.numel() * tensor.element_size() for tensor in adapters.values())
    if payload_bytes > limits.max_bytes:
        raise _reject(
            RejectionCode.OVERSIZED,
            f"adapter tensors take {payload_bytes} bytes, the limit is {limits.max_bytes}",
            client_id,
        )
    shapes = expert_shapes_of(base)
    pairs = _check_names(adapters, adapter_config, shapes, client_id)
    wrong_dtype = sorted(
        f"{key} ({tensor.dtype})" for key, tensor in adapters.items() if tensor.dtype not in limits.allowed_dtypes
    )
    if wrong_dtype:
        allowed = ", ".join(sorted(str(dtype) for dtype in limits.allowed_dtypes))
        raise _reject(RejectionCode.BAD_DTYPE, f"tensors {_listing(wrong_dtype)} are not one of {allowed}", client_id)
    wrong_shape: list[str] = []
    for param_name, expert in pairs:
        _, out_features, in_features = shapes[param_name]
        wanted_shapes = {"lora_A": (adapter_config.rank, in_features), "lora_B": (out_features, adapter_config.rank)}
        for factor in LORA_FACTORS:
            key, wanted = adapter_key(param_name, expert, factor), wanted_shapes[factor]
            if tuple(adapters[key].shape) != wanted:
                wrong_shape.append(f"{key} has {list(adapters[key].shape)}, expected {list(wanted)}")
    if wrong_shape:
        raise _reject(RejectionCode.BAD_SHAPES, _listing(sorted(wrong_shape)), client_id)
    non_finite = []
    for key, tensor in sorted(adapters.items()):
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            non_finite.append(f"{key} holds {bad} NaN/Inf of {tensor.numel()} values")
    if non_finite:
        raise _reject(RejectionCode.NON_FINITE, _listing(non_finite), client_id)
    fp32 = {key: tensor.detach().to(torch.float32) for key, tensor in adapters.items()}
    norms = {
        delta_key(param_name, expert): lora_delta_norm(
            fp32[adapter_key(param_name, expert, "lora_A")],
            fp32[adapter_key(param_name, expert, "lora_B")],
            adapter_config.scale,
        )
        for param_name, expert in sorted(pairs)
    }
    total_norm = check_delta_norms(norms, limits, client_id=client_id)
    return ValidatedUpdate(
        adapters=fp32,
        experts=frozenset(expert_key(layer_index(param_name), expert) for param_name, expert in pairs),
        delta_norms=norms,
        total_norm=total_norm,
        payload_bytes=payload_bytes,
    )


def check_delta_norms(norms: Mapping[DeltaKey, float], limits: UpdateLimits, *, client_id: str | None = None) -> float:
    """The joint norm of an update's deltas, after checking each against `limits` and against
    ABSOLUTE_MAX_DELTA_NORM; raises `norm_exceeded` naming the deltas. Used at intake and again at aggregation (the
    window an update ends up in may set stricter limits than the one it was checked for)."""
    absolute = [f"{key} has ‖ΔW‖ = {norm:.6g}" for key, norm in norms.items() if not norm <= ABSOLUTE_MAX_DELTA_NORM]
    if absolute:
        raise _reject(
            RejectionCode.NORM_EXCEEDED,
            f"{_listing(absolute)}; no delta may exceed {ABSOLUTE_MAX_DELTA_NORM:g}, whatever the window's limits",
            client_id,
        )
    if limits.max_delta_norm is not None:
        over = [f"{key} has ‖ΔW‖ = {norm:.6g}" for key, norm in norms.items() if not norm <= limits.max_delta_norm]
        if over:
            raise _reject(
                RejectionCode.NORM_EXCEEDED,
                f"{_listing(over)}; the per-delta limit is {limits.max_delta_norm}",
                client_id,
            )
    total_norm = math.sqrt(sum(norm * norm for norm in norms.values()))
    if limits.max_total_norm is not None and not total_norm <= limits.max_total_norm:
        raise _reject(
            RejectionCode.NORM_EXCEEDED,
            f"the total delta norm is {total_norm:.6g}, the limit is {limits.max_total_norm}",
            client_id,
        )
    return total_norm


def _check_names(
    adapters: Mapping[str, Tensor], config: ExpertLoraConfig, shapes: ExpertShapes, client_id: str | None
) -> set[tuple[str, int]]:
    """The (param, expert) pairs the tensors form; rejects unknown names and half pairs, listing them all."""
    problems: list[str] = []
    factors: dict[tuple[str, int], set[str]] = {}
    for key in sorted(adapters):
        try:
            param_name, expert, factor = parse_adapter_key(key)
        except AdapterError:
            problems.append(f"{key!r} is not '<param>/expert=<e>/lora_A|lora_B'")
            continue
        if param_name not in shapes:
            problems.append(f"{key!r}: the base has no fused expert tensor {param_name!r}")
            continue
        num_experts = int(shapes[param_name][0])
        target = param_name.rpartition(".")[2]
        layer = layer_index(param_name)
        if not 0 <= expert < num_experts:
            problems.append(f"{key!r}: expert {expert} does not exist, {param_name} has {num_experts}")
        elif target not in config.targets:
            problems.append(f"{key!r}: the adapter config targets {list(config.targets)}, not {target!r}")
        elif config.layers is not None and layer not in config.layers:
            problems.append(f"{key!r}: the adapter config adapts layers {config.layers}, not {layer}")
        elif config.experts is not None and expert not in config.experts:
            problems.append(f"{key!r}: the adapter config adapts experts {config.experts}, not {expert}")
        else:
            factors.setdefault((param_name, expert), set()).add(factor)
    for (param_name, expert), present in sorted(factors.items()):
        for factor in LORA_FACTORS:
            if factor not in present:
                problems.append(f"{adapter_key(param_name, expert, factor)!r} is missing")
    if problems:
        raise _reject(RejectionCode.BAD_TENSOR_NAMES, _listing(problems), client_id)
    return set(factors)


def lora_delta_norm(lora_a: Tensor, lora_b: Tensor, scale: float) -> float:
    """‖scale·B·A‖_F without forming B·A: ‖BA‖² = tr(AᵀBᵀBA) = Σ (BᵀB ⊙ AAᵀ), two r×r Gram matrices, in float64."""
    a = lora_a.detach().to(torch.float64)
    b = lora_b.detach().to(torch.float64)
    squared = float(((b.T @ b) * (a @ a.T)).sum().clamp(min=0.0))
    return abs(scale) * math.sqrt(squared)
