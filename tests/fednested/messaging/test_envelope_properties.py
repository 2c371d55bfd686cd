"""Properties of the wire codec, over generated input: every valid UpdateEnvelope survives encode → decode unchanged,
and whatever bytes arrive — random, arbitrary JSON, a valid envelope mutated — `decode` returns a valid event or
raises SchemaError, never anything else (a consumer records a SchemaError and moves on; anything else would stop it).
"""

import json
import re
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fednested.messaging.schemas import (
    EVENT_TYPES,
    MAX_COUNT,
    SCHEMA_REGISTRY,
    SchemaError,
    UpdateEnvelope,
    decode,
    encode,
)

BOUNDED = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Printable, no whitespace or control characters: what the schemas' Identifier and Uri patterns take, any script.
printable = st.characters(categories=("L", "N", "P", "S"))
identifiers = st.text(printable, min_size=1, max_size=40)
client_ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,40}\Z")
expert_keys = st.builds(lambda layer, expert: f"{layer}.{expert}", st.integers(0, 10**6), st.integers(0, 10**6))
counts = st.integers(0, MAX_COUNT)
finite = st.floats(allow_nan=False, allow_infinity=False)
offsets = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda minutes: timezone(timedelta(minutes=minutes)))
aware = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=offsets)
signatures = st.one_of(st.just(""), st.from_regex(r"\A[a-z0-9-]{1,20}:[A-Za-z0-9+/=_-]{1,200}\Z"))

envelopes = st.builds(
    lambda **fields: UpdateEnvelope.model_validate(fields, strict=False),
    update_id=st.uuids().map(str),
    client_id=client_ids,
    base_version=identifiers,
    round_id=st.none() | identifiers,
    examples=counts,
    routed_tokens=st.dictionaries(expert_keys, counts, max_size=8),
    metrics=st.dictionaries(identifiers, finite, max_size=5),
    payload=st.fixed_dictionaries(
        {
            "uri": st.text(printable, min_size=1, max_size=120),
            "sha256": st.from_regex(r"\A[0-9a-f]{64}\Z"),
            "size_bytes": st.integers(1, 2**63),
        }
    ),
    adapter=st.fixed_dictionaries(
        {
            "rank": st.integers(1, 2**31),
            "alpha": st.floats(min_value=1e-300, allow_nan=False, allow_infinity=False),
            "target_modules": st.lists(identifiers, min_size=1, max_size=4),
        }
    ),
    created_at=aware.map(lambda moment: moment.isoformat()),
    signature=signatures,
)

json_scalars = st.none() | st.booleans() | st.integers() | finite | st.text(max_size=30)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=30,
)


def decodes_or_refuses(raw: bytes) -> None:
    """The property: a valid event (that encodes again), or a SchemaError that says something."""
    try:
        event = decode(raw)
    except SchemaError as error:
        message = str(error)
    else:
        assert isinstance(event, EVENT_TYPES)
        assert decode(encode(event)) == event
        return
    assert message


@BOUNDED
@given(envelopes)
def test_every_valid_envelope_round_trips(envelope: UpdateEnvelope) -> None:
    raw = encode(envelope)
    assert decode(raw) == envelope
    # The signature covers the same canonical bytes on both ends.
    assert decode(raw).signing_payload() == envelope.signing_payload()  # type: ignore[union-attr]


@BOUNDED
@given(st.binary(max_size=2000))
def test_random_bytes_decode_or_raise_schema_error(raw: bytes) -> None:
    decodes_or_refuses(raw)


@BOUNDED
@given(json_values)
def test_arbitrary_json_documents_decode_or_raise_schema_error(document: Any) -> None:
    decodes_or_refuses(json.dumps(document).encode())


@BOUNDED
@given(st.sampled_from(sorted(SCHEMA_REGISTRY)), st.dictionaries(st.text(max_size=20), json_values, max_size=8))
def test_documents_naming_a_known_schema_decode_or_raise_schema_error(
    schema: tuple[str, int], fields: dict[str, Any]
) -> None:
    decodes_or_refuses(json.dumps({**fields, "schema": schema[0], "schema_version": schema[1]}).encode())


