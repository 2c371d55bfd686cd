"""Forward of a fused MoE expert stack over routed tokens only, with optional per-expert LoRA on top."""

# Used by the adapter layer (fp or quantized base) and by quantized expert stacks without adapters. Tokens are sorted
# by expert once per layer; each expert then runs two contiguous matmuls on just its tokens, and LoRA adds
# `scale·(x·Aᵀ)·Bᵀ` on those same rows, so no dense ΔW is ever built in the forward and no base-weight gradient is
# computed in the backward.

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fednested.config.adapter import EXPERT_TARGETS

# The two fused expert tensors of transformers 5 MoE families, declared with the adapter config that allows them.
GATE_UP, DOWN = EXPERT_TARGETS


@runtime_checkable
class FrozenExpertLinear(Protocol):
    """An expert stack whose weights are not plain tensors (e.g. quantized): it applies expert `e`'s weight itself."""

    num_experts: int

    def expert_linear(self, target: str, expert: int, inputs: torch.Tensor) -> torch.Tensor:
        """inputs @ W[target][expert]ᵀ, differentiable in `inputs` only."""
        ...

    def expert_shape(self, target: str) -> tuple[int, int, int]:
        """[num_experts, out_features, in_features] of `target`."""
        ...


@dataclass(frozen=True)
class StackedLora:
    """One adapter's factors on one target for some experts: A [n, r, in], B [n, out, r]; ΔW_e = scale · B · A."""

    experts: tuple[int, ...]
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scale: float
    dropout: nn.Module | None = None


# target name -> the active adapters on it
LorasByTarget = Mapping[str, Sequence[StackedLora]]


def expert_shape(experts: nn.Module, target: str) -> tuple[int, int, int]:
    """[num_experts, out_features, in_features] of a fused target on an fp or quantized expert stack."""
    if isinstance(experts, FrozenExpertLinear):
        return experts.expert_shape(target)
    weight = getattr(experts, target)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 3:
        raise TypeError(f"{type(experts).__name__}.{target} is not a fused 3-D expert tensor")
    num, out_features, in_features = weight.shape
    return int(num), int(out_features), int(in_features)


def num_experts(experts: nn.Module) -> int:
    value = getattr(experts, "num_experts", None)
    if isinstance(value, int):
        return value
    return expert_shape(experts, GATE_UP)[0]


def _base_linear(experts: nn.Module) -> Callable[[str, int, torch.Tensor], torch.Tensor]:
    if isinstance(experts, FrozenExpertLinear):
        return experts.expert_linear

    def linear(target: str, expert: int, inputs: torch.Tensor) -> torch.Tensor:
        weight = getattr(experts, target)[expert]
        return F.linear(inputs, weight.to(inputs.dtype))

    return linear


