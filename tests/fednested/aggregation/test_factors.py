"""The bounded safetensors reader, LoRA factors kept factored, and the in-memory and file factor sources."""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save, save_file

from fednested.adapters.lora import adapter_key
from fednested.aggregation.factors import (
    MAX_HEADER_BYTES,
    SAFETENSORS_DTYPES,
    AdapterFactors,
    FactorFile,
    FactorFileError,
    LoraFactors,
    parse_safetensors_header,
    read_safetensors_bytes,
)
from fednested.deltas import delta_key

UP = "model.layers.0.mlp.experts.gate_up_proj"
DOWN = "model.layers.0.mlp.experts.down_proj"


def safetensors_bytes(header: Any, data: bytes = b"", *, header_length: int | None = None) -> bytes:
    """A safetensors payload built by hand: u64 little-endian header length, the header, the data."""
    raw_header = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw_header) if header_length is None else header_length
    return struct.pack("<Q", length) + raw_header + data


def one_tensor(dtype: str = "F32", shape: Any = (2,), offsets: Any = (0, 8), data: bytes = b"\0" * 8) -> bytes:
    """A payload holding one tensor 'w' (tuples become JSON lists; other values are written as given)."""
    entry = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
    return safetensors_bytes({"w": entry}, data)


def test_the_allowed_dtypes_are_the_float_dtypes_adapters_use() -> None:
    expected = {"F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2)}
    assert expected == SAFETENSORS_DTYPES


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_against_the_safetensors_writer(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5, generator=generator).to(dtype),
        "b": torch.randn(7, generator=generator).to(dtype),
        "scalar": torch.tensor(1.5, dtype=dtype),
        "empty": torch.zeros(0, 4, dtype=dtype),
    }
    raw = save(tensors, metadata={"format": "pt"})
    read = read_safetensors_bytes(raw, where="payload")
    assert set(read) == set(tensors)
    for name, tensor in tensors.items():
        assert read[name].dtype == dtype
        assert read[name].shape == tensor.shape
        assert torch.equal(read[name], tensor)


