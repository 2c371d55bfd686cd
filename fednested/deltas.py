"""Per-expert dense deltas ΔW_e = scale · B_e · A_e, their weighted sums, and merging W_e ← W_e + η · ΔW_e."""

# Aggregation works on these products, never on A and B separately (averaging factors is not averaging products). A
# delta is keyed "<base param name>/expert=<e>" (a valid safetensors key) and holds an fp32 [out, in] tensor.

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fednested.adapters.lora import (
    LORA_FACTORS,
    AdapterError,
    ExpertLoraConfig,
    ExpertLoraLayer,
    adapter_key,
    adapter_state_dict,
    expert_lora_config,
    expert_stacks,
    parse_adapter_key,
)
from fednested.adapters.routed import FrozenExpertLinear, expert_shape

DeltaKey = str
ExpertDeltas = dict[DeltaKey, torch.Tensor]
# base fused parameter name -> [num_experts, out, in]
ExpertShapes = Mapping[str, tuple[int, ...]]

_DELTA_KEY = re.compile(r"^(?P<param>.+)/expert=(?P<expert>\d+)$")


class DeltaError(ValueError):
    """Deltas or adapters that do not fit the model or each other (the message names the key)."""


def delta_key(param_name: str, expert: int) -> DeltaKey:
    """e.g. "model.layers.0.mlp.experts.down_proj/expert=3"."""
    return f"{param_name}/expert={expert}"


def parse_delta_key(key: DeltaKey) -> tuple[str, int]:
    """(base parameter name, expert index) of a delta key, or DeltaError naming it."""
    match = _DELTA_KEY.match(key)
    if match is None:
        raise DeltaError(f"delta key {key!r} is not '<param>/expert=<e>'")
    return match.group("param"), int(match.group("expert"))