def _apply_gate(experts: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    # transformers' experts classes carry `_apply_gate` (concatenated [gate; up] halves); fall back to that rule.
    apply_gate = getattr(experts, "_apply_gate", None)
    if callable(apply_gate):
        result = apply_gate(gate_up)
        assert isinstance(result, torch.Tensor)
        return result
    gate, up = gate_up.chunk(2, dim=-1)
    act_fn = experts.act_fn
    assert callable(act_fn)
    activated = act_fn(gate)
    assert isinstance(activated, torch.Tensor)
    return activated * up


def _project(
    experts: nn.Module,
    linear: Callable[[str, int, torch.Tensor], torch.Tensor],
    target: str,
    inputs: torch.Tensor,
    rows_per_expert: list[int],
    loras: Sequence[StackedLora],
) -> torch.Tensor:
    """Rows of `inputs` (sorted by expert) times their expert's W[target]ᵀ, plus each adapter's LoRA term."""
    # torch.split, not one slice per expert: the backward of E slices would zero-fill and add E full-size gradient
    # buffers, while split's backward is one concatenation
    chunks = torch.split(inputs, rows_per_expert)
    # LoRA runs in the adapters' dtype (fp32): under a bf16 base, oneDNN's bf16 kernels for rank-8 matmuls were ~10x
    # slower than fp32 ones (measured, docs/adr/0002-edge-quantization.md), and fp32 keeps small updates exact
    lora_chunks = []
    for lora in loras:
        lora_in = lora.dropout(inputs) if lora.dropout is not None else inputs
        same = lora_in is inputs and inputs.dtype == lora.lora_a.dtype
        lora_chunks.append(chunks if same else torch.split(lora_in.to(lora.lora_a.dtype), rows_per_expert))
    # unbind each stack once: one backward node instead of a zero-filled gradient per expert
    factors = [
        dict(zip(lora.experts, zip(lora.lora_a.unbind(0), lora.lora_b.unbind(0), strict=True), strict=True))
        for lora in loras
    ]
    pieces: list[torch.Tensor] = []
    for expert, rows in enumerate(rows_per_expert):
        if rows == 0:
            continue
        out = linear(target, expert, chunks[expert])
        for lora, lora_in_chunks, by_expert in zip(loras, lora_chunks, factors, strict=True):
            if expert not in by_expert:
                continue
            lora_a, lora_b = by_expert[expert]
            # under CPU bf16 autocast the LoRA matmuls would be cast back to bf16, which is the slow path above
            with torch.autocast(inputs.device.type, enabled=False):
                down = F.linear(lora_in_chunks[expert], lora_a)
                if out.dtype == down.dtype:
                    out = torch.addmm(out, down, lora_b.t(), alpha=lora.scale)
                else:
                    out = out + F.linear(down, lora_b * lora.scale).to(out.dtype)
        pieces.append(out)
    return torch.cat(pieces)


def routed_experts_forward(
    experts: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    loras: LorasByTarget | None = None,
    *,
    recompute: bool = False,
) -> torch.Tensor:
    """Σ_k weight_k · expert_k(x) for every token, with each adapter in `loras[target]` added on its experts.

    Same contract as transformers' experts modules: hidden_states [T, H], top_k_index/top_k_weights [T, K].
    recompute: keep only the routed inputs for the backward and run the expert FFNs again there (activation
    checkpointing): about a third more expert compute for a fraction of the activation memory.
    """
    num_tokens, hidden = hidden_states.shape
    top_k = top_k_index.shape[-1]
    count = num_experts(experts)
    linear = _base_linear(experts)
    flat_experts = top_k_index.reshape(-1)
    order = torch.argsort(flat_experts, stable=True)
    # one host sync for all per-expert row counts instead of one per expert
    rows_per_expert = torch.bincount(flat_experts, minlength=count).tolist()
    if len(rows_per_expert) > count:
        raise IndexError(f"router selected expert {len(rows_per_expert) - 1} but the stack has {count} experts")
    gate_up_loras = loras.get(GATE_UP, ()) if loras is not None else ()
    down_loras = loras.get(DOWN, ()) if loras is not None else ()

    def expert_block(sorted_inputs: torch.Tensor) -> torch.Tensor:
        gate_up = _project(experts, linear, GATE_UP, sorted_inputs, rows_per_expert, gate_up_loras)
        activated = _apply_gate(experts, gate_up)
        return _project(experts, linear, DOWN, activated, rows_per_expert, down_loras)

    sorted_inputs = hidden_states[order // top_k]
    if recompute and torch.is_grad_enabled():
        # non-reentrant checkpointing replays dropout with the same RNG state and reaches closure parameters
        sorted_out = checkpoint(expert_block, sorted_inputs, use_reentrant=False)
        assert isinstance(sorted_out, torch.Tensor)
    else:
        sorted_out = expert_block(sorted_inputs)
    sorted_out = sorted_out * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(sorted_out.dtype)
    # back to (token, k) order, then a fixed-order sum over k: deterministic, unlike scatter-add with duplicates
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    unsorted = sorted_out[inverse]
    return unsorted.view(num_tokens, top_k, hidden).sum(dim=1).to(hidden_states.dtype)


def set_expert_recompute(model: nn.Module, enabled: bool = True) -> int:
    """Turn activation recompute on or off for every expert stack that supports it; returns how many it changed.

    Covers expert LoRA layers and quantized stacks (both run `routed_experts_forward`); plain transformers stacks
    in layers without adapters are left as they are.
    """
    changed = 0
    for module in model.modules():
        if hasattr(module, "recompute_activations"):
            setattr(module, "recompute_activations", enabled)  # noqa: B010 (the attribute is not declared on Module)
            changed += 1
    return changed
