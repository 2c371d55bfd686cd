"""Wire schemas of every event on the bus, their (schema, version) registry, and JSON encode/decode.

Every event names its schema and version on the wire and is validated strictly on both ends; `decode` turns any
problem into a `SchemaError` that says what was wrong and where, so consumers can record the rejection and move on.
"""

from __future__ import annotations

import json
from typing import Annotated, ClassVar, Literal, Self, TypeAlias
from uuid import UUID

from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    ValidationError,
    model_validator,
)

from fednested.identity.keys import sign, verify

# A client id is the CN of the device certificate, so it stays within what a CN and a Kafka principal can hold.
# The patterns are public so the control plane checks the same alphabet it accepts on the wire.
CLIENT_ID_REGEX = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
SHA256_HEX_REGEX = r"^[0-9a-f]{64}$"
ClientId = Annotated[str, StringConstraints(pattern=CLIENT_ID_REGEX)]
# Printable only: no whitespace and no control characters (a NUL cannot even be stored in PostgreSQL's jsonb).
Identifier = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\s\x00-\x1f\x7f]+$")]
# Artifact and payload locations (s3://, file://, https://): no whitespace, bounded so a message stays small.
Uri = Annotated[str, StringConstraints(min_length=1, max_length=2048, pattern=r"^\S+$")]
Sha256Hex = Annotated[str, StringConstraints(pattern=SHA256_HEX_REGEX)]
# "layer.expert", e.g. "3.7": the partition map's name for expert 7 of MoE layer 3.
ExpertKey = Annotated[str, StringConstraints(pattern=r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)$")]
NonNegativeInt = Annotated[int, Field(ge=0)]
# Counts a device reports (examples, routed tokens): bounded so that no claim overflows a database column or turns
# into an infinite weight; 2^31 - 1 is far above what one local run on an edge device can process.
MAX_COUNT = 2**31 - 1
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
# "<scheme>:<base64url>", today "ecdsa-p256-sha256:…" by the device's own key (fednested.identity.keys); another
# scheme can be added without a schema change.
Signature = Annotated[str, StringConstraints(pattern=r"^$|^[a-z0-9-]+:[A-Za-z0-9+/=_-]+$", max_length=1024)]

TaskKind: TypeAlias = Literal["core_update", "expert_aggregation", "evaluation"]
TrainingOutcome: TypeAlias = Literal["succeeded", "failed", "cancelled"]


class SchemaError(ValueError):
    """A payload that is not a valid event: malformed JSON, unknown schema or version, or invalid fields.

    `problems` holds one line per problem ("field 'payload.sha256': ..."); `schema_name` and `schema_version` are
    set when the payload got far enough to name them.
    """

    def __init__(
        self,
        summary: str,
        *,
        problems: tuple[str, ...] = (),
        schema_name: str | None = None,
        schema_version: int | None = None,
    ) -> None:
        self.summary = summary
        self.problems = problems
        self.schema_name = schema_name
        self.schema_version = schema_version
        super().__init__(summary if not problems else f"{summary}: " + "; ".join(problems))


class EventModel(BaseModel):
    """Base of every wire event: strict types, no unknown fields, immutable once built."""

    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        frozen=True,
        validate_by_alias=True,
        validate_by_name=False,
        serialize_by_alias=True,
    )
    SCHEMA: ClassVar[str]
    SCHEMA_VERSION: ClassVar[int]


class RoundStart(EventModel):
    """The control plane opens a federation round on `base_version`; updates are due by `deadline`."""

    SCHEMA: ClassVar[str] = "RoundStart"
    SCHEMA_VERSION: ClassVar[int] = 1
    schema_name: Literal["RoundStart"] = Field(default="RoundStart", alias="schema")
    schema_version: Literal[1] = 1
    round_id: Identifier
    base_version: Identifier
    deadline: AwareDatetime
    config: dict[str, JsonValue] = Field(default_factory=dict)
    started_at: AwareDatetime
    # The control plane's outbox row id: the relay may publish one row twice (it died between the broker's ack and
    # marking the row sent), and consumers drop the second copy by this id. Optional: events written before the
    # outbox carry none.
    event_id: UUID | None = None


class ModelAvailable(EventModel):
    """A model version was promoted (alias moved): devices may pull it from `artifact_uri` and check the manifest."""

    SCHEMA: ClassVar[str] = "ModelAvailable"
    SCHEMA_VERSION: ClassVar[int] = 1
    schema_name: Literal["ModelAvailable"] = Field(default="ModelAvailable", alias="schema")
    schema_version: Literal[1] = 1
    version_id: Identifier
    alias: Identifier
    manifest_sha256: Sha256Hex
    artifact_uri: Uri
    published_at: AwareDatetime
    # As RoundStart.event_id: the outbox row's id, by which devices drop a republished copy.
    event_id: UUID | None = None


