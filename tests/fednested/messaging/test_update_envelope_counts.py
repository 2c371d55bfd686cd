"""The counts an update envelope carries into weighting (examples, routed tokens) are bounded on the wire, so that no
claim overflows a database column or turns into an unbounded weight. (Schema: fednested/messaging/schemas.py.)"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from fednested.messaging import AdapterSummary, PayloadRef, SchemaError, UpdateEnvelope, decode, encode
from fednested.messaging.schemas import MAX_COUNT


def envelope_document(**changes: Any) -> bytes:
    envelope = UpdateEnvelope(
        update_id=uuid.UUID("0b7c6f1e-2f55-4e9a-9d38-5d2f3c1a7e10"),
        client_id="edge-0001",
        base_version="v3",
        examples=128,
        routed_tokens={"0.0": 900},
        payload=PayloadRef(uri="s3://deltas/edge-0001/u.safetensors", sha256="0f" * 32, size_bytes=65536),
        adapter=AdapterSummary(rank=8, alpha=16.0, target_modules=["w1", "w2", "w3"]),
        created_at=datetime(2025, 6, 1, 12, 0, tzinfo=UTC),
    )
    document = json.loads(encode(envelope))
    document.update(changes)
    return json.dumps(document).encode()


def problems(raw: bytes) -> list[str]:
    with pytest.raises(SchemaError) as caught:
        decode(raw)
    return list(caught.value.problems)


def test_the_bound_is_the_largest_signed_32_bit_integer() -> None:
    assert MAX_COUNT == 2**31 - 1


def test_counts_up_to_the_bound_are_accepted() -> None:
    decoded = decode(envelope_document(examples=MAX_COUNT, routed_tokens={"0.0": MAX_COUNT, "3.7": 0}))
    assert isinstance(decoded, UpdateEnvelope)
    assert decoded.examples == MAX_COUNT
    assert decoded.routed_tokens == {"0.0": MAX_COUNT, "3.7": 0}


def test_examples_over_the_bound_are_refused() -> None:
    found = problems(envelope_document(examples=MAX_COUNT + 1))
    assert any(line.startswith("field 'examples': Input should be less than or equal to 2147483647") for line in found)


def test_routed_tokens_over_the_bound_are_refused_naming_the_expert() -> None:
    found = problems(envelope_document(routed_tokens={"0.0": 5, "1.3": 10**30}))
    assert any(
        line.startswith("field 'routed_tokens.1.3': Input should be less than or equal to 2147483647") for line in found
    ), found


def test_routed_tokens_hold_at_most_65536_experts() -> None:
    at_limit = {f"{index // 1024}.{index % 1024}": 1 for index in range(65_536)}
    decoded = decode(envelope_document(routed_tokens=at_limit))
    assert isinstance(decoded, UpdateEnvelope)
    assert len(decoded.routed_tokens) == 65_536
    found = problems(envelope_document(routed_tokens={**at_limit, "64.0": 1}))
    assert any(
        line.startswith("field 'routed_tokens': Dictionary should have at most 65536 items") for line in found
    ), found
