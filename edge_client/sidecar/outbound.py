"""The sidecar's outbound filter: every byte the client sends (HTTP bodies, payload files, bus events) is checked
here against the local policy first, and every decision, allowed or refused, is written to the local audit log."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from edge_client.errors import EdgeClientError
from edge_client.sidecar.audit import AuditLog, canonical_json
from edge_client.sidecar.pii import MetadataScrubber
from edge_client.sidecar.policy import SidecarPolicy
from fednested.identity.keys import IdentityError, load_csr

# safetensors dtype codes, so a policy speaks the file format's names whatever produced the tensors.
_TORCH_TO_SAFETENSORS = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_SAFETENSORS_HEADER_LIMIT = 100 * 1024 * 1024
# Bytes per element of each safetensors dtype: a tensor's byte span must be exactly its shape's worth, or bytes
# could leave the device under a tensor that declares fewer.
_SAFETENSORS_ITEMSIZE = {
    name: torch.empty((), dtype=dtype).element_size() for dtype, name in _TORCH_TO_SAFETENSORS.items()
}


@dataclass(frozen=True)
class TensorInfo:
    """What the sidecar needs to know about a tensor: never its values."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class OutboundRequest:
    """One thing about to leave the device.

    `destination` is an http(s) URL, `kafka://host:port[,host:port]/<topic>` or `embedded:<topic>` (the on-device
    bus used by the demo). `body` is the exact payload file (safetensors) when there is one; `tensors` may be
    given instead, or as well, in which case both must describe the same tensors."""

    kind: str
    destination: str
    metadata: Mapping[str, Any] = field(default_factory=dict)
    body: bytes | None = None
    tensors: Mapping[str, torch.Tensor] | None = None
    body_source: Path | None = None


@dataclass(frozen=True)
class OutboundApproval:
    """Proof that a request passed: transports send only what an approval covers (same destination, same bytes)."""

    kind: str
    destination: str
    metadata: dict[str, Any]
    body_sha256: str | None
    total_bytes: int
    tensor_names: tuple[str, ...]
    audit_seq: int

    def covers(self, destination: str, *, body: bytes | None = None, metadata: Mapping[str, Any] | None = None) -> bool:
        if destination != self.destination:
            return False
        if body is not None and hashlib.sha256(body).hexdigest() != self.body_sha256:
            return False
        return metadata is None or canonical_json(dict(metadata)) == canonical_json(self.metadata)


class OutboundRefused(EdgeClientError):
    """The sidecar refused a payload; `subject` names the offending field, tensor or destination."""

    def __init__(self, kind: str, destination: str, subject: str, reason: str, *, more: int = 0) -> None:
        self.kind = kind
        self.destination = destination
        self.subject = subject
        self.reason = reason
        suffix = f" (and {more} more problem(s), see the local audit log)" if more else ""
        super().__init__(f"sidecar refused {kind} to {destination}: {subject}: {reason}{suffix}")


class PayloadFormatError(ValueError):
    """The payload body is not a well-formed safetensors file."""