def test_metadata_entry_is_ignored() -> None:
    raw = safetensors_bytes(
        {"__metadata__": {"format": "pt"}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
        struct.pack("<f", 2.5),
    )
    assert read_safetensors_bytes(raw, where="p") == {"w": torch.tensor([2.5])}
    # Even a __metadata__ that is no object is skipped, not read as a tensor.
    odd = safetensors_bytes(
        {"__metadata__": 5, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, struct.pack("<f", -1.0)
    )
    assert read_safetensors_bytes(odd, where="p") == {"w": torch.tensor([-1.0])}


def test_spans_are_absolute_offsets_into_the_file() -> None:
    raw = save({"a": torch.ones(2, 3), "b": torch.ones(4, dtype=torch.float16)})
    header_length = int.from_bytes(raw[:8], "little")
    spans = parse_safetensors_header(raw, file_size=len(raw), where="p")
    assert {name: (span.dtype, span.shape, span.stop - span.start) for name, span in spans.items()} == {
        "a": ("F32", (2, 3), 24),
        "b": ("F16", (4,), 8),
    }
    assert min(span.start for span in spans.values()) == 8 + header_length
    assert max(span.stop for span in spans.values()) == len(raw)


def test_header_of_exactly_the_limit_is_read_and_one_byte_more_is_refused() -> None:
    entry = {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    body = json.dumps(entry).encode()
    # safetensors pads its header with spaces; JSON allows the trailing whitespace.
    at_limit = safetensors_bytes(body + b" " * (MAX_HEADER_BYTES - len(body)), struct.pack("<f", 3.0))
    assert read_safetensors_bytes(at_limit, where="p") == {"w": torch.tensor([3.0])}
    over = safetensors_bytes(body + b" " * (MAX_HEADER_BYTES + 1 - len(body)), struct.pack("<f", 3.0))
    with pytest.raises(FactorFileError, match=f"header length {MAX_HEADER_BYTES + 1} is over the limit"):
        read_safetensors_bytes(over, where="p")


HOSTILE: list[tuple[str, bytes, str]] = [
    ("empty file", b"", r"p: 0 bytes is too short for a safetensors file"),
    ("shorter than the length field", b"\x01\x00\x00", r"p: 3 bytes is too short"),
    (
        "header length over the limit",
        safetensors_bytes({}, header_length=MAX_HEADER_BYTES + 1),
        rf"header length {MAX_HEADER_BYTES + 1} is over the limit of {MAX_HEADER_BYTES} bytes",
    ),
    ("header length of 2^64 - 1", safetensors_bytes({}, header_length=2**64 - 1), "header length 18446744073709551615"),
    ("header length past the end", safetensors_bytes({}, header_length=100), "past the end of the 10-byte file"),
    ("header not JSON", safetensors_bytes(b"{not json"), "p: header is not JSON"),
    ("header not UTF-8", safetensors_bytes(b'{"\xff": 1}'), "p: header is not JSON"),
    ("deeply nested arrays", safetensors_bytes(b"[" * 100_000), "p: header is not JSON"),
    ("deeply nested objects", safetensors_bytes(b'{"a":' * 100_000), "p: header is not JSON"),
    ("huge integer", safetensors_bytes(b'{"w": {"shape": [' + b"9" * 5000 + b"]}}"), "p: header is not JSON"),
    ("header a list", safetensors_bytes([1, 2]), "p: header must be a JSON object, got list"),
    ("header a string", safetensors_bytes(b'"F32"'), "p: header must be a JSON object, got str"),
    ("entry not an object", safetensors_bytes({"w": 3}), "p: tensor 'w': entry must be an object"),
    ("dtype F8_E8M0", one_tensor("F8_E8M0", (1,), (0, 1), b"\0"), "tensor 'w': dtype 'F8_E8M0' is not one of F32"),
    ("dtype F4", one_tensor("F4", (2,), (0, 1), b"\0"), "tensor 'w': dtype 'F4' is not one of F32, F16, BF16"),
    ("dtype I64", one_tensor("I64", (1,), (0, 8)), "tensor 'w': dtype 'I64' is not one of F32, F16, BF16"),
    ("dtype missing", safetensors_bytes({"w": {"shape": [1]}}), "tensor 'w': dtype 'None' is not one of"),
    ("shape not a list", one_tensor(shape="2"), "tensor 'w': shape 2 is not a list of sizes"),
    ("shape negative", one_tensor(shape=(-1,), offsets=(0, 0), data=b""), r"shape \[-1\] is not a list of sizes"),
    ("shape of floats", one_tensor(shape=(2.0,)), r"shape \[2.0\] is not a list of sizes"),
    ("shape of booleans", one_tensor(shape=(True, True)), r"shape \[True, True\] is not a list of sizes"),
    ("shape with 9 dimensions", one_tensor(shape=(1,) * 9, offsets=(0, 4), data=b"\0" * 4), "is not a list of sizes"),
    ("offsets not a list", one_tensor(offsets="0,8"), "tensor 'w': data_offsets 0,8 is not"),
    ("three offsets", one_tensor(offsets=(0, 4, 8)), r"data_offsets \[0, 4, 8\] is not \[start, stop\]"),
    ("offsets of floats", one_tensor(offsets=(0.0, 8.0)), r"data_offsets \[0.0, 8.0\] is not \[start, stop\]"),
    ("offsets shorter than the shape", one_tensor(offsets=(0, 4)), r"bytes 0..4 do not hold a F32 \[2\] tensor"),
    ("offsets longer than the shape", one_tensor(shape=(1,)), r"bytes 0..8 do not hold a F32 \[1\] tensor \(4 bytes"),
    ("offsets past the end", one_tensor(offsets=(8, 16)), r"bytes 8..16 do not hold a F32 \[2\] tensor"),
    ("offsets before the data", one_tensor(shape=(1,), offsets=(-4, 0)), r"bytes -4..0 do not hold"),
    ("offsets reversed", one_tensor(shape=(0,), offsets=(8, 0)), r"bytes 8..0 do not hold"),
    ("huge shape", one_tensor(shape=(2**30,) * 8), r"do not hold a F32 \[1073741824"),
]


@pytest.mark.parametrize(("raw", "message"), [case[1:] for case in HOSTILE], ids=[case[0] for case in HOSTILE])
def test_hostile_payload_is_a_factor_file_error_naming_the_problem(raw: bytes, message: str) -> None:
    # pytest.raises(FactorFileError) lets any other exception through, so a crash fails the test.
    with pytest.raises(FactorFileError, match=message) as caught:
        read_safetensors_bytes(raw, where="p")
    assert str(caught.value).startswith("p: ")
    # The cause chain is cut so that a hostile header's text is not repeated in the traceback.
    assert caught.value.__cause__ is None


@pytest.mark.parametrize("dtype", [["F32"], {"name": "F32"}])
def test_dtype_that_is_not_a_string_is_a_factor_file_error(dtype: Any) -> None:
    with pytest.raises(FactorFileError, match=r"tensor 'w': dtype .* is not one of F32, F16, BF16"):
        read_safetensors_bytes(one_tensor(dtype=dtype), where="p")


def test_header_cut_short_in_the_bytes_given_is_named() -> None:
    raw = save({"a": torch.ones(2)})
    with pytest.raises(FactorFileError, match="p: header truncated"):
        parse_safetensors_header(raw[:20], file_size=len(raw), where="p")


@pytest.mark.parametrize("keep", [4, 30, -1])
def test_truncated_file_is_refused(keep: int) -> None:
    raw = save({"a": torch.ones(4, 4), "b": torch.ones(3)})
    with pytest.raises(FactorFileError, match=r"too short|past the end|do not hold"):
        read_safetensors_bytes(raw[:keep], where="p")


def write_adapters(path: Path, adapters: dict[str, torch.Tensor]) -> Path:
    save_file(adapters, str(path))
    return path


def adapters_for(seed: int, experts: list[int], rank: int = 2, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    adapters = {}
    for expert in experts:
        adapters[adapter_key(UP, expert, "lora_A")] = torch.randn(rank, 4, generator=generator).to(dtype)
        adapters[adapter_key(UP, expert, "lora_B")] = torch.randn(6, rank, generator=generator).to(dtype)
        adapters[adapter_key(DOWN, expert, "lora_A")] = torch.randn(rank, 3, generator=generator).to(dtype)
        adapters[adapter_key(DOWN, expert, "lora_B")] = torch.randn(4, rank, generator=generator).to(dtype)
    return adapters


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_factor_file_reads_what_safetensors_loads(tmp_path: Path, dtype: torch.dtype) -> None:
    path = write_adapters(tmp_path / "adapters.safetensors", adapters_for(1, [0, 2], dtype=dtype))
    expected = load_file(str(path))
    source = FactorFile("u1", path, scale=2.0)
    assert source.delta_keys() == {delta_key(param, e) for param in (UP, DOWN) for e in (0, 2)}
    for key in source.delta_keys():
        param, _, expert = key.partition("/expert=")
        factors = source.read(key)
        assert factors.scale == 2.0
        assert factors.lora_a.dtype == factors.lora_b.dtype == torch.float32
        assert torch.equal(factors.lora_a, expected[adapter_key(param, int(expert), "lora_A")].float())
        assert torch.equal(factors.lora_b, expected[adapter_key(param, int(expert), "lora_B")].float())


def test_factor_file_and_adapter_factors_agree(tmp_path: Path) -> None:
    adapters = adapters_for(2, [1])
    from_file = FactorFile("u", write_adapters(tmp_path / "a.safetensors", adapters), scale=0.5)
    in_memory = AdapterFactors("u", adapters, scale=0.5)
    assert from_file.delta_keys() == in_memory.delta_keys()
    for key in in_memory.delta_keys():
        assert torch.equal(from_file.read(key).dense_rows(0, 6), in_memory.read(key).dense_rows(0, 6))


@pytest.mark.parametrize("dropped", ["lora_A", "lora_B"])
def test_key_missing_one_factor_is_named(tmp_path: Path, dropped: str) -> None:
    adapters = adapters_for(3, [0, 1])
    del adapters[adapter_key(DOWN, 1, dropped)]  # type: ignore[arg-type]
    path = write_adapters(tmp_path / "a.safetensors", adapters)
    message = rf"update u7: '{DOWN}/expert=1' lacks {dropped}"
    with pytest.raises(FactorFileError, match=message):
        FactorFile("u7", path, scale=1.0)
    with pytest.raises(FactorFileError, match=message):
        AdapterFactors("u7", adapters, scale=1.0).delta_keys()


def test_tensor_that_is_no_adapter_is_named(tmp_path: Path) -> None:
    adapters = {**adapters_for(4, [0]), "model.embed_tokens.weight": torch.zeros(2, 2)}
    with pytest.raises(FactorFileError, match=r"update u8: adapter tensor 'model.embed_tokens.weight' is not named"):
        FactorFile("u8", write_adapters(tmp_path / "a.safetensors", adapters), scale=1.0)


def test_hostile_file_is_refused_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(one_tensor("F8_E8M0", (1,), (0, 1), b"\0"))
    with pytest.raises(FactorFileError, match=r"update u9 \(hostile.safetensors\): tensor 'w': dtype 'F8_E8M0'"):
        FactorFile("u9", path, scale=1.0)


def test_file_cut_short_after_opening_is_an_error_not_a_crash(tmp_path: Path) -> None:
    path = write_adapters(tmp_path / "a.safetensors", adapters_for(5, [0]))
    source = FactorFile("u10", path, scale=1.0)
    last = max(source.spans, key=lambda name: source.spans[name].stop)
    with path.open("r+b") as handle:
        handle.truncate(source.spans[last].start + 1)
    cut = next(key for key, names in source.pairs.items() if last in names)
    with pytest.raises(FactorFileError, match=rf"update u10: {re.escape(repr(last))} was cut short in a.safetensors"):
        source.read(cut)
    # The pairs before the cut still read.
    assert all(source.read(key).lora_a.shape == (2, 4 if "gate_up" in key else 3) for key in source.pairs if key != cut)


def test_lora_factors_norm_is_the_dense_frobenius_norm() -> None:
    generator = torch.Generator().manual_seed(6)
    factors = LoraFactors(torch.randn(3, 5, generator=generator), torch.randn(7, 3, generator=generator), scale=-2.5)
    dense = (-2.5 * factors.lora_b.double() @ factors.lora_a.double()).norm().item()
    assert factors.norm() == pytest.approx(dense, rel=1e-12)
    assert LoraFactors(torch.zeros(3, 5), torch.zeros(7, 3), 1.0).norm() == 0.0
    # Rank-one example by hand: B = [[1], [2]], A = [[3, 4]] → B·A = [[3, 4], [6, 8]], ‖·‖ = sqrt(125).
    assert LoraFactors(torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0], [2.0]]), 2.0).norm() == 2 * math.sqrt(125)


def test_dense_rows_are_the_rows_of_scale_b_a() -> None:
    generator = torch.Generator().manual_seed(7)
    factors = LoraFactors(torch.randn(2, 4, generator=generator), torch.randn(6, 2, generator=generator), scale=0.5)
    full = 0.5 * factors.lora_b @ factors.lora_a
    torch.testing.assert_close(factors.dense_rows(0, 6), full)
    torch.testing.assert_close(factors.dense_rows(2, 5), full[2:5])
    assert factors.out_features == 6
