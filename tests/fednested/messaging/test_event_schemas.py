"""Wire schemas: strict validation, the (schema, version) registry, decode errors, and envelope signing."""

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fednested.identity.keys import generate_private_key
from fednested.messaging import (
    SCHEMA_REGISTRY,
    AdapterSummary,
    ConfigChange,
    ModelAvailable,
    PayloadRef,
    RoundStart,
    SchemaError,
    Telemetry,
    TrainingTask,
    UpdateEnvelope,
    decode,
    encode,
)

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def make_envelope(**overrides: Any) -> UpdateEnvelope:
    fields: dict[str, Any] = {
        "update_id": uuid.UUID("0b7c6f1e-2f55-4e9a-9d38-5d2f3c1a7e10"),
        "client_id": "edge-0001",
        "base_version": "v3",
        "round_id": "r-12",
        "examples": 128,
        "routed_tokens": {"0.0": 900, "1.3": 1200},
        "metrics": {"loss": 1.25, "accuracy": 0.5},
        "payload": PayloadRef(uri="s3://deltas/edge-0001/u.safetensors", sha256="0f" * 32, size_bytes=65536),
        "adapter": AdapterSummary(rank=8, alpha=16.0, target_modules=["w1", "w2", "w3"]),
        "created_at": NOW,
    }
    return UpdateEnvelope(**{**fields, **overrides})


def envelope_json(**changes: Any) -> bytes:
    document = json.loads(encode(make_envelope()))
    for key, value in changes.items():
        if value is ...:
            del document[key]
        else:
            document[key] = value
    return json.dumps(document).encode()


ALL_EVENTS = [
    RoundStart(round_id="r-1", base_version="v3", deadline=NOW + timedelta(hours=2), config={"k": 4}, started_at=NOW),
    ModelAvailable(
        version_id="v4", alias="champion", manifest_sha256="a1" * 32, artifact_uri="s3://m/v4", published_at=NOW
    ),
    ConfigChange(change_id="c-1", settings={"clip_norm": 1.5}, reason="tighter clipping", effective_at=NOW),
    make_envelope(),
    Telemetry(
        client_id="edge-0001",
        loss=0.75,
        steps=40,
        duration_s=31.5,
        outcome="succeeded",
        dp_noised=True,
        started_at=NOW,
        finished_at=NOW + timedelta(seconds=31.5),
    ),
    TrainingTask(task_id="t-9", kind="evaluation", params={"domains": ["law", "med"]}, created_at=NOW),
]


@pytest.mark.parametrize("event", ALL_EVENTS, ids=lambda event: event.SCHEMA)
def test_every_event_round_trips_and_names_its_schema(event: Any) -> None:
    raw = encode(event)
    document = json.loads(raw)
    assert document["schema"] == event.SCHEMA
    assert document["schema_version"] == 1
    assert decode(raw) == event
    assert encode(decode(raw)) == raw


def test_registry_maps_each_schema_and_version_to_its_model() -> None:
    assert {name: model for (name, version), model in SCHEMA_REGISTRY.items() if version == 1} == {
        "RoundStart": RoundStart,
        "ModelAvailable": ModelAvailable,
        "ConfigChange": ConfigChange,
        "UpdateEnvelope": UpdateEnvelope,
        "Telemetry": Telemetry,
        "TrainingTask": TrainingTask,
    }


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"schema": "Telemetry",\n "x": }', "malformed JSON at line 2 column 7 (char 30): Expecting value"),
        (b"\xff\xfe{}", "payload is not UTF-8 (byte 0: invalid start byte)"),
        (b"[1, 2]", "payload must be a JSON object, got list"),
        (b'{"schema_version": 1}', "field 'schema' is missing or not a string"),
        (b'{"schema": "Telemetry", "schema_version": "1"}', "field 'schema_version' is missing or not an integer"),
        (b'{"schema": "Gossip", "schema_version": 1}', "unknown schema 'Gossip' (known: ConfigChange, ModelAvailable"),
        (
            b'{"schema": "Telemetry", "schema_version": 99}',
            "unknown version 99 of schema 'Telemetry' (known versions: 1, 2)",
        ),
    ],
)
def test_decode_says_what_is_wrong_with_the_payload(raw: bytes, message: str) -> None:
    with pytest.raises(SchemaError) as caught:
        decode(raw)
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"payload": ...}, "field 'payload': required field is missing"),
        ({"client_id": ...}, "field 'client_id': required field is missing"),
        ({"gradients": [0.1, 0.2]}, "field 'gradients': unknown field"),
        ({"examples": "128"}, "field 'examples': Input should be a valid integer (got '128')"),
        ({"examples": True}, "field 'examples': Input should be a valid integer (got True)"),
        ({"examples": -1}, "field 'examples': Input should be greater than or equal to 0 (got -1)"),
        ({"update_id": "not-a-uuid"}, "field 'update_id': Input should be a valid UUID"),
        ({"created_at": "2025-06-01T12:00:00"}, "field 'created_at': Input should have timezone info"),
        ({"routed_tokens": {"expert-3": 5}}, "field 'routed_tokens.expert-3.[key]': String should match pattern"),
        ({"metrics": {"loss": "low"}}, "field 'metrics.loss': Input should be a valid number (got 'low')"),
        ({"client_id": "edge 1"}, "field 'client_id': String should match pattern"),
        ({"signature": "no scheme"}, "field 'signature': String should match pattern"),
    ],
)
def test_decode_names_every_invalid_field(changes: dict[str, Any], problem: str) -> None:
    with pytest.raises(SchemaError) as caught:
        decode(envelope_json(**changes))
    error = caught.value
    assert error.schema_name == "UpdateEnvelope"
    assert error.schema_version == 1
    assert error.summary == "invalid UpdateEnvelope v1"
    assert any(line.startswith(problem) for line in error.problems), error.problems