def safetensors_header(body: bytes) -> tuple[list[TensorInfo], dict[str, str]]:
    """Parse a safetensors file's header without loading tensors, and check that its data section holds exactly
    the declared tensors: trailing or unaccounted bytes could carry anything, so they make the file malformed."""
    if len(body) < 8:
        raise PayloadFormatError(f"{len(body)} bytes is too short for a safetensors file")
    (header_length,) = struct.unpack("<Q", body[:8])
    if header_length > min(_SAFETENSORS_HEADER_LIMIT, len(body) - 8):
        raise PayloadFormatError(f"header length {header_length} exceeds the file ({len(body)} bytes)")
    try:
        header = json.loads(body[8 : 8 + header_length])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PayloadFormatError(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise PayloadFormatError("header is not a JSON object")
    raw_metadata = header.pop("__metadata__", None) or {}
    if not isinstance(raw_metadata, dict) or not all(isinstance(v, str) for v in raw_metadata.values()):
        raise PayloadFormatError("__metadata__ must map strings to strings")
    tensors: list[TensorInfo] = []
    spans: list[tuple[int, int]] = []
    for name, spec in header.items():
        if not isinstance(spec, dict) or not {"dtype", "shape", "data_offsets"} <= set(spec):
            raise PayloadFormatError(f"tensor {name!r}: expected dtype, shape and data_offsets")
        offsets, shape, dtype = spec["data_offsets"], spec["shape"], spec["dtype"]
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(v) for v in offsets)):
            raise PayloadFormatError(f"tensor {name!r}: bad data_offsets {offsets!r} (expected [start, end])")
        start, end = offsets
        if start > end:
            raise PayloadFormatError(f"tensor {name!r}: data_offsets {offsets} end before they start")
        if not (isinstance(shape, list) and all(_is_count(v) for v in shape)):
            raise PayloadFormatError(f"tensor {name!r}: bad shape {shape!r} (expected a list of non-negative ints)")
        if dtype not in _SAFETENSORS_ITEMSIZE:
            raise PayloadFormatError(f"tensor {name!r}: unknown dtype {dtype!r}")
        expected = math.prod(shape) * _SAFETENSORS_ITEMSIZE[dtype]
        if end - start != expected:
            raise PayloadFormatError(
                f"tensor {name!r}: {end - start} data bytes for a {dtype} tensor of shape {shape} ({expected} expected)"
            )
        spans.append((start, end))
        tensors.append(TensorInfo(name=name, dtype=dtype, shape=tuple(shape), nbytes=end - start))
    data_length = len(body) - 8 - header_length
    covered = 0
    for start, end in sorted(spans):
        if start != covered:
            raise PayloadFormatError(f"data section has a gap or overlap at byte {start} (expected {covered})")
        covered = end
    if covered != data_length:
        raise PayloadFormatError(f"data section is {data_length} bytes but the tensors account for {covered}")
    return tensors, {str(k): v for k, v in raw_metadata.items()}


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def tensor_infos(tensors: Mapping[str, torch.Tensor]) -> list[TensorInfo]:
    return [
        TensorInfo(
            name=name,
            dtype=_TORCH_TO_SAFETENSORS.get(tensor.dtype, str(tensor.dtype)),
            shape=tuple(tensor.shape),
            nbytes=tensor.numel() * tensor.element_size(),
        )
        for name, tensor in tensors.items()
    ]


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Dotted paths to leaves; list items share their list's path plus "[]" so a policy names them once."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _flatten(item, f"{prefix}[]")
    else:
        yield prefix, value


def _destination_problem(policy: SidecarPolicy, destination: str) -> str | None:
    parts = urlsplit(destination)
    if parts.scheme in {"http", "https"}:
        return None if policy.endpoint_allowed(destination) else "endpoint is not in the policy's allowed endpoints"
    if parts.scheme == "kafka":
        servers = {server.strip().lower() for server in parts.netloc.split(",") if server.strip()}
        topic = parts.path.lstrip("/")
        if not servers or not servers <= policy.bus_servers:
            return f"bus servers {sorted(servers)} are not in the policy's bus_servers"
        return None if topic in policy.topics else f"topic {topic!r} is not in the policy's topics"
    if parts.scheme == "embedded":
        topic = parts.path
        return None if topic in policy.topics else f"topic {topic!r} is not in the policy's topics"
    return f"unknown destination scheme {parts.scheme!r} (expected http, https, kafka or embedded)"


def _csr_problem(value: Any) -> str | None:
    """A CSR is long text, so it passes only as what it must be: a valid CSR whose subject is one CN and which asks
    for no extensions — the device's public key and client id, nothing that could carry data."""
    if not isinstance(value, str):
        return "must be a PEM certificate signing request"
    try:
        csr = load_csr(value)
    except IdentityError as exc:
        return str(exc)
    if len(csr.subject) != 1 or len(csr.extensions) != 0:
        return "a CSR may hold only the client id (one subject CN) and no extensions"
    return None


def _metadata_problems(policy: SidecarPolicy, metadata: Mapping[str, Any]) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    local_only = [str(path) for path in policy.local_only_paths]
    for path, value in _flatten(metadata):
        if not policy.metadata_field_allowed(path):
            problems.append((f"field {path!r}", "not an allow-listed metadata field"))
        elif path == "csr":
            problem = _csr_problem(value)
            if problem:
                problems.append((f"field {path!r}", problem))
        elif isinstance(value, bytes | bytearray):
            problems.append((f"field {path!r}", "binary values never leave the device in metadata"))
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append((f"field {path!r}", "non-finite number"))
        elif isinstance(value, str):
            if len(value) > policy.max_text_chars:
                problems.append(
                    (
                        f"field {path!r}",
                        f"{len(value)} characters of text exceeds max_text_chars={policy.max_text_chars} "
                        "(raw text never leaves the device)",
                    )
                )
            elif any(root in value for root in local_only):
                problems.append((f"field {path!r}", "names a local-only path"))
        elif value is not None and not isinstance(value, bool | int | float):
            problems.append((f"field {path!r}", f"unsupported value type {type(value).__name__}"))
    return problems


