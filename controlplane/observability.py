"""Tracing set-up of the control plane's processes, and the request-id middleware that names each request in its
log lines, its trace and its response (docs/operations/observability.md).

`setup_tracing` is called once per process, where the process starts: controlplane/asgi.py and wsgi.py (the web
server), workers/ingest/__main__.py, workers/relay/__main__.py, and the Celery worker's `worker_init` signal
(controlplane/celery.py).
"""

import re
import uuid
from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponseBase
from opentelemetry import trace

from fednested.observability.logs import log_context
from fednested.observability.tracing import configure_tracing

REQUEST_ID_HEADER = "X-Request-ID"
# What a caller's request id may be (a UUID, a proxy's hex id, ...): anything else is replaced, never logged.
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def setup_tracing(service: str, *, django: bool = False, celery: bool = False) -> None:
    """Install this process's tracer provider (exporting to FEDNESTED_OTLP_ENDPOINT or the OTEL_EXPORTER_OTLP_*
    variables, else nowhere) and the instrumentations it needs: Django's (a SERVER span per request, continuing a
    caller's `traceparent`) for the web server, Celery's (a span per task run, continuing the trace context of the
    message headers) for the Celery worker.

    Django's must run before the first request builds the middleware chain: it inserts its middleware there.
    """
    configure_tracing(service, endpoint=settings.FEDNESTED_OTLP_ENDPOINT or None)
    if django:
        from opentelemetry.instrumentation.django import DjangoInstrumentor

        instrumentor = DjangoInstrumentor()
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument()
    if celery:
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        celery_instrumentor = CeleryInstrumentor()  # type: ignore[no-untyped-call]
        if not celery_instrumentor.is_instrumented_by_opentelemetry:
            celery_instrumentor.instrument()


def request_id_of(request: HttpRequest) -> str:
    """The caller's X-Request-ID when it is a well-formed id, else a new one: a hostile header can neither flood
    the logs nor forge a line."""
    offered = request.headers.get(REQUEST_ID_HEADER, "")
    return offered if REQUEST_ID_PATTERN.fullmatch(offered) else uuid.uuid4().hex


class RequestIdMiddleware:
    """Names each request: its id is bound for the log lines written while it is handled, set on its trace span,
    and returned in the response's X-Request-ID header (so a user reporting a problem can quote it)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        request_id = request_id_of(request)
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attribute("fednested.request_id", request_id)
        with log_context(request_id=request_id):
            response = self.get_response(request)
        response[REQUEST_ID_HEADER] = request_id
        return response