def test_nested_fields_and_non_finite_numbers_are_rejected() -> None:
    document = json.loads(encode(make_envelope()))
    document["payload"]["sha256"] = "0F" * 32
    document["metrics"]["loss"] = float("nan")
    with pytest.raises(SchemaError) as caught:
        decode(json.dumps(document).encode())
    assert any(line.startswith("field 'payload.sha256': String should match pattern") for line in caught.value.problems)
    assert any(
        line.startswith("field 'metrics.loss': Input should be a finite number") for line in caught.value.problems
    )


def test_telemetry_cannot_finish_before_it_started() -> None:
    with pytest.raises(ValueError, match="finished_at 2025-06-01T11:59:00\\+00:00 is before started_at"):
        Telemetry(
            client_id="edge-1",
            loss=None,
            steps=0,
            duration_s=0.0,
            outcome="failed",
            started_at=NOW,
            finished_at=NOW - timedelta(minutes=1),
        )


def test_training_task_kind_is_one_of_the_three() -> None:
    raw = json.dumps(
        {
            "schema": "TrainingTask",
            "schema_version": 1,
            "task_id": "t",
            "kind": "mine_bitcoin",
            "created_at": "2025-06-01T12:00:00Z",
        }
    ).encode()
    with pytest.raises(
        SchemaError, match="field 'kind': Input should be 'core_update', 'expert_aggregation' or 'evaluation'"
    ):
        decode(raw)


def test_encode_revalidates_events_built_without_validation() -> None:
    forged = Telemetry.model_construct(**{**ALL_EVENTS[4].__dict__, "steps": -3})
    with pytest.raises(SchemaError, match="field 'steps'"):
        encode(forged)


def test_signing_payload_is_canonical_and_excludes_the_signature() -> None:
    envelope = make_envelope()
    payload = envelope.signing_payload()
    assert payload.startswith(b"fednested:UpdateEnvelope:v1\n")
    body = json.loads(payload.split(b"\n", 1)[1])
    assert "signature" not in body
    assert list(body) == sorted(body)
    # Re-encoding the wire JSON differently (key order, spacing) does not change what is signed.
    shuffled = json.dumps(dict(reversed(list(json.loads(encode(envelope)).items()))), indent=2).encode()
    assert decode(shuffled).signing_payload() == payload  # type: ignore[union-attr]
    assert envelope.signed(generate_private_key()).signing_payload() == payload


def test_device_key_signature_verifies_only_the_untampered_envelope_under_the_right_key() -> None:
    key = generate_private_key()
    signed = make_envelope().signed(key)
    assert signed.signature.startswith("ecdsa-p256-sha256:")
    # Deterministic (RFC 6979): a resend after a crash is byte for byte the same envelope.
    assert make_envelope().signed(key).signature == signed.signature
    received = decode(encode(signed))
    assert isinstance(received, UpdateEnvelope)
    assert received.verify(key.public_key())
    assert not received.verify(generate_private_key().public_key())
    assert not received.model_copy(update={"examples": 10_000}).verify(key.public_key())
    assert not make_envelope().verify(key.public_key())  # unsigned
    scheme, _, value = signed.signature.partition(":")
    for forged in (f"hmac-sha256:{value}", f"{scheme}:{value[:-4]}", f"{scheme}:{'A' * 200}", f"{scheme}:!!"):
        assert not received.model_copy(update={"signature": forged}).verify(key.public_key())