# A mutation of a valid envelope's JSON: (path of keys, what to do there, the new value).
mutations = st.tuples(
    st.lists(st.sampled_from(["payload", "adapter", "routed_tokens", "metrics", "target_modules", "0"]), max_size=2),
    st.sampled_from(["drop", "set", "add"]),
    st.sampled_from(
        [
            "schema",
            "schema_version",
            "update_id",
            "client_id",
            "base_version",
            "round_id",
            "examples",
            "routed_tokens",
            "metrics",
            "payload",
            "adapter",
            "created_at",
            "signature",
            "uri",
            "sha256",
            "size_bytes",
            "rank",
            "alpha",
            "target_modules",
            "0.1",
            "extra",
        ]
    ),
    json_values
    | st.sampled_from([10**30, -(2**63), 2**64, 1e308, -0.0, "\u0000", "a\u0000b", "\ud800", "", " ", "0.1", 2])
    | st.integers(1, 60).map(lambda depth: json.loads("[" * depth + "]" * depth)),
)


def mutate(document: dict[str, Any], path: list[str], action: str, key: str, value: Any) -> None:
    target: Any = document
    for step in path:
        if isinstance(target, dict) and step in target:
            target = target[step]
        elif isinstance(target, list) and step.isdigit() and int(step) < len(target):
            target = target[int(step)]
    if isinstance(target, dict):
        if action == "drop":
            target.pop(key, None)
        else:
            target[key if action == "set" else f"{key}_x"] = value
    elif isinstance(target, list) and target:
        target[0] = value


@BOUNDED
@given(envelopes, st.lists(mutations, min_size=1, max_size=4))
def test_mutated_envelopes_decode_or_raise_schema_error(
    envelope: UpdateEnvelope, steps: list[tuple[list[str], str, str, Any]]
) -> None:
    document = json.loads(encode(envelope))
    for path, action, key, value in steps:
        mutate(document, path, action, key, value)
    decodes_or_refuses(json.dumps(document).encode())


@BOUNDED
@given(envelopes, st.data())
def test_damaged_envelope_bytes_decode_or_raise_schema_error(envelope: UpdateEnvelope, data: st.DataObject) -> None:
    raw = bytearray(encode(envelope))
    cut = data.draw(st.integers(0, len(raw)), label="truncate at")
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), max_size=6), label="flips")
    for position, byte in flips:
        raw[position] = byte
    decodes_or_refuses(bytes(raw[:cut]) if data.draw(st.booleans(), label="truncate") else bytes(raw))


def test_deep_nesting_and_huge_numbers_are_schema_errors() -> None:
    """The inputs that break naive decoders, named: they are refusals, with what was wrong."""
    base = json.loads(
        encode(
            UpdateEnvelope.model_validate(
                {
                    "update_id": str(uuid.uuid4()),
                    "client_id": "car-1",
                    "base_version": "v1",
                    "examples": 1,
                    "routed_tokens": {"0.1": 1},
                    "payload": {"uri": "artifacts://u", "sha256": "0" * 64, "size_bytes": 1},
                    "adapter": {"rank": 1, "alpha": 1.0, "target_modules": ["w1"]},
                    "created_at": datetime(2026, 1, 1, tzinfo=UTC).isoformat(),
                },
                strict=False,
            )
        )
    )
    compact = json.dumps(base, separators=(",", ":")).encode()
    cases = {
        b"[" * 100_000 + b"]" * 100_000: "nested too deeply",
        compact[:-1] + b',"extra":' + b"[" * 5000 + b"]" * 5000 + b"}": "nested too deeply",
        compact.replace(b'"examples":1,', b'"examples":' + b"9" * 5000 + b","): "malformed JSON",
        json.dumps({**base, "examples": MAX_COUNT + 1}).encode(): "field 'examples'",
        json.dumps({**base, "examples": 10**30}).encode(): "field 'examples'",
        json.dumps({**base, "schema_version": 2}).encode(): "unknown version 2",
        json.dumps({**base, "client_id": "car\u00001"}).encode(): "field 'client_id'",
        compact.replace(b'"v1"', b'"v\\u0000"'): "field 'base_version'",
        compact + b"\xff": "not UTF-8",
    }
    for raw, fragment in cases.items():
        with pytest.raises(SchemaError, match=re.escape(fragment)):
            decode(raw)
