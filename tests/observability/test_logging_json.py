"""Log lines as JSON with the trace, request, device and round they are about; the request id a caller sends is
used when well formed and replaced otherwise; text stays the bare message."""

import io
import json
import logging
import logging.config
from collections.abc import Iterator
from typing import Any

import pytest
from django.http import HttpRequest, HttpResponse
from django.test import Client, RequestFactory
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from controlplane.observability import REQUEST_ID_HEADER, RequestIdMiddleware
from fednested.observability.logs import log_context, logging_config
from fednested.observability.tracing import tracer


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The root logger configured as the settings configure it (JSON), writing into a buffer."""
    stream = io.StringIO()
    config = logging_config("json", level="INFO", service="worker-ingest")
    config["handlers"]["console"]["stream"] = stream
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    logging.config.dictConfig(config)
    try:
        yield stream
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_json_line_names_its_trace_request_device_and_round(
    captured: io.StringIO, spans: InMemorySpanExporter
) -> None:
    log = logging.getLogger("fednested.test")
    with tracer().start_as_current_span("ingest") as span, log_context(client_id="car-1", round_id="round-7"):
        with log_context(request_id="req-1"):
            log.info("update %s buffered", "u-1")
        log.warning("no request here")
    log.error("outside", exc_info=ValueError("bad value"))
    first, second, third = lines(captured)
    context = span.get_span_context()
    assert first == {
        "time": first["time"],
        "level": "INFO",
        "logger": "fednested.test",
        "message": "update u-1 buffered",
        "service": "worker-ingest",
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "request_id": "req-1",
        "client_id": "car-1",
        "round_id": "round-7",
    }
    assert first["time"].endswith("+00:00")
    assert "request_id" not in second
    assert second["round_id"] == "round-7"
    # Outside every context: no ids at all, and the exception's traceback in one field of the same line.
    assert not {"trace_id", "span_id", "request_id", "client_id", "round_id"} & set(third)
    assert third["exception"].endswith("ValueError: bad value")


def test_text_is_the_bare_message() -> None:
    config = logging_config("text", level="INFO")
    assert config["formatters"]["main"] == {"format": "%(message)s"}
    with pytest.raises(ValueError, match="log format 'xml'"):
        logging_config("xml", level="INFO")  # type: ignore[arg-type]


@pytest.mark.django_db
def test_requests_get_an_id_that_their_log_lines_and_response_carry(captured: io.StringIO) -> None:
    client = Client()
    kept = client.get("/api/v1/no-such-thing/", headers={REQUEST_ID_HEADER: "proxy-42.a:b"})
    assert kept[REQUEST_ID_HEADER] == "proxy-42.a:b"
    # Too long, or characters that could forge a line: replaced by a fresh id, never echoed.
    for offered in ("x" * 200, 'a"b', "id\nforged", ""):
        response = client.get("/api/v1/no-such-thing/", headers={REQUEST_ID_HEADER: offered} if offered else {})
        replacement = response[REQUEST_ID_HEADER]
        assert replacement != offered
        assert len(replacement) == 32
        assert int(replacement, 16) >= 0

    # A line logged while the request is handled names it (the middleware binds the id around the view).
    def view(request: HttpRequest) -> HttpResponse:
        logging.getLogger("apps.test").info("handling %s", request.path)
        return HttpResponse("ok")

    response = RequestIdMiddleware(view)(RequestFactory().get("/x", headers={REQUEST_ID_HEADER: "req-abc"}))
    assert response[REQUEST_ID_HEADER] == "req-abc"
    [line] = [line for line in lines(captured) if line["logger"] == "apps.test"]
    assert (line["message"], line["request_id"]) == ("handling /x", "req-abc")
