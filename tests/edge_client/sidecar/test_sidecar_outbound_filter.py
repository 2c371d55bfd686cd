"""The outbound filter: only adapter tensors and allow-listed metadata leave, to allowed endpoints, within size
limits; every decision lands in the audit log (names and sizes, never values)."""

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from safetensors.torch import save

from edge_client.sidecar import (
    AuditLog,
    OutboundRefused,
    OutboundRequest,
    PolicyError,
    SidecarPolicy,
    check_outbound,
    compile_policy,
    example_policy,
    load_policy,
    safetensors_header,
    verify_chain,
)
from edge_client.sidecar.outbound import PayloadFormatError
from fednested.identity.keys import generate_private_key, make_csr

URL = "http://127.0.0.1:8000"
PAYLOAD_URL = f"{URL}/api/v1/updates/0b4f3c9e-1111-4222-8333-944455556666/payload/"
LORA_A = "model.layers.0.mlp.experts.gate_up_proj/expert=1/lora_A"
LORA_B = "model.layers.0.mlp.experts.gate_up_proj/expert=1/lora_B"


def _policy(**overrides: Any) -> SidecarPolicy:
    document = example_policy(URL, bus_servers=("127.0.0.1:9092",))
    document.update(overrides)
    return compile_policy(document)


def _adapters() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {LORA_A: torch.randn(4, 16, generator=generator), LORA_B: torch.zeros(32, 4)}


