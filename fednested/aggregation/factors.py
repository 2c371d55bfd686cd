"""LoRA factors of edge updates, read lazily and checked: a bounded safetensors reader and the factor sources the
factored aggregation pulls one expert at a time from.

Why our own reader: `safetensors` maps the whole file and its loader aborts on dtypes torch cannot build (e.g.
`F8_E8M0`); the aggregation must hold only the current expert's factors of K updates, and a hostile payload must be
a clear rejection. The format is a little-endian u64 header length, a JSON header `{name: {dtype, shape,
data_offsets}}` and the data; we parse the header under a size bound and `pread` one tensor at a time.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from fednested.adapters.lora import AdapterError, parse_adapter_key
from fednested.deltas import DeltaKey, delta_key

# A header this large holds far more tensor entries than any adapter file needs (each entry is ~150 bytes).
MAX_HEADER_BYTES = 4 * 1024 * 1024
# safetensors dtype name → (torch dtype, bytes per element); only float dtypes adapters may use.
SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
}


# Pairs whose norms are computed in one batched product (a chunk's float64 copies are the extra memory).
NORM_CHUNK = 32


class FactorFileError(ValueError):
    """A payload that is not a readable adapter file; the message says what is wrong and where."""


@dataclass(frozen=True)
class TensorSpan:
    """Where one tensor's bytes lie in a safetensors file (offsets are absolute), its dtype and shape."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    stop: int


def parse_safetensors_header(head: bytes, *, file_size: int, where: str) -> dict[str, TensorSpan]:
    """The tensor index of a safetensors file from its first bytes (at least 8 + header length).

    Every entry is checked: a known float dtype, a shape of non-negative ints, offsets inside the file that match
    the shape's byte size. Raises FactorFileError naming the tensor and the problem.
    """
    if file_size < 8 or len(head) < 8:
        raise FactorFileError(f"{where}: {file_size} bytes is too short for a safetensors file")
    header_length = int.from_bytes(head[:8], "little")
    if header_length > MAX_HEADER_BYTES or 8 + header_length > file_size:
        raise FactorFileError(
            f"{where}: header length {header_length} is over the limit of {MAX_HEADER_BYTES} bytes or past the end "
            f"of the {file_size}-byte file"
        )
    if len(head) < 8 + header_length:
        raise FactorFileError(f"{where}: header truncated")
    try:
        header = json.loads(head[8 : 8 + header_length].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise FactorFileError(f"{where}: header is not JSON: {str(error)[:200]}") from None
    if not isinstance(header, dict):
        raise FactorFileError(f"{where}: header must be a JSON object, got {type(header).__name__}")
    data_start = 8 + header_length
    spans: dict[str, TensorSpan] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        label = f"{where}: tensor {name[:200]!r}"
        if not isinstance(entry, dict):
            raise FactorFileError(f"{label}: entry must be an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            allowed = ", ".join(SAFETENSORS_DTYPES)
            raise FactorFileError(f"{label}: dtype {str(dtype)[:40]!r} is not one of {allowed}")
        if not (
            isinstance(shape, list)
            and len(shape) <= 8
            and all(isinstance(size, int) and not isinstance(size, bool) and 0 <= size < 2**31 for size in shape)
        ):
            raise FactorFileError(f"{label}: shape {str(shape)[:80]} is not a list of sizes")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(value, int) and not isinstance(value, bool) for value in offsets)
        ):
            raise FactorFileError(f"{label}: data_offsets {str(offsets)[:80]} is not [start, stop]")
        start, stop = data_start + offsets[0], data_start + offsets[1]
        expected = math.prod(shape) * SAFETENSORS_DTYPES[dtype][1]
        if not (data_start <= start <= stop <= file_size) or stop - start != expected:
            raise FactorFileError(
                f"{label}: bytes {offsets[0]}..{offsets[1]} do not hold a {dtype} {shape} tensor ({expected} bytes) "
                f"inside the file"
            )
        spans[name] = TensorSpan(dtype=dtype, shape=tuple(shape), start=start, stop=stop)
    return spans


def _tensor_from_bytes(raw: bytes | bytearray, span: TensorSpan) -> Tensor:
    dtype, _ = SAFETENSORS_DTYPES[span.dtype]
    if not raw:
        return torch.empty(span.shape, dtype=dtype)
    # bytearray: torch.frombuffer wants a writable buffer; the copy is one tensor's bytes.
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(span.shape)


def read_safetensors_bytes(raw: bytes, *, where: str) -> dict[str, Tensor]:
    """Every tensor of an in-memory safetensors payload (checked as `parse_safetensors_header` does)."""
    spans = parse_safetensors_header(raw[: 8 + MAX_HEADER_BYTES], file_size=len(raw), where=where)
    return {name: _tensor_from_bytes(raw[span.start : span.stop], span) for name, span in spans.items()}


