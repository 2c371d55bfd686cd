"""Frozen int8 / 4-bit (NF4) edge snapshots of a MoE model through bitsandbytes, with adapters trainable on top."""

# Expert stacks and linear layers keep only packed bytes plus per-block scales in memory; a weight is dequantized for
# one matmul at a time (forward, and again in backward instead of being saved), so no full-precision copy lives on.
# Embeddings, norms and routers stay in full precision. docs/adr/0002-edge-quantization.md records the choice.

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from fednested.adapters.lora import expert_stacks
from fednested.adapters.routed import routed_experts_forward
from fednested.checkpoints.errors import CheckpointError
from fednested.checkpoints.manifest import Manifest
from fednested.checkpoints.versions import (
    PARTITION_FILES,
    build_empty_model,
    check_loaded,
    load_partition_file,
    open_version,
)
from fednested.config.adapter import EXPERT_TARGETS
from fednested.partition import PartitionKind


def _import_bitsandbytes() -> Any:
    # bitsandbytes warns at import that the optional `kernels` package (a CPU 4-bit GEMV we do not call) is missing;
    # that line would otherwise open every edge log, so it is silenced for the import only.
    cpu_ops_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    previous = cpu_ops_logger.level
    cpu_ops_logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as functional
    finally:
        cpu_ops_logger.setLevel(previous)
    return functional


# bitsandbytes ships no type hints; QuantState is a plain record of the quantization parameters
bnb_functional = _import_bitsandbytes()
_QuantState: Any = bnb_functional.QuantState
# The 8-bit code book (bitsandbytes' signed dynamic map): a fixed table, so it is shared rather than stored per tensor.
_DYNAMIC_MAP: torch.Tensor = bnb_functional.create_dynamic_map(signed=True)

Bits = Literal[8, 4]
# 4-bit: NF4 (the QLoRA data type, best for normally distributed weights) in blocks of 64 values;
# 8-bit: bitsandbytes' dynamic 8-bit map in blocks of 256. Both keep one fp32 absmax per block.
BLOCKSIZE: dict[int, int] = {4: 64, 8: 256}
_ATTRIBUTE = "_fednested_quantized_bits"
GATE_UP_NAME = EXPERT_TARGETS[0]


class QuantizationError(ValueError):
    """A model, bit width or tensor that this module cannot quantize (says which)."""


@dataclass(frozen=True)
class _Layout:
    bits: Bits
    shape: tuple[int, int]  # one slice: [out_features, in_features]
    blocksize: int