class ConfigChange(EventModel):
    """A federation setting changed (e.g. round cadence, clipping bound); `settings` holds only the changed keys."""

    SCHEMA: ClassVar[str] = "ConfigChange"
    SCHEMA_VERSION: ClassVar[int] = 1
    schema_name: Literal["ConfigChange"] = Field(default="ConfigChange", alias="schema")
    schema_version: Literal[1] = 1
    change_id: Identifier
    settings: dict[str, JsonValue]
    reason: str = ""
    effective_at: AwareDatetime


class PayloadRef(EventModel):
    """Claim check for an adapter delta kept in the artifact store, verified by sha256 on download."""

    uri: Uri
    sha256: Sha256Hex
    size_bytes: Annotated[int, Field(gt=0)]


class AdapterSummary(EventModel):
    """The LoRA configuration the delta was trained with, so the aggregator can check shapes before downloading."""

    rank: Annotated[int, Field(gt=0)]
    alpha: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    target_modules: list[Identifier] = Field(min_length=1)


class UpdateEnvelope(EventModel):
    """One edge update: who trained what on which base version, and where the adapter delta lies.

    `update_id` is the idempotency key: the aggregator applies an envelope at most once. `signature` covers
    `signing_payload()`, i.e. every other field.
    """

    SCHEMA: ClassVar[str] = "UpdateEnvelope"
    SCHEMA_VERSION: ClassVar[int] = 1
    schema_name: Literal["UpdateEnvelope"] = Field(default="UpdateEnvelope", alias="schema")
    schema_version: Literal[1] = 1
    update_id: UUID
    client_id: ClientId
    base_version: Identifier
    round_id: Identifier | None = None
    examples: Count
    routed_tokens: dict[ExpertKey, Count] = Field(max_length=65_536)
    metrics: dict[Identifier, FiniteFloat] = Field(default_factory=dict)
    payload: PayloadRef
    adapter: AdapterSummary
    created_at: AwareDatetime
    signature: Signature = ""

    def signing_payload(self) -> bytes:
        """Canonical bytes that the signature covers: every field but `signature`, as sorted compact JSON.

        Sender and receiver compute it from the validated model, so the encoding of the wire JSON does not matter.
        """
        fields = self.model_dump(mode="json", exclude={"signature"})
        body = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return f"fednested:{self.SCHEMA}:v{self.SCHEMA_VERSION}\n".encode() + body.encode()

    def signed(self, key: ec.EllipticCurvePrivateKey) -> Self:
        """A copy signed with the device's private key (`ecdsa-p256-sha256:…`); the key never leaves the device."""
        return self.model_copy(update={"signature": sign(key, self.signing_payload())})

    def verify(self, public_key: ec.EllipticCurvePublicKey) -> bool:
        """True when the envelope carries a valid signature by the private key of `public_key`."""
        return verify(public_key, self.signing_payload(), self.signature)


class Telemetry(EventModel):
    """Outcome of one local training run on a device; `loss` may carry DP noise (then `dp_noised` is true)."""

    SCHEMA: ClassVar[str] = "Telemetry"
    SCHEMA_VERSION: ClassVar[int] = 1
    schema_name: Literal["Telemetry"] = Field(default="Telemetry", alias="schema")
    schema_version: Literal[1] = 1
    client_id: ClientId
    base_version: Identifier | None = None
    round_id: Identifier | None = None
    loss: FiniteFloat | None
    steps: NonNegativeInt
    duration_s: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    outcome: TrainingOutcome
    dp_noised: bool = False
    started_at: AwareDatetime
    finished_at: AwareDatetime

    @model_validator(mode="after")
    def _finished_after_start(self) -> Self:
        if self.finished_at < self.started_at:
            raise ValueError(f"finished_at {self.finished_at.isoformat()} is before started_at")
        return self


# Domain names as the control plane stores them (EdgeDevice.domain, held-out `<domain>.jsonl` files): short, no path
# separators, so a name can never point outside the held-out folder.
DOMAIN_REGEX = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
DomainName = Annotated[str, StringConstraints(pattern=DOMAIN_REGEX)]
# Per-domain entries one report may carry: a device trains on a few domains, and the bound keeps a report small.
MAX_TELEMETRY_DOMAINS = 64


class DomainTelemetry(EventModel):
    """One domain's share of a local run: its loss (None when not measured, or left out under DP) and its tokens."""

    domain: DomainName
    loss: FiniteFloat | None = None
    tokens: Count