def _audit_entries(path: Path) -> list[dict[str, Any]]:
    verify_chain(path)
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_adapter_payload_is_allowed_and_audited(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    body = save(_adapters())
    approval = check_outbound(
        _policy(), OutboundRequest(kind="update.payload", destination=PAYLOAD_URL, body=body), audit=audit
    )
    assert approval.tensor_names == (LORA_A, LORA_B)
    assert approval.total_bytes == len(body)
    assert approval.covers(PAYLOAD_URL, body=body)
    assert not approval.covers(PAYLOAD_URL, body=body + b"x")
    [entry] = _audit_entries(tmp_path / "audit.jsonl")
    assert entry["action"] == "outbound.allowed"
    assert entry["details"]["tensor_names"] == [LORA_A, LORA_B]
    assert entry["details"]["bytes"] == len(body)
    assert entry["seq"] == approval.audit_seq


def test_extra_non_adapter_tensor_is_refused_by_name(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    tensors = _adapters() | {"model.layers.0.mlp.experts.down_proj": torch.zeros(4, 8, 8)}
    with pytest.raises(OutboundRefused) as caught:
        check_outbound(
            _policy(), OutboundRequest(kind="update.payload", destination=PAYLOAD_URL, body=save(tensors)), audit=audit
        )
    assert caught.value.subject == "tensor 'model.layers.0.mlp.experts.down_proj'"
    assert "not an adapter tensor" in caught.value.reason
    [entry] = _audit_entries(tmp_path / "audit.jsonl")
    assert entry["action"] == "outbound.refused"
    assert "model.layers.0.mlp.experts.down_proj" in entry["details"]["tensor_names"]


def test_base_weights_passed_as_a_tensor_dict_are_refused(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    base = {"model.embed_tokens.weight": torch.zeros(10, 4), "lm_head.weight": torch.zeros(10, 4)}
    with pytest.raises(OutboundRefused, match=r"tensor 'model.embed_tokens.weight'.*and 1 more"):
        check_outbound(
            _policy(), OutboundRequest(kind="update.payload", destination=PAYLOAD_URL, tensors=base), audit=audit
        )


def test_integer_tensors_are_refused_even_under_an_adapter_name(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    smuggled = {LORA_A: torch.arange(16, dtype=torch.int64).reshape(4, 4)}  # token ids dressed as an adapter
    with pytest.raises(OutboundRefused, match="dtype I64"):
        check_outbound(
            _policy(), OutboundRequest(kind="update.payload", destination=PAYLOAD_URL, body=save(smuggled)), audit=audit
        )


def test_raw_text_field_is_refused_and_its_value_never_logged(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    secret = "Patient Jane Doe, born 1970-01-01, diagnosed with"
    metadata = {"client_id": "edge-1", "text": secret}
    with pytest.raises(OutboundRefused) as caught:
        check_outbound(
            _policy(),
            OutboundRequest(kind="telemetry", destination="embedded:telemetry.edge", metadata=metadata),
            audit=audit,
        )
    assert caught.value.subject == "field 'text'"
    log_text = (tmp_path / "audit.jsonl").read_text()
    assert secret not in log_text
    assert '"text"' in log_text  # the field's name is recorded, its value is not


def test_long_text_in_an_allowed_field_is_refused(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    metadata = {"client_id": "edge-1", "metrics": {"note": "x" * 500}}
    with pytest.raises(OutboundRefused) as caught:
        check_outbound(
            _policy(),
            OutboundRequest(kind="telemetry", destination="embedded:telemetry.edge", metadata=metadata),
            audit=audit,
        )
    assert caught.value.subject == "field 'metrics.note'"
    assert "raw text never leaves the device" in caught.value.reason


def test_oversized_payload_and_too_many_tensors_are_refused(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    body = save(_adapters())
    with pytest.raises(OutboundRefused, match="exceeds max_payload_bytes=100"):
        check_outbound(
            _policy(max_payload_bytes=100),
            OutboundRequest(kind="update.payload", destination=PAYLOAD_URL, body=body),
            audit=audit,
        )
    with pytest.raises(OutboundRefused, match="2 tensors exceeds max_tensors=1"):
        check_outbound(
            _policy(max_tensors=1),
            OutboundRequest(kind="update.payload", destination=PAYLOAD_URL, body=body),
            audit=audit,
        )


@pytest.mark.parametrize(
    "destination",
    [
        "http://evil.example:8000/api/v1/updates/x/payload/",
        "http://127.0.0.1:8001/api/v1/enroll/",
        "https://127.0.0.1:8000/api/v1/enroll/",
        "http://127.0.0.1:8000/admin/",
        "http://127.0.0.1:8000/api/v1/../admin/",
        "http://127.0.0.1:8000/api/v1/%2e%2e/admin/",
        "http://127.0.0.1:8000/api/v1/..%2fadmin/",
        "http://127.0.0.1:8000/api/v1/..%2Fadmin/",
        "http://127.0.0.1:8000/api/v1/x/..%5c..%5cadmin/",
        "http://127.0.0.1:8000/api/v1/x/..\\..\\admin/",
        "kafka://10.0.0.9:9092/updates.experts.local",
        "kafka://127.0.0.1:9092/tasks.training",
        "embedded:control.federation_rounds",
        "ftp://127.0.0.1/api/v1/",
    ],
)
def test_destinations_outside_the_policy_are_refused(tmp_path: Path, destination: str) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    with pytest.raises(OutboundRefused) as caught:
        check_outbound(_policy(), OutboundRequest(kind="probe", destination=destination), audit=audit)
    assert caught.value.subject == f"destination {destination!r}"


def test_allowed_bus_destinations(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    for destination in ("kafka://127.0.0.1:9092/updates.experts.local", "embedded:telemetry.edge"):
        check_outbound(_policy(), OutboundRequest(kind="probe", destination=destination), audit=audit)
    assert [entry["action"] for entry in _audit_entries(tmp_path / "audit.jsonl")] == ["outbound.allowed"] * 2


def test_local_only_files_and_paths_never_leave(tmp_path: Path) -> None:
    audit_path = tmp_path / "audit" / "audit.jsonl"
    audit = AuditLog(audit_path)
    audit.append("device.enrolled", {"client_id": "edge-1"})
    policy = _policy().with_local_only(audit_path.parent)
    with pytest.raises(OutboundRefused, match="local-only path"):
        check_outbound(
            policy,
            OutboundRequest(
                kind="update.payload", destination=PAYLOAD_URL, body=audit_path.read_bytes(), body_source=audit_path
            ),
            audit=audit,
        )
    with pytest.raises(OutboundRefused, match="names a local-only path"):
        check_outbound(
            policy,
            OutboundRequest(kind="probe", destination="embedded:telemetry.edge", metadata={"outcome": str(audit_path)}),
            audit=audit,
        )


def test_malformed_or_padded_safetensors_is_refused(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    body = save(_adapters())
    with pytest.raises(OutboundRefused, match="data section is"):
        check_outbound(
            _policy(),
            OutboundRequest(kind="update.payload", destination=PAYLOAD_URL, body=body + b"hidden text"),
            audit=audit,
        )
    with pytest.raises(OutboundRefused, match="not a well-formed safetensors"):
        check_outbound(
            _policy(), OutboundRequest(kind="update.payload", destination=PAYLOAD_URL, body=b"{}"), audit=audit
        )


def test_safetensors_header_metadata_is_checked_like_any_metadata(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    body = save(_adapters(), metadata={"notes": "free text the policy never allowed"})
    with pytest.raises(OutboundRefused, match=r"field 'payload_metadata\.notes'"):
        check_outbound(
            _policy(), OutboundRequest(kind="update.payload", destination=PAYLOAD_URL, body=body), audit=audit
        )


def test_tensor_dict_must_match_the_body(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    adapters = _adapters()
    body = save({LORA_A: adapters[LORA_A]})
    with pytest.raises(OutboundRefused, match="differ"):
        check_outbound(
            _policy(),
            OutboundRequest(kind="update.payload", destination=PAYLOAD_URL, body=body, tensors=adapters),
            audit=audit,
        )


def test_scrubber_hook_runs_before_the_checks(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")

    def drop_display_name(kind: str, metadata: Any) -> dict[str, Any]:
        return {key: value for key, value in metadata.items() if key != "display_name"}

    approval = check_outbound(
        _policy(),
        OutboundRequest(
            kind="enroll",
            destination=f"{URL}/api/v1/enroll/",
            metadata={"client_id": "e", "display_name": "Jane's car"},
        ),
        audit=audit,
        scrubber=drop_display_name,
    )
    assert approval.metadata == {"client_id": "e"}
    [entry] = _audit_entries(tmp_path / "audit.jsonl")
    assert entry["details"]["scrubbed"] is True


def test_safetensors_header_reads_names_without_tensors() -> None:
    infos, metadata = safetensors_header(save(_adapters(), metadata={"format": "pt"}))
    assert [(info.name, info.dtype, info.shape) for info in infos] == [
        (LORA_A, "F32", (4, 16)),
        (LORA_B, "F32", (32, 4)),
    ]
    assert metadata == {"format": "pt"}
    fake = struct.pack("<Q", 10**9) + b"{}"
    with pytest.raises(ValueError, match="exceeds the file"):
        safetensors_header(fake)


def test_policy_file_errors_name_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    with pytest.raises(PolicyError, match="file not found"):
        load_policy(path)
    path.write_text("endpoints: [\n")
    with pytest.raises(PolicyError, match=r"policy.yaml: line \d+: not valid YAML"):
        load_policy(path)
    document = example_policy(URL)
    document["max_payload_byte"] = 5
    path.write_text(json.dumps(document))
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert caught.value.field == "max_payload_byte"
    document = example_policy(URL)
    document["endpoints"] = [{"url": "ftp://host/"}]
    path.write_text(json.dumps(document))
    with pytest.raises(PolicyError, match=r"field 'endpoints.0.url'.*http or https"):
        load_policy(path)
    document = example_policy(URL)
    document["tensor_patterns"] = ["lora_[A"]
    path.write_text(json.dumps(document))
    with pytest.raises(PolicyError, match=r"tensor_patterns\.0"):
        load_policy(path)
    document = example_policy(URL)
    document["max_tensors"] = "many"
    path.write_text(json.dumps(document))
    with pytest.raises(PolicyError, match="field 'max_tensors'"):
        load_policy(path)


def test_policy_file_round_trip_yaml(tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(example_policy(URL, local_only_paths=(str(tmp_path / "audit"),))))
    policy = load_policy(path)
    assert policy.source == path
    assert policy.endpoint_allowed(f"{URL}/api/v1/enroll/")
    assert not policy.endpoint_allowed(f"{URL}/api/v2/enroll/")
    assert policy.is_local_only(tmp_path / "audit" / "audit.jsonl")
    assert policy.tensor_name_allowed(LORA_A)
    assert not policy.tensor_name_allowed("model.layers.0.mlp.gate.weight")


def _raw_safetensors(header: dict[str, Any], data: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


@pytest.mark.parametrize(
    ("spec", "data", "problem"),
    [
        ({"dtype": "F32", "shape": [2], "data_offsets": 8}, b"\0" * 8, "bad data_offsets"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]}, b"\0" * 8, "bad data_offsets"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [True, 8]}, b"\0" * 8, "bad data_offsets"),
        ({"dtype": "F32", "shape": 5, "data_offsets": [0, 8]}, b"\0" * 8, "bad shape"),
        ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, b"\0" * 8, "bad shape"),
        ({"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}, b"\0" * 8, "unknown dtype"),
        # A one-element tensor that spans 1000 bytes: the extra bytes would leave unaccounted for.
        ({"dtype": "F32", "shape": [1], "data_offsets": [0, 1000]}, b"\0" * 1000, "4 expected"),
    ],
)
def test_malformed_tensor_entries_are_format_errors_not_crashes(
    spec: dict[str, Any], data: bytes, problem: str
) -> None:
    with pytest.raises(PayloadFormatError, match=problem):
        safetensors_header(_raw_safetensors({"lora_A": spec}, data))


def test_a_csr_leaves_only_as_the_device_key_and_client_id(tmp_path: Path) -> None:
    """The CSR is long text, so the sidecar lets it out only as what it must be: one subject CN, no extensions."""
    audit = AuditLog(tmp_path / "audit.jsonl")
    key = generate_private_key()

    def enroll(csr: object) -> OutboundRequest:
        return OutboundRequest(
            kind="enroll", destination=f"{URL}/api/v1/enroll/", metadata={"client_id": "e", "csr": csr}
        )

    approval = check_outbound(_policy(), enroll(make_csr(key, "e").decode()), audit=audit)
    assert approval.metadata["csr"].startswith("-----BEGIN CERTIFICATE REQUEST-----")
    smuggling = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, "e"),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "patient Jane Doe, born 1970-01-01"),
                ]
            )
        )
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )
    with_extension = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "e")]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("jane-doe.example.org")]), critical=False)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )
    for csr, problem in (
        (smuggling, "only the client id"),
        (with_extension, "no extensions"),
        ("free text " * 40, "certificate signing request"),
        (12, "must be a PEM certificate signing request"),
    ):
        with pytest.raises(OutboundRefused, match=problem):
            check_outbound(_policy(), enroll(csr), audit=audit)