class BlockwiseQuantized(nn.Module):
    """N 2-D weights [N, out, in] held as packed bytes + per-block absmax, dequantized one slice at a time."""

    def __init__(self, weight: torch.Tensor, bits: Bits) -> None:
        super().__init__()
        if bits not in BLOCKSIZE:
            raise QuantizationError(f"bits must be 8 or 4, got {bits!r}")
        if weight.dim() != 3:
            raise QuantizationError(f"expected a [N, out, in] stack, got shape {list(weight.shape)}")
        if not weight.is_floating_point():
            raise QuantizationError(f"cannot quantize a {weight.dtype} tensor")
        count, out_features, in_features = (int(size) for size in weight.shape)
        self.layout = _Layout(bits, (out_features, in_features), BLOCKSIZE[bits])
        packed: list[torch.Tensor] = []
        scales: list[torch.Tensor] = []
        with torch.no_grad():
            for index in range(count):
                # one slice at a time: the transient fp32 copy is one expert, not the stack
                source = weight[index].detach().to("cpu", torch.float32).contiguous()
                if bits == 4:
                    data, state = bnb_functional.quantize_4bit(
                        source, blocksize=self.layout.blocksize, quant_type="nf4"
                    )
                else:
                    data, state = bnb_functional.quantize_blockwise(
                        source, code=_DYNAMIC_MAP, blocksize=self.layout.blocksize
                    )
                packed.append(data.reshape(-1))
                scales.append(state.absmax.reshape(-1).float())
        self.packed: torch.Tensor
        self.absmax: torch.Tensor
        self.register_buffer("packed", torch.stack(packed))
        self.register_buffer("absmax", torch.stack(scales))

    @property
    def count(self) -> int:
        return int(self.packed.shape[0])

    def dequantize(self, index: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Slice `index` as a fresh [out, in] tensor of `dtype`."""
        layout = self.layout
        # bitsandbytes writes fp32/bf16/fp16 directly; anything else goes through fp32
        native = dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
        result: torch.Tensor
        if layout.bits == 4:
            state = _QuantState(
                absmax=self.absmax[index],
                shape=torch.Size(layout.shape),
                blocksize=layout.blocksize,
                quant_type="nf4",
                dtype=native,
            )
            result = bnb_functional.dequantize_4bit(self.packed[index], state, quant_type="nf4")
        else:
            state = _QuantState(absmax=self.absmax[index], code=_DYNAMIC_MAP, blocksize=layout.blocksize, dtype=native)
            result = bnb_functional.dequantize_blockwise(self.packed[index], state).reshape(layout.shape)
        return result.to(dtype)

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())


class _DequantizedLinear(torch.autograd.Function):
    """y = x · W_iᵀ with W_i dequantized in forward and again in backward, so no dequantized weight is saved."""

    @staticmethod
    def forward(ctx: Any, inputs: torch.Tensor, weights: BlockwiseQuantized, index: int) -> torch.Tensor:
        ctx.weights = weights
        ctx.index = index
        ctx.dtype = inputs.dtype
        return inputs @ weights.dequantize(index, inputs.dtype).t()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        weight = ctx.weights.dequantize(ctx.index, grad_output.dtype)
        return grad_output @ weight, None, None


def quantized_linear(inputs: torch.Tensor, weights: BlockwiseQuantized, index: int) -> torch.Tensor:
    """inputs @ W[index]ᵀ for any leading shape; differentiable in `inputs` only (the weight is frozen)."""
    leading = inputs.shape[:-1]
    flat = inputs.reshape(-1, inputs.shape[-1])
    out = _DequantizedLinear.apply(flat, weights, index)
    assert isinstance(out, torch.Tensor)
    return out.reshape(*leading, out.shape[-1])


class QuantizedExperts(nn.Module):
    """A fused expert stack (gate_up_proj [E, 2I, H], down_proj [E, H, I]) in int8 or NF4; frozen.

    Same call contract as transformers' experts modules (hidden, top_k_index, top_k_weights) and the
    `FrozenExpertLinear` protocol, so expert LoRA layers wrap it like a full-precision stack.
    """

    def __init__(self, source: nn.Module, bits: Bits) -> None:
        super().__init__()
        self.bits: Bits = bits
        self.num_experts = int(getattr(source, GATE_UP_NAME).shape[0])
        # see fednested.adapters.routed.set_expert_recompute
        self.recompute_activations = False
        self.act_fn = source.act_fn
        self.stacks = nn.ModuleDict(
            {target: BlockwiseQuantized(getattr(source, target), bits) for target in EXPERT_TARGETS}
        )

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], act_fn: nn.Module, bits: Bits) -> QuantizedExperts:
        holder = nn.Module()
        for target in EXPERT_TARGETS:
            setattr(holder, target, tensors[target])
        holder.act_fn = act_fn
        return cls(holder, bits)

    @property
    def qweight(self) -> torch.Tensor:
        # PEFT looks for `qweight` to learn which device a quantized layer lives on
        return cast(BlockwiseQuantized, self.stacks[GATE_UP_NAME]).packed

    def expert_shape(self, target: str) -> tuple[int, int, int]:
        out_features, in_features = cast(BlockwiseQuantized, self.stacks[target]).layout.shape
        return self.num_experts, out_features, in_features

    def expert_linear(self, target: str, expert: int, inputs: torch.Tensor) -> torch.Tensor:
        return quantized_linear(inputs, cast(BlockwiseQuantized, self.stacks[target]), expert)

    def dequantized(self, target: str) -> torch.Tensor:
        """The whole stack of `target` in fp32 (for inspection and error measurement, not for the forward)."""
        stack = cast(BlockwiseQuantized, self.stacks[target])
        return torch.stack([stack.dequantize(index) for index in range(stack.count)])

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        act_fn: Any = self.act_fn
        activated = act_fn(gate)
        assert isinstance(activated, torch.Tensor)
        return activated * up

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return routed_experts_forward(
            self, hidden_states, top_k_index, top_k_weights, recompute=self.recompute_activations
        )


class QuantizedLinear(nn.Module):
    """A frozen nn.Linear in int8 or NF4 (bias, if any, kept in full precision)."""

    def __init__(self, source: nn.Linear, bits: Bits) -> None:
        super().__init__()
        self.in_features = source.in_features
        self.out_features = source.out_features
        self.weights = BlockwiseQuantized(source.weight.detach().unsqueeze(0), bits)
        self.bias: torch.Tensor | None
        self.register_buffer("bias", None if source.bias is None else source.bias.detach().clone())

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out = quantized_linear(inputs, self.weights, 0)
        return out + self.bias.to(out.dtype) if self.bias is not None else out


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _quantizable_linears(model: nn.Module) -> list[str]:
    # routers and the shared-expert gate stay in full precision: they are tiny and decide the routing
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not name.endswith(("mlp.gate", "shared_expert_gate"))
    ]


def quantize_base(model: nn.Module, bits: Bits, *, quantize_linears: bool = True) -> nn.Module:
    """Freeze `model` and replace its expert stacks (and, by default, its linear layers) by int8 / NF4 versions.

    In place; returns the same model. The full-precision weights are released as each module is replaced.
    Attach adapters afterwards with `fednested.adapters.attach_expert_adapters`.
    """
    if bits not in BLOCKSIZE:
        raise QuantizationError(f"bits must be 8 or 4, got {bits!r}")
    if hasattr(model, "peft_config"):
        raise QuantizationError("quantize the plain base model first, then attach adapters")
    if getattr(model, _ATTRIBUTE, None) is not None:
        raise QuantizationError(f"model is already quantized to {getattr(model, _ATTRIBUTE)} bits")
    stacks = expert_stacks(model)
    if not stacks:
        raise QuantizationError(f"{type(model).__name__} has no fused expert stacks to quantize")
    for param in model.parameters():
        param.requires_grad_(False)
    for name, stack in stacks.items():
        _set_submodule(model, name, QuantizedExperts(stack, bits))
    if quantize_linears:
        for name in _quantizable_linears(model):
            linear = model.get_submodule(name)
            assert isinstance(linear, nn.Linear)
            _set_submodule(model, name, QuantizedLinear(linear, bits))
    setattr(model, _ATTRIBUTE, bits)
    nn.Module.eval(model)
    return model


def quantized_bits(model: nn.Module) -> int | None:
    """8 or 4 for a model made by `quantize_base` / `load_quantized_version` (PEFT-wrapped or not), else None."""
    for module in model.modules():
        value = getattr(module, _ATTRIBUTE, None)
        if isinstance(value, int):
            return value
    return None


def model_memory_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (packed bytes for quantized weights), each tensor once."""
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def load_quantized_version(
    directory: str | Path, bits: Bits, *, expected_version: str | None = None, quantize_linears: bool = True
) -> tuple[nn.Module, Manifest]:
    """A version directory loaded straight into an int8 / NF4 snapshot, one expert tensor at a time.

    Same verification as `load_version` (sha256 of every file first, names, shapes). The full-precision expert
    stacks are never all resident: each is read, quantized and dropped before the next, which keeps peak memory
    near the quantized size.
    """
    root = Path(directory)
    manifest, config = open_version(root, expected_version=expected_version)
    # untouched torch.empty storage is never paged in, so the fp32 expert placeholders cost no resident memory
    model = build_empty_model(config)
    loaded: set[str] = set()
    kinds: tuple[PartitionKind, ...] = ("core", "gate")
    for kind in kinds:
        if PARTITION_FILES[kind] in manifest.files:
            loaded |= load_partition_file(model, root, kind)
    stacks = expert_stacks(model)
    path = root / PARTITION_FILES["expert"]
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = set(handle.keys())
        extra = sorted(names - {f"{name}.{target}" for name in stacks for target in EXPERT_TARGETS})
        if extra:
            raise CheckpointError(path, "other architecture", f"tensor(s) {extra[:3]} do not exist in this model")
        for module_name, stack in stacks.items():
            # safetensors maps the file and pages it in as tensors are read; a fresh mapping per layer lets each
            # layer's fp32 pages leave the process with it instead of piling up to the whole file
            with safe_open(str(path), framework="pt") as handle:
                tensors = {
                    target: _read_expert_tensor(handle, path, names, module_name, target, stack)
                    for target in EXPERT_TARGETS
                }
            act_fn = stack.act_fn
            assert isinstance(act_fn, nn.Module)
            _set_submodule(model, module_name, QuantizedExperts.from_tensors(tensors, act_fn, bits))
            loaded |= {f"{module_name}.{target}" for target in EXPERT_TARGETS}
            del tensors
    except SafetensorError as error:
        raise CheckpointError(path, "corrupt", f"unreadable safetensors file: {error}") from error
    check_loaded(model, root, loaded, skip_prefixes=tuple(f"{name}." for name in stacks))
    for param in model.parameters():
        param.requires_grad_(False)
    if quantize_linears:
        for name in _quantizable_linears(model):
            linear = model.get_submodule(name)
            assert isinstance(linear, nn.Linear)
            _set_submodule(model, name, QuantizedLinear(linear, bits))
    # what stays in full precision (embeddings, norms, routers) still points into the core file's mapping, which
    # would keep the pages of the weights just quantized resident; private copies let that mapping go
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.data = tensor.data.clone()
    setattr(model, _ATTRIBUTE, bits)
    nn.Module.eval(model)
    return model, manifest


def _read_expert_tensor(
    handle: Any, path: Path, names: set[str], module_name: str, target: str, stack: nn.Module
) -> torch.Tensor:
    key = f"{module_name}.{target}"
    if key not in names:
        raise CheckpointError(path, "missing", f"tensor {key!r} is not in the file")
    expected = list(getattr(stack, target).shape)
    shape = list(handle.get_slice(key).get_shape())
    if shape != expected:
        raise CheckpointError(path, "other shapes", f"tensor {key!r} has shape {shape}, the config needs {expected}")
    tensor = handle.get_tensor(key)
    assert isinstance(tensor, torch.Tensor)
    return tensor


def quantization_error(reference: nn.Module, quantized: nn.Module) -> dict[str, float]:
    """Relative Frobenius error ‖W_q − W‖ / ‖W‖ per quantized expert tensor (to report what a bit width costs)."""
    errors: dict[str, float] = {}
    reference_params = dict(reference.named_parameters())
    for name, module in quantized.named_modules():
        if isinstance(module, QuantizedExperts):
            for target in EXPERT_TARGETS:
                original = reference_params[f"{name}.{target}"].detach().float()
                diff = torch.linalg.vector_norm(module.dequantized(target) - original).item()
                errors[f"{name}.{target}"] = diff / max(torch.linalg.vector_norm(original).item(), math.ulp(1.0))
    return errors