def _tensor_problems(policy: SidecarPolicy, tensors: list[TensorInfo]) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    if len(tensors) > policy.max_tensors:
        problems.append(("tensors", f"{len(tensors)} tensors exceeds max_tensors={policy.max_tensors}"))
    for info in tensors:
        if not policy.tensor_name_allowed(info.name):
            problems.append((f"tensor {info.name!r}", "not an adapter tensor allowed by tensor_patterns"))
        elif info.dtype not in policy.tensor_dtypes:
            problems.append((f"tensor {info.name!r}", f"dtype {info.dtype} is not in tensor_dtypes"))
    return problems


def _tensors_disagree(from_body: list[TensorInfo], given: list[TensorInfo]) -> str | None:
    body_shapes = {info.name: (info.dtype, info.shape) for info in from_body}
    given_shapes = {info.name: (info.dtype, info.shape) for info in given}
    if body_shapes == given_shapes:
        return None
    differing = sorted(set(body_shapes) ^ set(given_shapes)) or sorted(
        name for name in body_shapes if body_shapes[name] != given_shapes[name]
    )
    return f"payload file and tensor dict differ at {differing[:3]}"


def check_outbound(
    policy: SidecarPolicy,
    request: OutboundRequest,
    *,
    audit: AuditLog,
    scrubber: MetadataScrubber | None = None,
) -> OutboundApproval:
    """Let `request` out only if the policy allows its destination, every metadata field, every tensor and its
    size; otherwise raise OutboundRefused naming the first offending field or tensor. Either way the decision is
    appended to the audit log (names and sizes, never values) before this returns."""
    metadata = dict(request.metadata)
    scrubbed = False
    if scrubber is not None:
        cleaned = scrubber(request.kind, metadata)
        scrubbed = cleaned != metadata
        metadata = cleaned
    problems: list[tuple[str, str]] = []
    destination_problem = _destination_problem(policy, request.destination)
    if destination_problem:
        problems.append((f"destination {request.destination!r}", destination_problem))
    if request.body_source is not None and policy.is_local_only(request.body_source):
        problems.append((f"file {request.body_source}", "is under a local-only path and never leaves the device"))
    problems += _metadata_problems(policy, metadata)

    infos: list[TensorInfo] = []
    if request.body is not None:
        try:
            infos, file_metadata = safetensors_header(request.body)
        except PayloadFormatError as exc:
            problems.append(("payload", f"not a well-formed safetensors file: {exc}"))
        else:
            problems += _metadata_problems(policy, {"payload_metadata": file_metadata})
            if request.tensors is not None:
                disagreement = _tensors_disagree(infos, tensor_infos(request.tensors))
                if disagreement:
                    problems.append(("payload", disagreement))
    elif request.tensors is not None:
        infos = tensor_infos(request.tensors)
    problems += _tensor_problems(policy, infos)

    metadata_bytes = len(canonical_json(metadata)) if metadata else 0
    body_bytes = len(request.body) if request.body is not None else sum(info.nbytes for info in infos)
    total_bytes = metadata_bytes + body_bytes
    if total_bytes > policy.max_payload_bytes:
        problems.append(("payload", f"{total_bytes} bytes exceeds max_payload_bytes={policy.max_payload_bytes}"))

    body_sha256 = hashlib.sha256(request.body).hexdigest() if request.body is not None else None
    details: dict[str, Any] = {
        "kind": request.kind,
        "destination": request.destination,
        "bytes": total_bytes,
        "tensor_count": len(infos),
        "tensor_names": [info.name for info in infos],
        "metadata_fields": sorted(path for path, _ in _flatten(metadata)),
        "body_sha256": body_sha256,
        "scrubbed": scrubbed,
    }
    if problems:
        details["problems"] = [f"{subject}: {reason}" for subject, reason in problems]
        audit.append("outbound.refused", details)
        subject, reason = problems[0]
        raise OutboundRefused(request.kind, request.destination, subject, reason, more=len(problems) - 1)
    entry = audit.append("outbound.allowed", details)
    return OutboundApproval(
        kind=request.kind,
        destination=request.destination,
        metadata=metadata,
        body_sha256=body_sha256,
        total_bytes=total_bytes,
        tensor_names=tuple(info.name for info in infos),
        audit_seq=entry.seq,
    )


@dataclass
class Sidecar:
    """The policy, the audit log and the optional scrubber a client carries around; transports call `check`."""

    policy: SidecarPolicy
    audit: AuditLog
    scrubber: MetadataScrubber | None = None

    def check(self, request: OutboundRequest) -> OutboundApproval:
        return check_outbound(self.policy, request, audit=self.audit, scrubber=self.scrubber)

    def record(self, action: str, details: dict[str, Any]) -> None:
        """Record a local event (enrollment, version change, training run) in the device's audit log."""
        self.audit.append(action, details)