@dataclass(frozen=True)
class LoraFactors:
    """One expert weight's LoRA update: ΔW = scale · B · A, kept factored (A [r, in], B [out, r], fp32)."""

    lora_a: Tensor
    lora_b: Tensor
    scale: float

    @classmethod
    def checked(cls, lora_a: Tensor, lora_b: Tensor, scale: float, *, where: str) -> LoraFactors:
        """The pair as fp32, after checking that A is [r, in] and B is [out, r] with the same r."""
        if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.shape[0] != lora_b.shape[1]:
            raise FactorFileError(
                f"{where}: lora_A {list(lora_a.shape)} and lora_B {list(lora_b.shape)} are not [r, in] and [out, r]"
            )
        return cls(lora_a.detach().to(torch.float32), lora_b.detach().to(torch.float32), scale)

    @property
    def out_features(self) -> int:
        return int(self.lora_b.shape[0])

    def norm(self) -> float:
        """‖scale·B·A‖_F from two r×r Gram matrices, in float64 (never forms B·A)."""
        a = self.lora_a.to(torch.float64)
        b = self.lora_b.to(torch.float64)
        return abs(self.scale) * math.sqrt(float(((b.T @ b) * (a @ a.T)).sum().clamp(min=0.0)))

    def dense_rows(self, start: int, stop: int) -> Tensor:
        """Rows start..stop of the dense delta (what the robust rules need, a block at a time)."""
        return (self.lora_b[start:stop] @ self.lora_a) * self.scale


def squared_norms(pairs: Sequence[LoraFactors]) -> list[float]:
    """‖s·B·A‖_F² of each pair, from Gram matrices in float64; pairs of one shape are done in one batched product
    (what the aggregation needs: the norms of K updates' deltas for one expert weight)."""
    if not pairs:
        return []
    shapes = {(tuple(pair.lora_a.shape), tuple(pair.lora_b.shape)) for pair in pairs}
    if len(shapes) > 1:
        return [pair.norm() ** 2 for pair in pairs]
    squared: list[float] = []
    # In chunks: the float64 copies of a chunk, not of all K pairs, are what this adds to the peak.
    for start in range(0, len(pairs), NORM_CHUNK):
        chunk = pairs[start : start + NORM_CHUNK]
        a = torch.stack([pair.lora_a for pair in chunk]).to(torch.float64)
        b = torch.stack([pair.lora_b for pair in chunk]).to(torch.float64)
        grams = (b.transpose(1, 2) @ b) * (a @ a.transpose(1, 2))
        scales = torch.tensor([pair.scale for pair in chunk], dtype=torch.float64)
        squared.extend((grams.sum(dim=(1, 2)).clamp(min=0.0) * scales.square()).tolist())
    return squared


class FactorSource(Protocol):
    """One update's factors, readable one delta at a time."""

    @property
    def update_id(self) -> str: ...

    def delta_keys(self) -> frozenset[DeltaKey]: ...

    def read(self, key: DeltaKey) -> LoraFactors: ...


def _pairs(names: list[str], where: str) -> dict[DeltaKey, tuple[str, str]]:
    pairs: dict[DeltaKey, dict[str, str]] = {}
    for name in names:
        try:
            param_name, expert, factor = parse_adapter_key(name)
        except AdapterError as error:
            raise FactorFileError(f"{where}: {error}") from None
        pairs.setdefault(delta_key(param_name, expert), {})[factor] = name
    complete: dict[DeltaKey, tuple[str, str]] = {}
    for key, factors in pairs.items():
        if set(factors) != {"lora_A", "lora_B"}:
            raise FactorFileError(f"{where}: {key!r} lacks {'lora_B' if 'lora_A' in factors else 'lora_A'}")
        complete[key] = (factors["lora_A"], factors["lora_B"])
    return complete


class AdapterFactors:
    """Factors already in memory (an edge device's adapters, a test's tensors)."""

    def __init__(self, update_id: str, adapters: Mapping[str, Tensor], scale: float) -> None:
        self.update_id = update_id
        self.adapters = adapters
        self.scale = scale
        self.pairs = _pairs(list(adapters), f"update {update_id}")
        self._keys = frozenset(self.pairs)

    def delta_keys(self) -> frozenset[DeltaKey]:
        return self._keys

    def read(self, key: DeltaKey) -> LoraFactors:
        name_a, name_b = self.pairs[key]
        return LoraFactors.checked(
            self.adapters[name_a], self.adapters[name_b], self.scale, where=f"update {self.update_id}: {key}"
        )


class FactorFile:
    """An update's adapters.safetensors in the artifact store, read one factor pair at a time with `pread`.

    Only the header (bounded) is held; each `read` costs that pair's bytes. The caller has checked the file's
    sha256 before aggregating; a file that changes afterwards fails its header or offset checks or yields other
    values, never a crash.
    """

    def __init__(self, update_id: str, path: Path, scale: float) -> None:
        self.update_id = update_id
        self.path = path
        self.scale = scale
        size = path.stat().st_size
        with path.open("rb") as handle:
            # No more than the file holds: read(n) allocates n bytes up front, 4 MiB for every tiny payload.
            head = handle.read(min(size, 8 + MAX_HEADER_BYTES))
        self.spans = parse_safetensors_header(head, file_size=size, where=f"update {update_id} ({path.name})")
        self.pairs = _pairs(list(self.spans), f"update {update_id}")
        self._keys = frozenset(self.pairs)

    def delta_keys(self) -> frozenset[DeltaKey]:
        return self._keys

    def read(self, key: DeltaKey) -> LoraFactors:
        name_a, name_b = self.pairs[key]
        descriptor = os.open(self.path, os.O_RDONLY)
        try:
            tensors = []
            for name in (name_a, name_b):
                span = self.spans[name]
                raw = os.pread(descriptor, span.stop - span.start, span.start)
                if len(raw) != span.stop - span.start:
                    raise FactorFileError(f"update {self.update_id}: {name!r} was cut short in {self.path.name}")
                tensors.append(_tensor_from_bytes(raw, span).to(torch.float32))
        finally:
            os.close(descriptor)
        return LoraFactors.checked(tensors[0], tensors[1], self.scale, where=f"update {self.update_id}: {key}")
