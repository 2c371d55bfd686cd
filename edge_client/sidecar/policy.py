"""The sidecar's static local policy: which endpoints, metadata fields and tensors may leave the device, and how
much. Read once from a YAML/JSON file the device owner controls; nothing the control plane sends can widen it."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_client.errors import EdgeClientError

POLICY_FORMAT_VERSION = 1
_DEFAULT_PORTS = {"http": 80, "https": 443}


class PolicyError(EdgeClientError):
    """The policy file is missing, unreadable or invalid; the message names the file, the field and the problem."""

    def __init__(self, path: Path | None, problem: str, *, field: str | None = None) -> None:
        self.path = path
        self.field = field
        self.problem = problem
        where = str(path) if path is not None else "<policy>"
        if field:
            where += f": field '{field}'"
        super().__init__(f"sidecar policy {where}: {problem}")


@dataclass(frozen=True)
class EndpointRule:
    """One allowed HTTP endpoint: exact scheme, host and port, and the path prefixes under it."""

    scheme: str
    host: str
    port: int
    path_prefixes: tuple[str, ...]

    def allows(self, url: str) -> bool:
        parts = urlsplit(url)
        if parts.scheme != self.scheme or (parts.hostname or "").lower() != self.host:
            return False
        port = parts.port if parts.port is not None else _DEFAULT_PORTS.get(parts.scheme)
        if port != self.port:
            return False
        # Dot segments are refused outright, encoded or not: "/api/v1/../admin" must not pass a "/api/v1/" prefix.
        # Encoded or back slashes are refused too: a normalising proxy may turn "..%2fadmin" into "../admin".
        lowered = parts.path.lower()
        if "\\" in parts.path or "%2f" in lowered or "%5c" in lowered:
            return False
        if any(unquote(segment) in {".", ".."} for segment in parts.path.split("/")):
            return False
        return any(parts.path.startswith(prefix) for prefix in self.path_prefixes)


@dataclass(frozen=True)
class SidecarPolicy:
    """The compiled policy. Field patterns use `*` as the only wildcard (matching any run of characters, dots
    included); tensor patterns are regular expressions that must match the whole tensor name."""

    endpoints: tuple[EndpointRule, ...]
    topics: frozenset[str]
    bus_servers: frozenset[str]
    metadata_fields: tuple[str, ...]
    tensor_patterns: tuple[re.Pattern[str], ...]
    tensor_dtypes: frozenset[str]
    max_payload_bytes: int
    max_tensors: int
    max_text_chars: int
    local_only_paths: tuple[Path, ...]
    source: Path | None = None

    def endpoint_allowed(self, url: str) -> bool:
        return any(rule.allows(url) for rule in self.endpoints)

    def metadata_field_allowed(self, field_path: str) -> bool:
        return any(_field_pattern(pattern).fullmatch(field_path) for pattern in self.metadata_fields)

    def tensor_name_allowed(self, name: str) -> bool:
        return any(pattern.fullmatch(name) for pattern in self.tensor_patterns)

    def is_local_only(self, path: Path) -> bool:
        resolved = path.resolve()
        return any(resolved == root or root in resolved.parents for root in self.local_only_paths)

    def with_local_only(self, *paths: Path) -> SidecarPolicy:
        """The same policy with more local-only paths (the client always adds its audit log and state secrets)."""
        extra = tuple(p.resolve() for p in paths if p.resolve() not in self.local_only_paths)
        return replace(self, local_only_paths=self.local_only_paths + extra)


def _field_pattern(pattern: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")))


class _EndpointEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    url: str = Field(description="scheme://host[:port]/path-prefix; the port defaults to the scheme's")


class _PolicyFile(BaseModel):
    """The on-disk schema; unknown keys are errors, so a typo cannot silently drop a restriction."""

    model_config = ConfigDict(extra="forbid", strict=True)
    policy_version: int
    endpoints: list[_EndpointEntry]
    topics: list[str] = Field(default_factory=list)
    bus_servers: list[str] = Field(default_factory=list)
    metadata_fields: list[str]
    tensor_patterns: list[str]
    tensor_dtypes: list[str] = Field(default_factory=lambda: ["F32", "BF16", "F16"])
    max_payload_bytes: int = Field(gt=0)
    max_tensors: int = Field(gt=0)
    max_text_chars: int = Field(default=128, ge=0)
    local_only_paths: list[str] = Field(default_factory=list)


def _compile_endpoint(url: str, field: str, source: Path | None) -> EndpointRule:
    parts = urlsplit(url)
    if parts.scheme not in _DEFAULT_PORTS:
        raise PolicyError(source, f"scheme must be http or https, got {parts.scheme!r} in {url!r}", field=field)
    if not parts.hostname:
        raise PolicyError(source, f"no host in {url!r}", field=field)
    if parts.query or parts.fragment or parts.username or parts.password:
        raise PolicyError(source, f"only scheme, host, port and path are allowed in {url!r}", field=field)
    prefix = parts.path or "/"
    if not prefix.startswith("/"):
        raise PolicyError(source, f"path must start with '/' in {url!r}", field=field)
    port = parts.port if parts.port is not None else _DEFAULT_PORTS[parts.scheme]
    return EndpointRule(scheme=parts.scheme, host=parts.hostname.lower(), port=port, path_prefixes=(prefix,))


def compile_policy(raw: Any, *, source: Path | None = None) -> SidecarPolicy:
    """Validate a parsed policy document and compile it; errors name the field and the problem."""
    try:
        parsed = _PolicyFile.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise PolicyError(source, f"{first['msg']} ({len(exc.errors())} problem(s) in all)", field=field) from exc
    if parsed.policy_version != POLICY_FORMAT_VERSION:
        raise PolicyError(
            source,
            f"unsupported policy_version {parsed.policy_version}; this client reads version {POLICY_FORMAT_VERSION}",
            field="policy_version",
        )
    patterns: list[re.Pattern[str]] = []
    for index, text in enumerate(parsed.tensor_patterns):
        try:
            patterns.append(re.compile(text))
        except re.error as exc:
            raise PolicyError(
                source, f"invalid regular expression {text!r}: {exc}", field=f"tensor_patterns.{index}"
            ) from None
    for index, server in enumerate(parsed.bus_servers):
        host, _, port = server.rpartition(":")
        if not host or not port.isdigit():
            raise PolicyError(source, f"expected host:port, got {server!r}", field=f"bus_servers.{index}")
    endpoints = tuple(
        _compile_endpoint(entry.url, f"endpoints.{index}.url", source) for index, entry in enumerate(parsed.endpoints)
    )
    return SidecarPolicy(
        endpoints=endpoints,
        topics=frozenset(parsed.topics),
        bus_servers=frozenset(server.lower() for server in parsed.bus_servers),
        metadata_fields=tuple(parsed.metadata_fields),
        tensor_patterns=tuple(patterns),
        tensor_dtypes=frozenset(parsed.tensor_dtypes),
        max_payload_bytes=parsed.max_payload_bytes,
        max_tensors=parsed.max_tensors,
        max_text_chars=parsed.max_text_chars,
        local_only_paths=tuple(Path(p).resolve() for p in parsed.local_only_paths),
        source=source,
    )


def load_policy(path: str | Path) -> SidecarPolicy:
    """Read and compile a policy file (YAML, which also reads JSON)."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(source, "file not found; the client never runs without a local policy") from None
    except OSError as exc:
        raise PolicyError(source, f"cannot read: {exc.strerror}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        raise PolicyError(source, f"{line}not valid YAML/JSON ({getattr(exc, 'problem', exc)})") from exc
    if not isinstance(raw, dict):
        raise PolicyError(source, f"expected a mapping at the top level, got {type(raw).__name__}")
    return compile_policy(raw, source=source)


# Envelope and telemetry fields the control plane needs, and nothing else. Names only: values are checked
# separately (numbers, short identifiers), so a free-text field cannot ride along under an allowed name.
DEFAULT_METADATA_FIELDS: tuple[str, ...] = (
    "schema",
    "schema_version",
    "token",
    "client_id",
    # enrollment and renewal: a CSR holds the device's public key and its client id only (checked as such)
    "csr",
    "display_name",
    "current_version",
    "update_id",
    "base_version",
    "round_id",
    "examples",
    "tokens",
    "routed_tokens.*",
    "metrics.*",
    "payload.uri",
    "payload.sha256",
    "payload.size_bytes",
    "adapter.rank",
    "adapter.alpha",
    "adapter.target_modules[]",
    "created_at",
    "signature",
    "loss",
    "steps",
    "duration_s",
    "outcome",
    "dp_noised",
    # Telemetry v2: the per-domain breakdown (domain names, losses and token counts; values checked like the rest)
    "domains[].domain",
    "domains[].loss",
    "domains[].tokens",
    "started_at",
    "finished_at",
    "sent_at",
    # safetensors header of the payload file, as fednested.checkpoints.save_update writes it
    "payload_metadata.format",
    "payload_metadata.fednested.partition",
)

# fednested.adapters' wire names: "<base param name>/expert=<e>/lora_A|lora_B". A base weight's name has no
# "/expert=" segment, so no base tensor can pass under this pattern.
DEFAULT_TENSOR_PATTERNS: tuple[str, ...] = (r"[A-Za-z0-9_.]+/expert=[0-9]+/lora_[AB]",)


def example_policy(
    control_plane_url: str,
    *,
    local_only_paths: tuple[str, ...] = (),
    bus_servers: tuple[str, ...] = (),
    max_payload_bytes: int = 64 * 1024 * 1024,
    max_tensors: int = 4096,
) -> dict[str, Any]:
    """A policy document allowing exactly the device protocol's endpoints under `control_plane_url` (for
    `init`-style tooling, the demo and tests; a real device owner writes and reviews their own)."""
    base = control_plane_url.rstrip("/")
    return {
        "policy_version": POLICY_FORMAT_VERSION,
        "endpoints": [{"url": f"{base}/api/v1/"}],
        "topics": ["updates.experts.local", "telemetry.edge"],
        "bus_servers": list(bus_servers),
        "metadata_fields": list(DEFAULT_METADATA_FIELDS),
        "tensor_patterns": list(DEFAULT_TENSOR_PATTERNS),
        "tensor_dtypes": ["F32", "BF16", "F16"],
        "max_payload_bytes": max_payload_bytes,
        "max_tensors": max_tensors,
        "max_text_chars": 128,
        "local_only_paths": list(local_only_paths),
    }
