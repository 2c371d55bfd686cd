"""OpenTelemetry traces for every process of the federation (control plane, workers, relay, edge client): one
setup per process, W3C trace context carried in bus message headers, HTTP headers and task rows, and the few spans
our own code opens (bus publish and process, jobs, approvals).

Framework-free: the edge client uses it without Django. Only the OpenTelemetry API and SDK are needed; the OTLP
exporter is imported only when an endpoint is configured. See docs/operations/observability.md.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import fields, is_dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanContext, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    # The SDK is imported by `configure_tracing` only: the library core (the bus) needs the API alone, which makes
    # no-op spans until a process installs a provider.
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

# The service name of each kind of process (the `service.name` resource attribute every span carries).
CONTROLPLANE_WEB = "controlplane-web"
WORKER_INGEST = "worker-ingest"
WORKER_CELERY = "worker-celery"
RELAY = "relay"
EDGE_CLIENT = "edge-client"
SERVICE_NAMES = (CONTROLPLANE_WEB, WORKER_INGEST, WORKER_CELERY, RELAY, EDGE_CLIENT)

TRACER_NAME = "fednested"
# The only headers read back from a message or a row: W3C trace context. Anything else a sender adds is ignored.
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
# A version-00 traceparent is 55 characters; later versions may append fields, so allow some room but no more. W3C
# caps tracestate at 32 members; 512 characters is the size its propagation guidance asks to keep.
MAX_TRACEPARENT_CHARS = 128
MAX_TRACESTATE_CHARS = 512
TRACEPARENT_PATTERN = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-[\x21-\x7e]*)?$")
# Where spans go when no other endpoint is configured: standard OpenTelemetry variables, read by the exporter itself.
OTLP_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")

_PROPAGATOR = TraceContextTextMapPropagator()
_setup_lock = threading.Lock()
_configured: TracerProvider | None = None
_service = ""

R = TypeVar("R")


class TracingSetupError(ValueError):
    """The tracing configuration cannot work: a malformed endpoint, or the exporter package is missing."""


def tracer() -> trace.Tracer:
    """The tracer of our own spans (instrumentation libraries bring theirs)."""
    return trace.get_tracer(TRACER_NAME)


def otlp_endpoint_from_environment(environ: Mapping[str, str] | None = None) -> str | None:
    """The OTLP endpoint the standard variables name, or None when none is set (nothing is then exported)."""
    environ = os.environ if environ is None else environ
    for name in OTLP_ENDPOINT_VARIABLES:
        value = environ.get(name, "").strip()
        if value:
            return value
    return None


def check_endpoint(endpoint: str, *, setting: str) -> str:
    """`endpoint` if it is an http(s) URL with a host; TracingSetupError naming `setting` otherwise."""
    parts = urlsplit(endpoint)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise TracingSetupError(
            f"{setting}={endpoint!r} is not an OTLP/HTTP endpoint: use http(s)://host:port (the collector's 4318 port)"
        )
    return endpoint


def configure_tracing(
    service_name: str,
    *,
    endpoint: str | None = None,
    exporter: SpanExporter | None = None,
    environ: Mapping[str, str] | None = None,
) -> TracerProvider:
    """Install this process's tracer provider, once: spans carry `service_name`; they are exported by OTLP/HTTP to
    `endpoint` (the base URL; `/v1/traces` is appended), else to the endpoint the standard OTEL_EXPORTER_OTLP_*
    variables name, else to `exporter` if given, else nowhere.

    Spans are made even when nothing exports them: the trace ids they give still tie log lines together. Later calls
    return the provider already installed (a test may install its own first, with an in-memory exporter).
    """
    global _configured, _service
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if service_name not in SERVICE_NAMES:
        raise TracingSetupError(f"unknown service name {service_name!r}: use one of {', '.join(SERVICE_NAMES)}")
    with _setup_lock:
        installed = trace.get_tracer_provider()
        if isinstance(installed, TracerProvider):
            return installed
        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        span_exporter = _otlp_exporter(endpoint, environ) or exporter
        if span_exporter is not None:
            # Batched, in a thread of the SDK: a slow or absent collector never slows the request or the consumer.
            provider.add_span_processor(BatchSpanProcessor(span_exporter))
        trace.set_tracer_provider(provider)
        _configured = provider
        _service = service_name
        return provider


def _otlp_exporter(endpoint: str | None, environ: Mapping[str, str] | None) -> SpanExporter | None:
    environ = os.environ if environ is None else environ
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    from_environment = otlp_endpoint_from_environment(environ)
    if endpoint:
        check_endpoint(endpoint, setting="FEDNESTED_OTLP_ENDPOINT")
    elif from_environment:
        check_endpoint(from_environment, setting="OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT")
    else:
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as error:
        raise TracingSetupError(
            "an OTLP endpoint is configured but the exporter is not installed: "
            "pip install opentelemetry-exporter-otlp-proto-http (pinned in requirements/controlplane.txt)"
        ) from error
    if endpoint:
        return OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")
    # The exporter reads the standard variables itself (the traces one verbatim, the general one + /v1/traces).
    return OTLPSpanExporter()


def configured_service() -> str:
    """The service name `configure_tracing` installed in this process ("" before it ran, or when a test did)."""
    return _service


def shutdown_tracing() -> None:
    """Flush and stop the provider `configure_tracing` installed (a process about to exit); no-op otherwise."""
    if _configured is not None:
        _configured.shutdown()


# --- carrying context ------------------------------------------------------------------------------------------------


def inject_headers(context: Context | None = None) -> list[tuple[str, str]]:
    """The W3C trace-context headers of `context` (default: the current one); empty when no span is active."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=context)
    return sorted(carrier.items())


