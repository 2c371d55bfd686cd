"""Properties of the bounded safetensors reader over generated hostile files: whatever the bytes — random, a valid
file damaged, a header with odd dtypes (F8_E8M0, F4), offsets out of range, shapes whose product overflows, a lying
length prefix — FactorFile and read_safetensors_bytes return factors or raise FactorFileError, nothing else, and
allocate no more than a small multiple of the file's size however large the header claims its tensors are.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from fednested.adapters.lora import adapter_key
from fednested.aggregation.factors import MAX_HEADER_BYTES, FactorFile, FactorFileError, read_safetensors_bytes

BOUNDED = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DOWN = "model.layers.0.mlp.experts.down_proj"
# Python allocations besides the tensors' bytes (the parsed header's objects, error messages): a fixed allowance.
OVERHEAD_BYTES = 1 << 20

names = st.sampled_from(
    [adapter_key(DOWN, expert, factor) for expert in (0, 1) for factor in ("lora_A", "lora_B")]
    + ["__metadata__", "w", "model.lm_head.weight", "x/expert=-1/lora_A", ""]
)
dtypes = st.sampled_from(["F32", "F16", "BF16", "F8_E8M0", "F8_E4M3", "F4", "F6_E2M3", "I64", "U8", "BOOL", "f32", ""])
sizes = st.sampled_from([0, 1, 2, 3, 4, 7, 2**31 - 1, 2**31, 2**32 + 1, 2**62, 2**64, -1, -(2**63)])
json_junk = st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=8) | st.just({"nested": [1]})
entries = st.fixed_dictionaries(
    {
        "dtype": dtypes | json_junk,
        "shape": st.lists(sizes, max_size=10) | json_junk,
        "data_offsets": st.lists(sizes | st.integers(0, 600), min_size=0, max_size=3) | json_junk,
    }
)
headers = st.dictionaries(names, entries | json_junk, max_size=6)


def written(raw: bytes) -> Path:
    handle, name = tempfile.mkstemp(suffix=".safetensors")
    with os.fdopen(handle, "wb") as out:
        out.write(raw)
    return Path(name)


@contextmanager
def allocation_budget(file_size: int) -> Iterator[None]:
    """Python's peak allocation in the block stays within a small multiple of the file (pread copy, a bytearray for
    torch.frombuffer) plus a fixed allowance; torch's own buffers are checked from the tensors' sizes."""
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 3 * file_size + OVERHEAD_BYTES, f"peak {peak} bytes for a {file_size}-byte file"


def read_everything(raw: bytes) -> None:
    """The property: both readers give factors/tensors or FactorFileError, within the allocation budget."""
    size = len(raw)
    problems: list[str] = []
    with allocation_budget(size):
        try:
            tensors = read_safetensors_bytes(raw, where="generated")
        except FactorFileError as error:
            problems.append(str(error))
        else:
            assert sum(t.numel() * t.element_size() for t in tensors.values()) <= size
    path = written(raw)
    try:
        with allocation_budget(size):
            try:
                source = FactorFile("u-1", path, scale=2.0)
                keys = sorted(source.delta_keys())
            except FactorFileError as error:
                problems.append(str(error))
                keys = []
            for key in keys:
                try:
                    factors = source.read(key)
                except FactorFileError as error:
                    problems.append(str(error))
                    continue
                # fp32 copies of 16-bit factors may take twice their bytes in the file, never more.
                held = factors.lora_a.numel() + factors.lora_b.numel()
                assert held * 4 <= 2 * size
    finally:
        path.unlink()
    # Every refusal says which payload it was about.
    assert all(problem.startswith(("generated: ", "update u-1")) for problem in problems), problems


@BOUNDED
@given(st.binary(max_size=4096))
def test_random_bytes(raw: bytes) -> None:
    read_everything(raw)


@BOUNDED
@given(headers, st.binary(max_size=600), st.sampled_from(["exact", "short", "long", "huge", "limit", "zero"]))
def test_generated_headers_with_odd_dtypes_offsets_and_shapes(header: dict[str, Any], data: bytes, prefix: str) -> None:
    raw_header = json.dumps(header).encode()
    length = {
        "exact": len(raw_header),
        "short": max(len(raw_header) - 3, 0),
        "long": len(raw_header) + 5,
        "huge": 2**64 - 1,
        "limit": MAX_HEADER_BYTES + 1,
        "zero": 0,
    }[prefix]
    read_everything(struct.pack("<Q", length) + raw_header + data)


def valid_file(seed: int, dtype: torch.dtype) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        adapter_key(DOWN, 1, "lora_A"): torch.randn(2, 6, generator=generator).to(dtype),
        adapter_key(DOWN, 1, "lora_B"): torch.randn(5, 2, generator=generator).to(dtype),
    }
    return save(tensors)


@BOUNDED
@given(
    st.integers(0, 1000),
    st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
    st.none() | st.integers(0, 10**6),
)
def test_damaged_valid_files(seed: int, dtype: torch.dtype, flips: list[tuple[int, int]], cut: int | None) -> None:
    raw = bytearray(valid_file(seed, dtype))
    for position, byte in flips:
        raw[position % len(raw)] = byte
    read_everything(bytes(raw if cut is None else raw[: cut % (len(raw) + 1)]))


@BOUNDED
@given(
    st.sampled_from(["F8_E8M0", "F4", "F32", "BF16"]),
    st.lists(st.sampled_from([2**31 - 1, 2**30, 65536, 3]), min_size=1, max_size=8),
    st.tuples(st.integers(-(2**63), 2**64), st.integers(-(2**63), 2**64)),
)
def test_headers_claiming_huge_tensors_allocate_nothing_of_that_size(
    dtype: str, shape: list[int], offsets: tuple[int, int]
) -> None:
    """A header may claim any shape and offsets; the file holds 64 bytes of data, so nothing larger is ever read."""
    entry = {"dtype": dtype, "shape": shape, "data_offsets": list(offsets)}
    header = json.dumps({adapter_key(DOWN, 0, "lora_A"): entry, adapter_key(DOWN, 0, "lora_B"): entry}).encode()
    read_everything(struct.pack("<Q", len(header)) + header + b"\x01" * 64)


def test_a_valid_file_reads_back() -> None:
    """The properties above are not vacuous: an undamaged file gives its factors."""
    raw = valid_file(3, torch.float32)
    path = written(raw)
    try:
        source = FactorFile("u-1", path, scale=2.0)
        [key] = source.delta_keys()
        factors = source.read(key)
    finally:
        path.unlink()
    assert (tuple(factors.lora_a.shape), tuple(factors.lora_b.shape), factors.scale) == ((2, 6), (5, 2), 2.0)
