"""Frozen int8 / 4-bit (NF4) edge snapshots of a MoE model through bitsandbytes, with adapters trainable on top."""

# Expert stacks and linear layers keep only packed bytes plus per-block scales in memory; a weight is dequantized for
# one matmul at a time (forward, and again in backward instead of being saved), so no full-precision copy lives on.
# Embeddings, norms and routers stay in full precision. docs/adr/0002-edge-quantization.md records the choice.

from __future__ import annotations

import ctypes
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, cast

# bitsandbytes' import-time warning about the missing `kernels` package is filtered in fednested/__init__.py: PEFT
# imports bitsandbytes before this line does, so a filter here would come too late.
import bitsandbytes.functional as bnb_functional
import numpy as np
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

# bitsandbytes ships no type hints; QuantState is a plain record of the quantization parameters
_QuantState: Any = bnb_functional.QuantState
# The 8-bit code book (bitsandbytes' signed dynamic map): a fixed table, so it is shared rather than stored per tensor.
_DYNAMIC_MAP: torch.Tensor = bnb_functional.create_dynamic_map(signed=True)  # type: ignore[no-untyped-call]

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


class SliceSource(Protocol):
    """N weights of one shape, indexable one at a time: a [N, out, in] tensor, or slices read lazily from a file."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> torch.Tensor: ...


class BlockwiseQuantized(nn.Module):
    """N 2-D weights [N, out, in] held as packed bytes + per-block absmax, dequantized one slice at a time."""

    def __init__(self, weight: SliceSource, bits: Bits) -> None:
        """Quantize a [N, out, in] tensor, or N [out, in] slices read one at a time (e.g. lazily from a file)."""
        super().__init__()
        if bits not in BLOCKSIZE:
            raise QuantizationError(f"bits must be 8 or 4, got {bits!r}")
        if isinstance(weight, torch.Tensor) and weight.dim() != 3:
            raise QuantizationError(f"expected a [N, out, in] stack, got shape {list(weight.shape)}")
        count = len(weight)
        if count == 0:
            raise QuantizationError("cannot quantize an empty stack")
        self._slice_layout: _Layout | None = None
        packed: torch.Tensor | None = None
        scales: torch.Tensor | None = None
        with torch.no_grad():
            for index in range(count):
                # one slice at a time: the transient fp32 copy is one expert, not the stack
                data, absmax = self._quantize_slice(weight[index], bits, index)
                if packed is None or scales is None:
                    # filled in place rather than stacked at the end, so the packed stack never exists twice
                    packed = torch.empty((count, data.numel()), dtype=data.dtype)
                    scales = torch.empty((count, absmax.numel()), dtype=torch.float32)
                packed[index] = data.reshape(-1)
                scales[index] = absmax.reshape(-1)
                del data, absmax
        self.packed: torch.Tensor
        self.absmax: torch.Tensor
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", scales)

    def _quantize_slice(self, source: torch.Tensor, bits: Bits, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if source.dim() != 2 or not source.is_floating_point():
            raise QuantizationError(
                f"cannot quantize slice {index}: a {source.dtype} tensor of shape {list(source.shape)}, expected a "
                "2-D floating-point [out, in] weight"
            )
        shape = (int(source.shape[0]), int(source.shape[1]))
        if self._slice_layout is None:
            self._slice_layout = _Layout(bits, shape, BLOCKSIZE[bits])
        elif self._slice_layout.shape != shape:
            raise QuantizationError(
                f"slice {index} has shape {list(shape)}, slice 0 had {list(self._slice_layout.shape)}"
            )
        source = source.detach().to("cpu", torch.float32).contiguous()
        if bits == 4:
            data, state = bnb_functional.quantize_4bit(source, blocksize=self.layout.blocksize, quant_type="nf4")
        else:
            data, state = bnb_functional.quantize_blockwise(source, code=_DYNAMIC_MAP, blocksize=self.layout.blocksize)
        return data, state.absmax.float()

    @property
    def layout(self) -> _Layout:
        """Bit width, [out, in] of one slice and block size."""
        assert self._slice_layout is not None  # set by the first slice; __init__ refuses an empty stack
        return self._slice_layout

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
        self.num_experts = len(getattr(source, GATE_UP_NAME))
        # see fednested.adapters.routed.set_expert_recompute
        self.recompute_activations = False
        self.act_fn = source.act_fn
        self.stacks = nn.ModuleDict(
            {target: BlockwiseQuantized(getattr(source, target), bits) for target in EXPERT_TARGETS}
        )

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, SliceSource], act_fn: nn.Module, bits: Bits) -> QuantizedExperts:
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


def quantize_base(
    model: nn.Module, bits: Bits, *, quantize_linears: bool = True, lean_allocator: bool = True
) -> nn.Module:
    """Freeze `model` and replace its expert stacks (and, by default, its linear layers) by int8 / NF4 versions.

    `lean_allocator` pins glibc's mmap threshold for the process (`pin_mmap_threshold`): less memory, slower steps.

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
    if lean_allocator:
        pin_mmap_threshold()
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
    _return_freed_heap()
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
    directory: str | Path,
    bits: Bits,
    *,
    expected_version: str | None = None,
    quantize_linears: bool = True,
    lean_allocator: bool = True,
) -> tuple[nn.Module, Manifest]:
    """A version directory loaded straight into an int8 / NF4 snapshot, one expert tensor at a time.

    Same verification as `load_version` (sha256 of every file first, names, shapes). The full-precision expert
    stacks are never all resident: each is read, quantized and dropped before the next, which keeps peak memory
    near the quantized size.
    """
    root = Path(directory)
    manifest, config = open_version(root, expected_version=expected_version)
    if lean_allocator:
        pin_mmap_threshold()
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
        # this handle reads the header only (names, shapes): no data page of it is ever touched
        with safe_open(str(path), framework="pt") as handle:
            names = set(handle.keys())
            extra = sorted(names - {f"{name}.{target}" for name in stacks for target in EXPERT_TARGETS})
            if extra:
                raise CheckpointError(path, "other architecture", f"tensor(s) {extra[:3]} do not exist in this model")
            header = _header(path)
            for module_name, stack in stacks.items():
                slices = {
                    target: _expert_slices(handle, path, header, module_name, target, stack)
                    for target in EXPERT_TARGETS
                }
                act_fn = stack.act_fn
                assert isinstance(act_fn, nn.Module)
                _set_submodule(model, module_name, QuantizedExperts.from_tensors(slices, act_fn, bits))
                loaded |= {f"{module_name}.{target}" for target in EXPERT_TARGETS}
                _return_freed_heap()  # per layer, so freed transients do not pile up into the load's peak
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
    _return_freed_heap()
    return model, manifest