def current_traceparent() -> str:
    """The traceparent of the current span (to store on a row), or "" when no span is active."""
    return dict(inject_headers()).get(TRACEPARENT, "")


def trace_headers_of(headers: Iterable[tuple[str, str | bytes | None]]) -> dict[str, str]:
    """The trace-context headers among `headers`, bounded: anything too long, not text, or malformed is dropped, so
    a sender's headers can at worst leave a message without a parent, never stop its consumer."""
    found: dict[str, str] = {}
    for name, raw in headers:
        key = name.lower() if isinstance(name, str) else ""
        if key not in {TRACEPARENT, TRACESTATE} or key in found or raw is None:
            continue
        limit = MAX_TRACEPARENT_CHARS if key == TRACEPARENT else MAX_TRACESTATE_CHARS
        if len(raw) > limit:
            continue
        try:
            value = raw.decode("ascii") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError:
            continue
        if key == TRACEPARENT and not TRACEPARENT_PATTERN.fullmatch(value):
            continue
        found[key] = value
    if TRACEPARENT not in found:
        return {}
    return found


def extract_context(headers: Iterable[tuple[str, str | bytes | None]]) -> Context:
    """The context a message's or request's headers carry (an empty one when they carry none)."""
    carrier = trace_headers_of(headers)
    return _PROPAGATOR.extract(carrier, context=Context()) if carrier else Context()


def span_context_of(traceparent: str) -> SpanContext | None:
    """The span a stored traceparent names, or None when it is empty or unusable."""
    span_context = trace.get_current_span(extract_context([(TRACEPARENT, traceparent)])).get_span_context()
    return span_context if span_context.is_valid else None


def carry_context(job: Callable[[], R]) -> Callable[[], R]:
    """`job`, made to run in the current trace context wherever it is called (another thread of this process)."""
    captured = otel_context.get_current()

    @functools.wraps(job)
    def in_context() -> R:
        token = otel_context.attach(captured)
        try:
            return job()
        finally:
            otel_context.detach(token)

    return in_context


# --- spans of our own ------------------------------------------------------------------------------------------------


@contextmanager
def publish_span(system: str, destination: str, key: str) -> Iterator[list[tuple[str, str]]]:
    """A PRODUCER span around one bus write; yields the headers to send with the record, which make the span the
    parent of whatever processes it."""
    with tracer().start_as_current_span(
        f"publish {destination}",
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": system,
            "messaging.operation.type": "send",
            "messaging.destination.name": destination,
            "messaging.kafka.message.key": key,
        },
    ):
        yield inject_headers()


class DeliveredMessage(Protocol):
    """What a consumer span needs of a bus message (fednested.messaging.bus.Message)."""

    @property
    def partition(self) -> int: ...

    @property
    def offset(self) -> int: ...

    @property
    def key(self) -> str: ...

    @property
    def headers(self) -> Sequence[tuple[str, str]]: ...


# Fields of an outcome (a dataclass) that become attributes of its message's span, when present and set.
OUTCOME_ATTRIBUTES = ("status", "update_id", "client_id", "round_id", "code", "aggregation_task_pk")


