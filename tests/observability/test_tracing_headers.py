"""Trace context on the bus: what a record's headers may carry (bounded, validated), how the embedded bus stores
them (and migrates a file written before it did), and how a recorded context is resumed."""

import sqlite3
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from fednested.messaging import EmbeddedBusSettings, Telemetry, Topic, TopicsConfig, encode, make_bus
from fednested.messaging.embedded import SCHEMA_VERSION, write_raw_record
from fednested.observability.tracing import (
    MAX_TRACESTATE_CHARS,
    current_traceparent,
    extract_context,
    resumed_span,
    trace_headers_of,
    tracer,
)

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def telemetry() -> Telemetry:
    return Telemetry.model_validate(
        {
            "schema": "Telemetry",
            "schema_version": 1,
            "client_id": "car-1",
            "loss": 1.0,
            "steps": 3,
            "duration_s": 0.5,
            "outcome": "succeeded",
            "started_at": "2026-01-01T00:00:00+00:00",
            "finished_at": "2026-01-01T00:00:01+00:00",
        },
        strict=False,
    )


def test_only_well_formed_trace_context_headers_are_read() -> None:
    assert trace_headers_of([("traceparent", TRACEPARENT.encode()), ("other", b"x")]) == {"traceparent": TRACEPARENT}
    # Not trace context, malformed, too long, not ASCII, or a tracestate without a traceparent: nothing is read.
    assert trace_headers_of([("traceparent", "00-zz-yy-01")]) == {}
    assert trace_headers_of([("traceparent", TRACEPARENT + "-" + "a" * 200)]) == {}
    assert trace_headers_of([("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0\xe9")]) == {}
    assert trace_headers_of([("tracestate", "k=v")]) == {}
    assert trace_headers_of([("traceparent", TRACEPARENT), ("tracestate", "k" * (MAX_TRACESTATE_CHARS + 1))]) == {
        "traceparent": TRACEPARENT
    }
    assert trace_headers_of([("traceparent", None), ("traceparent", b"\xff" * 55)]) == {}
    parent = trace.get_current_span(extract_context([("traceparent", TRACEPARENT)])).get_span_context()
    assert (f"{parent.trace_id:032x}", f"{parent.span_id:016x}") == (
        "0af7651916cd43dd8448eb211c80319c",
        "b7ad6b7169203331",
    )


def test_the_embedded_bus_carries_the_publishers_trace_context(tmp_path: Path, spans: InMemorySpanExporter) -> None:
    settings = EmbeddedBusSettings(path=tmp_path / "bus.sqlite3", topics=TopicsConfig())
    with make_bus(settings) as bus:
        with tracer().start_as_current_span("device") as device:
            bus.publish(Topic.TELEMETRY, telemetry())
        with bus.consumer("readers", [Topic.TELEMETRY]) as consumer:
            message = consumer.poll(5.0)
    assert message is not None
    [publish] = [span for span in spans.get_finished_spans() if span.name.startswith("publish ")]
    assert publish.parent is not None
    assert publish.parent.span_id == device.get_span_context().span_id
    headers = dict(message.headers)
    # version, trace id, parent span id (the flags say "sampled" and, with W3C level 2, "random trace id").
    assert headers["traceparent"].split("-")[:3] == [
        "00",
        f"{publish.context.trace_id:032x}",
        f"{publish.context.span_id:016x}",
    ]


def test_a_bus_file_written_before_headers_is_migrated_and_its_records_read(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    settings = EmbeddedBusSettings(path=path, topics=TopicsConfig())
    with make_bus(settings):
        pass
    # Make it the old layout: records without the headers column, schema version 0.
    connection = sqlite3.connect(path)
    connection.executescript(
        "DROP TABLE records; CREATE TABLE records (topic TEXT NOT NULL, partition INTEGER NOT NULL, offset INTEGER "
        "NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, timestamp_ms INTEGER NOT NULL, PRIMARY KEY (topic, "
        "partition, offset)) WITHOUT ROWID; PRAGMA user_version = 0;"
    )
    connection.close()
    physical = TopicsConfig().physical_name(Topic.TELEMETRY)
    # Opening it migrates it; an old-style record (no headers) reads back with none.
    write_raw_record(path, physical, "car-1", encode(telemetry()))
    connection = sqlite3.connect(path)
    assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert "headers" in {row[1] for row in connection.execute("PRAGMA table_info(records)")}
    # A stored value that is not a list of pairs is read as no headers, never as an error.
    connection.execute("UPDATE records SET headers = '{\"traceparent\": 1}'")
    connection.commit()
    connection.close()
    with make_bus(settings) as bus, bus.consumer("readers", [Topic.TELEMETRY]) as consumer:
        message = consumer.poll(5.0)
    assert message is not None
    assert message.headers == ()


def test_a_resumed_span_joins_the_recorded_trace_and_links_to_its_caller(spans: InMemorySpanExporter) -> None:
    with (
        tracer().start_as_current_span("officer request") as request,
        resumed_span("approve_version", traceparent=TRACEPARENT, links=["", "garbage"]),
    ):
        resumed_traceparent = current_traceparent()
    [approve] = [span for span in spans.get_finished_spans() if span.name == "approve_version"]
    assert f"{approve.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert approve.parent is not None
    assert f"{approve.parent.span_id:016x}" == "b7ad6b7169203331"
    assert [link.context.span_id for link in approve.links] == [request.get_span_context().span_id]
    assert resumed_traceparent.split("-")[1] == "0af7651916cd43dd8448eb211c80319c"
    # Within the same trace it is a plain child; without a recorded context, a child of the current span.
    with tracer().start_as_current_span("celery run") as run:
        same = f"00-{run.get_span_context().trace_id:032x}-{'1' * 16}-01"
        with resumed_span("aggregate_round", traceparent=same):
            pass
        with resumed_span("evaluate_version", traceparent=""):
            pass
    finished = {span.name: span for span in spans.get_finished_spans()}
    for name in ("aggregate_round", "evaluate_version"):
        parent = finished[name].parent
        assert parent is not None
        assert parent.span_id == run.get_span_context().span_id
        assert not finished[name].links