# glibc's mallopt parameter number for the mmap threshold, and the value it starts at
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 * 1024


def pin_mmap_threshold() -> bool:
    """Keep glibc's mmap threshold at its initial 128 KiB for this process; True where that was done (glibc).

    A quantized snapshot dequantizes a 1-16 MB weight for every matmul and frees it right after. glibc raises its
    mmap threshold to the size of the largest freed mapping, after which such buffers come from the heap instead,
    interleave with the activations autograd keeps, and their freed pages stay resident: on `medium` (NF4, expert
    recompute) the training peak was 1,306 MB above the import baseline, 546 MB with the threshold pinned (of which
    242 MB are the packed weights). Pinning it (as MALLOC_MMAP_THRESHOLD_=131072 would) maps each such buffer and
    returns it to the system on free. The page faults of re-mapping cost training speed (the tiny preset's NF4 steps
    ran 40-50% slower pinned; docs/benchmarks.md has the A/B), so a device chooses: `model.lean_allocator` in the
    tier2 config (on by default, since a device that chose a 4-bit base chose it for memory). The pin is
    process-wide and cannot be undone by this module.
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def _return_freed_heap() -> None:
    """Give the heap pages freed by quantization back to the operating system (glibc only; a no-op elsewhere).

    Quantizing frees many fp32 expert slices and bitsandbytes temporaries of a few MB between the packed buffers
    that stay; glibc keeps such freed pages for reuse and they count in RSS. Measured on `medium` (NF4): 500 MB
    resident after loading, 237 MB of it the model, 242 MB after malloc_trim (a few ms).
    """
    malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if malloc_trim is not None:
        malloc_trim(0)


# safetensors dtype names of the floating-point tensors an expert stack may be stored in
_FLOAT_DTYPES: dict[str, torch.dtype] = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class _FileSlices:
    """The [out, in] expert slices of one [E, out, in] safetensors tensor, each read from the file when asked for.

    Read with plain file reads at the offsets of the safetensors header rather than through safetensors' memory
    map: a mapping's pages stay in this process's RSS until it closes (a whole layer's fp32 experts, 200 MB on
    `medium`, would join the peak), and on the benchmark VM faulting 16 MB of mapped pages in took 0.4 s where a
    read takes 10 ms. The transient is one expert's weights.
    """

    def __init__(self, path: Path, key: str, shape: list[int], dtype: torch.dtype, data_start: int) -> None:
        self.path, self.key, self.dtype, self.data_start = path, key, dtype, data_start
        self.count = shape[0]
        self.slice_shape = (shape[1], shape[2])
        self.slice_bytes = shape[1] * shape[2] * dtype.itemsize

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int, /) -> torch.Tensor:
        if not 0 <= index < self.count:
            raise IndexError(f"{self.key} has {self.count} experts, asked for {index}")
        raw = np.fromfile(
            self.path, dtype=np.uint8, count=self.slice_bytes, offset=self.data_start + index * self.slice_bytes
        )
        if raw.size != self.slice_bytes:
            raise CheckpointError(self.path, "truncated", f"tensor {self.key!r} ends past the end of the file")
        # safetensors stores little-endian, as every platform torch runs the edge loop on
        return torch.from_numpy(raw).view(self.dtype).reshape(self.slice_shape)


def _header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the offset where its data starts (format: u64 length, JSON)."""
    with path.open("rb") as file:
        length = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(length))
    if not isinstance(header, dict):
        raise CheckpointError(path, "corrupt", "the safetensors header is not a JSON object")
    return header, 8 + length


def _expert_slices(
    handle: Any,
    path: Path,
    header: tuple[dict[str, Any], int],
    module_name: str,
    target: str,
    stack: nn.Module,
) -> _FileSlices:
    key = f"{module_name}.{target}"
    entries, data_start = header
    if key not in entries:
        raise CheckpointError(path, "missing", f"tensor {key!r} is not in the file")
    expected = list(getattr(stack, target).shape)
    shape = list(handle.get_slice(key).get_shape())
    if shape != expected:
        raise CheckpointError(path, "other shapes", f"tensor {key!r} has shape {shape}, the config needs {expected}")
    dtype_name = entries[key].get("dtype")
    if dtype_name not in _FLOAT_DTYPES:
        raise CheckpointError(
            path, "invalid", f"tensor {key!r} is {dtype_name}; an expert stack must be one of {list(_FLOAT_DTYPES)}"
        )
    begin, _ = entries[key]["data_offsets"]
    return _FileSlices(path, key, shape, _FLOAT_DTYPES[dtype_name], data_start + int(begin))


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