class BatchTrace:
    """The spans of one batch of consumed messages: `traceparents[i]` is message i's own span, to store with what
    the message becomes; `record(outcomes)` notes each message's outcome on its span."""

    def __init__(self, spans: Sequence[Span]) -> None:
        self._spans = spans
        self.traceparents = [
            dict(inject_headers(trace.set_span_in_context(span))).get(TRACEPARENT, "") for span in spans
        ]

    def record(self, outcomes: Sequence[object]) -> None:
        for span, outcome in zip(self._spans, outcomes, strict=True):
            for name, value in outcome_attributes(outcome).items():
                span.set_attribute(f"fednested.{name}", value)


@contextmanager
def traced_batch(
    system: str, group: str, destination: str, messages: Sequence[DeliveredMessage]
) -> Iterator[BatchTrace]:
    """Spans for processing a batch of bus messages in one go (one transaction, one offset commit).

    Each message gets a CONSUMER span whose parent is its publisher's span (from the record's headers), so each
    device's trace goes on into its ingestion; the batch itself is one CONSUMER span, current while the batch is
    processed, that links to every message span (OpenTelemetry's convention for batch processing: one operation,
    many parents). With a single message the device is also bound in the log context.

    Manual spans rather than confluent-kafka's instrumentation: our consumers read through `Bus` (Kafka and the
    embedded SQLite bus alike) and process decoded `Message`s after `consume` returned, which is where a process span
    belongs; the instrumentation wraps librdkafka's own Consumer and would miss the embedded bus.
    """
    from fednested.observability.logs import log_context

    common: dict[str, str | int] = {
        "messaging.system": system,
        "messaging.operation.type": "process",
        "messaging.destination.name": destination,
        "messaging.consumer.group.name": group,
    }
    spans = [
        tracer().start_span(
            f"process {destination}",
            context=extract_context(message.headers),
            kind=SpanKind.CONSUMER,
            attributes={
                **common,
                "messaging.destination.partition.id": str(message.partition),
                "messaging.kafka.offset": message.offset,
                "messaging.kafka.message.key": message.key,
            },
        )
        for message in messages
    ]
    batch = BatchTrace(spans)
    links = [Link(span.get_span_context()) for span in spans]
    client_id = messages[0].key if len(messages) == 1 and messages[0].key else None
    try:
        with (
            tracer().start_as_current_span(
                f"process {destination} batch",
                kind=SpanKind.CONSUMER,
                links=links,
                attributes={**common, "messaging.batch.message_count": len(messages)},
            ),
            log_context(client_id=client_id),
        ):
            yield batch
    finally:
        for span in spans:
            span.end()


def outcome_attributes(result: object) -> dict[str, str | int]:
    """The OUTCOME_ATTRIBUTES of a dataclass result that are set, as span attribute values."""
    if not is_dataclass(result) or isinstance(result, type):
        return {}
    found: dict[str, str | int] = {}
    names = {field.name for field in fields(result)}
    for name in OUTCOME_ATTRIBUTES:
        value = getattr(result, name) if name in names else None
        if isinstance(value, bool) or value is None:
            continue
        found[name] = value if isinstance(value, int) else str(value)
    return found


@contextmanager
def resumed_span(
    name: str,
    *,
    traceparent: str,
    links: Iterable[str] = (),
    attributes: Mapping[str, str | int] | None = None,
    log_round_id: str | None = None,
) -> Iterator[Span]:
    """A span that continues the trace a row recorded (`traceparent`: what started a job, what produced a version).

    When the current span is of that same trace (Celery's instrumentation already continued it from the message
    headers), the new span is simply its child. When the current span belongs to another trace (the officer's HTTP
    request, a relay's publish), the new span joins the recorded trace and links to the current span, so both
    stay reachable. Without a recorded context it is a child of the current span. `links` adds the recorded
    contexts of related work (the K updates an aggregation combines). `log_round_id` names the round in log lines
    within the span.
    """
    from fednested.observability.logs import log_context

    recorded = span_context_of(traceparent) if traceparent else None
    current = trace.get_current_span().get_span_context()
    span_links = [Link(span_context) for span_context in map(span_context_of, links) if span_context is not None]
    parent: Context | None = None
    if recorded is not None and not (current.is_valid and current.trace_id == recorded.trace_id):
        parent = trace.set_span_in_context(trace.NonRecordingSpan(recorded), Context())
        if current.is_valid:
            span_links.append(Link(current, {"fednested.link": "caller"}))
    with (
        tracer().start_as_current_span(name, context=parent, links=span_links, attributes=attributes) as span,
        log_context(round_id=log_round_id),
    ):
        yield span


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) of the current span as 32 and 16 hex digits, or None when no span is active."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    return f"{span_context.trace_id:032x}", f"{span_context.span_id:016x}"
