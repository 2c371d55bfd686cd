"""One trace from a device's upload to the approval of the version its update went into: the device's span, the
payload upload (HTTP, Django's instrumentation), the envelope's publish and its ingestion (the embedded bus, headers
in the SQLite record), the aggregation, the evaluation and the officer's approval — all spans of one trace, kept by
the SDK's in-memory exporter. The aggregation combines K=2 updates: it continues the trace of the update that filled
the window and links to the other's."""

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.instrumentation.django import DjangoInstrumentor
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from rest_framework.test import APIClient

from apps.accounts.choices import Role
from apps.accounts.models import User
from apps.federation.choices import TaskKind
from apps.federation.models import TrainingTask, Update
from apps.governance.models import ApprovalRequest
from fednested.messaging import EmbeddedBusSettings, Topic, TopicsConfig, make_bus
from fednested.messaging.acls import INGEST_GROUP
from fednested.observability.tracing import inject_headers, tracer
from tests.federation_world import LAYER0_DOWN, LAYER1_UP, WorkerWorld, enroll, random_adapters, signed_envelope
from workers.aggregation import aggregate_round_task
from workers.evaluation import evaluate_version_task
from workers.ingest.consumer import ingest_batch

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def instrumented_django() -> Iterator[None]:
    """Django's instrumentation, as controlplane/asgi.py installs it, for the test clients made in the test."""
    instrumentor = DjangoInstrumentor()
    instrumentor.instrument()
    try:
        yield
    finally:
        instrumentor.uninstrument()


def _hex(value: int, digits: int) -> str:
    return f"{value:0{digits}x}"


def _device_delivers(world: WorkerWorld, bus: Any, index: int, round_id: str) -> str:
    """What the edge client's spool does for one update (edge_client/spool.py): in one span, PUT the payload with the
    trace-context headers it sends (edge_client/transport/http.py), then publish the signed envelope. Returns the
    trace id."""
    device = enroll(world, f"car-{index}")
    adapters = random_adapters(world.shapes, {LAYER0_DOWN: [1], LAYER1_UP: [2]}, index)
    from safetensors.torch import save as save_safetensors

    body = save_safetensors({key: tensor.contiguous() for key, tensor in adapters.items()})
    update_id = f"00000000-0000-4000-8000-00000000000{index}"
    with tracer().start_as_current_span("deliver update") as span:
        headers = {f"HTTP_{name.upper()}": value for name, value in inject_headers()}
        # The server is another process: it sees the device's trace only through the headers, not this context.
        token = otel_context.attach(Context())
        try:
            response = APIClient().put(
                f"/api/v1/updates/{update_id}/payload/",
                data=body,
                content_type="application/octet-stream",
                HTTP_AUTHORIZATION=f"Token {device.api_token}",
                HTTP_X_CONTENT_SHA256=hashlib.sha256(body).hexdigest(),
                **headers,
            )
        finally:
            otel_context.detach(token)
        assert response.status_code in (200, 201), response.content
        receipt = response.json()
        payload = {"uri": receipt["uri"], "sha256": receipt["sha256"], "size_bytes": receipt["bytes"]}
        envelope = signed_envelope(device, payload, round_id=round_id, update_id=update_id)
        bus.publish(Topic.UPDATES, envelope)
        return _hex(span.get_span_context().trace_id, 32)


def _one(spans: list[ReadableSpan], name: str, trace_id: str) -> ReadableSpan:
    found = [span for span in spans if span.name == name and _hex(span.context.trace_id, 32) == trace_id]
    assert len(found) == 1, f"{len(found)} spans {name!r} in trace {trace_id}: {[s.name for s in spans]}"
    return found[0]