class TelemetryV2(EventModel):
    """Telemetry v1 plus the tokens of the run and a per-domain breakdown, for the data engine (docs/data-engine.md).

    `base_version` (the version trained on) is required. `domains` may be empty: the control plane then attributes
    the whole report to the device's enrolled domain. Under DP (`dp_noised`) a per-domain loss is either noised like
    `loss` or left out (None): a report never carries a clean per-domain loss beside a noised total.
    """

    SCHEMA: ClassVar[str] = "Telemetry"
    SCHEMA_VERSION: ClassVar[int] = 2
    schema_name: Literal["Telemetry"] = Field(default="Telemetry", alias="schema")
    schema_version: Literal[2] = 2
    client_id: ClientId
    base_version: Identifier
    round_id: Identifier | None = None
    loss: FiniteFloat | None
    steps: NonNegativeInt
    tokens: Count
    duration_s: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    outcome: TrainingOutcome
    dp_noised: bool = False
    domains: list[DomainTelemetry] = Field(default_factory=list, max_length=MAX_TELEMETRY_DOMAINS)
    started_at: AwareDatetime
    finished_at: AwareDatetime

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.finished_at < self.started_at:
            raise ValueError(f"finished_at {self.finished_at.isoformat()} is before started_at")
        names = [entry.domain for entry in self.domains]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"domains {repeated} are listed more than once")
        return self


class TrainingTask(EventModel):
    """A job for the Tier-1 workers; `params` is kind-specific and validated by the worker that runs it."""

    SCHEMA: ClassVar[str] = "TrainingTask"
    SCHEMA_VERSION: ClassVar[int] = 1
    schema_name: Literal["TrainingTask"] = Field(default="TrainingTask", alias="schema")
    schema_version: Literal[1] = 1
    task_id: Identifier
    kind: TaskKind
    params: dict[str, JsonValue] = Field(default_factory=dict)
    created_at: AwareDatetime


Event: TypeAlias = RoundStart | ModelAvailable | ConfigChange | UpdateEnvelope | Telemetry | TelemetryV2 | TrainingTask

EVENT_TYPES: tuple[type[Event], ...] = (
    RoundStart,
    ModelAvailable,
    ConfigChange,
    UpdateEnvelope,
    Telemetry,
    TelemetryV2,
    TrainingTask,
)
# (schema, version) → model. A new version is a new class registered here; old ones stay readable.
SCHEMA_REGISTRY: dict[tuple[str, int], type[Event]] = {
    (model.SCHEMA, model.SCHEMA_VERSION): model for model in EVENT_TYPES
}


def encode(event: Event) -> bytes:
    """The event as compact UTF-8 JSON, with its `schema` and `schema_version`; revalidated first.

    Revalidation catches models built with `model_construct` or mutated through `object.__setattr__`.
    """
    raw = event.model_dump_json().encode()
    decode(raw)
    return raw


def decode(raw: bytes) -> Event:
    """Parse and validate one event; raises `SchemaError` naming the problem (JSON position, schema, fields)."""
    try:
        document = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise SchemaError(f"payload is not UTF-8 (byte {error.start}: {error.reason})") from None
    except json.JSONDecodeError as error:
        raise SchemaError(
            f"malformed JSON at line {error.lineno} column {error.colno} (char {error.pos}): {error.msg}"
        ) from None
    except RecursionError:
        raise SchemaError("malformed JSON: nested too deeply") from None
    except ValueError as error:
        # e.g. an integer literal with more digits than Python converts (sys.set_int_max_str_digits).
        raise SchemaError(f"malformed JSON: {str(error)[:200]}") from None
    if not isinstance(document, dict):
        raise SchemaError(f"payload must be a JSON object, got {type(document).__name__}")
    name = document.get("schema")
    version = document.get("schema_version")
    if not isinstance(name, str):
        raise SchemaError("field 'schema' is missing or not a string")
    if not isinstance(version, int) or isinstance(version, bool):
        raise SchemaError("field 'schema_version' is missing or not an integer", schema_name=name)
    model = SCHEMA_REGISTRY.get((name, version))
    if model is None:
        known_versions = sorted(v for (n, v) in SCHEMA_REGISTRY if n == name)
        if not known_versions:
            known = ", ".join(sorted({n for (n, _) in SCHEMA_REGISTRY}))
            raise SchemaError(f"unknown schema {name!r} (known: {known})", schema_name=name, schema_version=version)
        raise SchemaError(
            f"unknown version {version} of schema {name!r} (known versions: {', '.join(map(str, known_versions))})",
            schema_name=name,
            schema_version=version,
        )
    try:
        return model.model_validate_json(raw)
    except ValidationError as error:
        raise SchemaError(
            f"invalid {name} v{version}",
            problems=describe_validation_error(error),
            schema_name=name,
            schema_version=version,
        ) from None


def describe_validation_error(error: ValidationError) -> tuple[str, ...]:
    """One line per pydantic error: the dotted field path and the problem, with the offending value when short."""
    lines = []
    for item in error.errors(include_url=False):
        path = ".".join(str(part) for part in item["loc"]) or "(payload)"
        problem = {"missing": "required field is missing", "extra_forbidden": "unknown field"}.get(
            item["type"], item["msg"]
        )
        value = item.get("input")
        shown = "" if item["type"] in {"missing", "extra_forbidden"} or _too_long(value) else f" (got {value!r})"
        lines.append(f"field {path!r}: {problem}{shown}")
    return tuple(lines)


def _too_long(value: object) -> bool:
    return isinstance(value, dict | list) or len(repr(value)) > 80