def expert_param_shapes(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """Fused expert parameter name -> [num_experts, out, in], from a plain, quantized or PEFT-wrapped model."""
    shapes: dict[str, tuple[int, int, int]] = {}
    for module_name, stack in expert_stacks(model).items():
        base = stack.get_base_layer() if isinstance(stack, ExpertLoraLayer) else stack
        for target in ("gate_up_proj", "down_proj"):
            shapes[f"{module_name}.{target}"] = expert_shape(base, target)
    return shapes


def expert_deltas_from_adapters(
    adapters: Mapping[str, torch.Tensor], config: ExpertLoraConfig, model_or_shapes: nn.Module | ExpertShapes
) -> ExpertDeltas:
    """Dense fp32 ΔW_e = (alpha/rank) · B_e · A_e for every (param, expert) in `adapters`, from the tensors alone.

    Every key must name a fused expert parameter of the base, an expert in range, rank `config.rank`, and the
    in/out sizes of that parameter; each expert needs both lora_A and lora_B. Errors name the offending key.
    """
    shapes = expert_param_shapes(model_or_shapes) if isinstance(model_or_shapes, nn.Module) else model_or_shapes
    pairs: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    for key, tensor in adapters.items():
        try:
            param_name, expert, factor = parse_adapter_key(key)
        except AdapterError as error:
            raise DeltaError(str(error)) from error
        pairs.setdefault((param_name, expert), {})[factor] = tensor
    deltas: ExpertDeltas = {}
    for (param_name, expert), factors in sorted(pairs.items()):
        if param_name not in shapes:
            raise DeltaError(
                f"adapter {param_name!r}/expert={expert}: the base model has no fused expert tensor of that name"
            )
        num, out_features, in_features = (int(size) for size in shapes[param_name])
        if not 0 <= expert < num:
            raise DeltaError(f"adapter {param_name!r}/expert={expert}: expert out of range, the base has {num} experts")
        for factor in LORA_FACTORS:
            if factor not in factors:
                raise DeltaError(f"adapter {adapter_key(param_name, expert, factor)!r} is missing")
        lora_a, lora_b = factors["lora_A"], factors["lora_B"]
        if tuple(lora_a.shape) != (config.rank, in_features):
            raise DeltaError(
                f"adapter {adapter_key(param_name, expert, 'lora_A')!r} has shape {list(lora_a.shape)}, "
                f"expected {[config.rank, in_features]}"
            )
        if tuple(lora_b.shape) != (out_features, config.rank):
            raise DeltaError(
                f"adapter {adapter_key(param_name, expert, 'lora_B')!r} has shape {list(lora_b.shape)}, "
                f"expected {[out_features, config.rank]}"
            )
        delta = (lora_b.detach().float() @ lora_a.detach().float()) * config.scale
        if not torch.isfinite(delta).all():
            raise DeltaError(f"delta {delta_key(param_name, expert)!r} holds NaN or infinite values")
        deltas[delta_key(param_name, expert)] = delta
    return deltas


def expert_deltas(peft_model: nn.Module) -> ExpertDeltas:
    """The dense per-expert deltas of a model carrying expert adapters (as the server would compute them)."""
    return expert_deltas_from_adapters(adapter_state_dict(peft_model), expert_lora_config(peft_model), peft_model)


def merge_expert_deltas(model: nn.Module, deltas: Mapping[DeltaKey, torch.Tensor], eta: float = 1.0) -> None:
    """W_e ← W_e + eta · ΔW_e, in place, on a plain full-precision model; all keys are checked before any write."""
    if not math.isfinite(eta):
        raise DeltaError(f"eta must be finite, got {eta}")
    if hasattr(model, "peft_config"):
        raise DeltaError("merge into the plain base model, not a PEFT-wrapped one (adapters would double-count)")
    params = dict(model.named_parameters())
    targets: list[tuple[nn.Parameter, int, torch.Tensor]] = []
    for key, delta in sorted(deltas.items()):
        param_name, expert = parse_delta_key(key)
        if param_name not in params:
            module_name = param_name.rpartition(".")[0]
            module = dict(model.named_modules()).get(module_name)
            if isinstance(module, FrozenExpertLinear):
                raise DeltaError(f"delta {key!r}: {module_name} is quantized; merge into the full-precision model")
            raise DeltaError(f"delta {key!r}: the model has no parameter {param_name!r}")
        param = params[param_name]
        if param.dim() != 3 or not 0 <= expert < param.shape[0]:
            raise DeltaError(f"delta {key!r}: {param_name} has shape {list(param.shape)}, no expert {expert}")
        if tuple(delta.shape) != tuple(param.shape[1:]):
            raise DeltaError(f"delta {key!r} has shape {list(delta.shape)}, expected {list(param.shape[1:])}")
        if not torch.isfinite(delta).all():
            raise DeltaError(f"delta {key!r} holds NaN or infinite values")
        targets.append((param, expert, delta))
    with torch.no_grad():
        for param, expert, delta in targets:
            # add in fp32, round once to the parameter's dtype
            updated = param[expert].float() + eta * delta.to(param.device, torch.float32)
            param[expert].copy_(updated.to(param.dtype))


def weighted_sum(deltas: Sequence[Mapping[DeltaKey, torch.Tensor]], weights: Sequence[float]) -> ExpertDeltas:
    """Σ_k w_k · ΔW_k per key (a key missing from an update contributes zero). Weights are used as given.

    Summation runs in fp32 in the order of `deltas`, so the result is deterministic.
    """
    if len(deltas) != len(weights):
        raise DeltaError(f"{len(deltas)} delta sets but {len(weights)} weights")
    if not deltas:
        raise DeltaError("weighted_sum needs at least one delta set")
    for index, weight in enumerate(weights):
        if not math.isfinite(weight):
            raise DeltaError(f"weight {index} is not finite ({weight})")
    total: ExpertDeltas = {}
    shapes: dict[DeltaKey, tuple[int, ...]] = {}
    for index, (update, weight) in enumerate(zip(deltas, weights, strict=True)):
        for key in sorted(update):
            delta = update[key]
            if key in shapes and tuple(delta.shape) != shapes[key]:
                raise DeltaError(
                    f"delta set {index}: {key!r} has shape {list(delta.shape)}, earlier sets have {list(shapes[key])}"
                )
            shapes[key] = tuple(delta.shape)
            contribution = float(weight) * delta.float()
            total[key] = total[key] + contribution if key in total else contribution
    return dict(sorted(total.items()))