def _parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def test_one_trace_runs_from_a_device_upload_to_the_approval(
    world: WorkerWorld,
    spans: InMemorySpanExporter,
    instrumented_django: None,
    tmp_path: Path,
    django_capture_on_commit_callbacks: Any,
) -> None:
    round_ = world.open_round(k=2)
    bus_settings = EmbeddedBusSettings(path=tmp_path / "bus.sqlite3", topics=TopicsConfig())
    with make_bus(bus_settings) as bus:
        traces = [_device_delivers(world, bus, index, round_.round_id) for index in range(2)]
        with bus.consumer(INGEST_GROUP, [Topic.UPDATES]) as consumer:
            messages = []
            while len(messages) < 2:
                batch = consumer.consume(2, 10.0)
                assert batch, "the two envelopes did not arrive within 10 s"
                messages.extend(batch)
    # The headers crossed the bus: each record carries its publisher's trace.
    assert [dict(message.headers)["traceparent"].split("-")[1] for message in messages] == traces
    # Jobs are run below, one after the other in this thread, instead of from on_commit callbacks.
    with django_capture_on_commit_callbacks(execute=False):
        outcomes = ingest_batch(messages)
        assert [outcome.status for outcome in outcomes] == ["buffered", "buffered"]
        aggregation = TrainingTask.objects.get(kind=TaskKind.EXPERT_AGGREGATION, round=round_)
        version_id = aggregate_round_task(aggregation.pk)
        evaluation = TrainingTask.objects.get(kind=TaskKind.EVALUATION)
        request_pk = evaluate_version_task(evaluation.pk)
        officer = User.objects.create(username="olga-officer", role=Role.OFFICER)
        client = APIClient()
        client.force_authenticate(officer)
        response = client.post(
            f"/api/v1/approvals/{request_pk}/approve/", data={"reason": "loss is down"}, format="json"
        )
        assert response.status_code == 200, response.content
    assert ApprovalRequest.objects.get(pk=request_pk).status == "approved"
    assert version_id is not None

    finished = list(spans.get_finished_spans())
    # The window was filled by the update received last: the aggregation continues its device's trace.
    last = Update.objects.filter(round=round_).order_by("-received_at", "-id").first()
    assert last is not None
    filling = last.traceparent.split("-")[1]
    other = next(trace_id for trace_id in traces if trace_id != filling)
    assert filling in traces

    deliver = _one(finished, "deliver update", filling)
    upload = next(
        span
        for span in finished
        if span.kind == SpanKind.SERVER
        and _hex(span.context.trace_id, 32) == filling
        and "payload" in str(span.attributes.get("http.route", span.name))
    )
    publish = _one(finished, f"publish {Topic.UPDATES.value}", filling)
    ingest = _one(finished, f"process {Topic.UPDATES.value}", filling)
    aggregate = _one(finished, "aggregate_round", filling)
    evaluate = _one(finished, "evaluate_version", filling)
    approve = _one(finished, "approve_version", filling)
    # Parent and child, all the way: upload and publish under the device's span, ingestion under the publish, the
    # aggregation under the ingestion of the update that filled the window, evaluation and approval under it.
    assert _parent_of(upload) == deliver.context.span_id
    assert _parent_of(publish) == deliver.context.span_id
    assert (publish.kind, ingest.kind) == (SpanKind.PRODUCER, SpanKind.CONSUMER)
    assert _parent_of(ingest) == publish.context.span_id
    assert ingest.attributes["fednested.status"] == "buffered"
    assert _parent_of(aggregate) == ingest.context.span_id
    assert _parent_of(evaluate) == aggregate.context.span_id
    assert _parent_of(approve) == aggregate.context.span_id
    assert approve.attributes["fednested.version_id"] == version_id
    # The other device's update is in the same candidate: linked from the aggregation, its own trace intact.
    linked_traces = {_hex(link.context.trace_id, 32) for link in aggregate.links}
    assert other in linked_traces
    assert _one(finished, f"process {Topic.UPDATES.value}", other).context.span_id in {
        link.context.span_id for link in aggregate.links
    }
    # The officer's request is a trace of its own; the approval links to it.
    request_span = next(
        span
        for span in finished
        if span.kind == SpanKind.SERVER and "approve" in str(span.attributes.get("http.route"))
    )
    assert request_span.context.trace_id != approve.context.trace_id
    assert request_span.context.span_id in {link.context.span_id for link in approve.links}

    # The trace as an operator's tool would list it (printed for the record; see docs/operations/observability.md).
    path = sorted(
        (span for span in finished if _hex(span.context.trace_id, 32) == filling), key=lambda span: span.start_time or 0
    )
    print(
        json.dumps(
            [{"name": s.name, "kind": s.kind.name, "service": s.resource.attributes.get("service.name")} for s in path]
        )
    )
