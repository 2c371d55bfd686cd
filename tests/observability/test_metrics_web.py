"""The web server's /metrics: who may read it, request metrics labelled by route name (never by raw path), and the
database gauges computed at scrape time against the real database; also the aggregation timer and Celery's task
signals, which feed the same registry."""

from collections.abc import Callable
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from celery.signals import task_postrun, task_prerun
from django.test import Client, override_settings
from django.utils import timezone
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from apps.federation.models import EdgeDevice, Round
from controlplane.metrics.families import timed_aggregation
from fednested.messaging import encode
from tests.federation_world import WorkerWorld, as_message, enroll
from workers.aggregation import aggregate_round_task
from workers.ingest.consumer import ingest_message


def scrape(client: Client, **extra: Any) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = client.get("/metrics", **extra)
    assert response.status_code == 200, response.content[:500]
    assert response["Content-Type"].startswith("text/plain; version=")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.content.decode())
        for sample in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def requests_counted(view: str, method: str, status: str) -> float:
    labels = {"view": view, "method": method, "status": status}
    return REGISTRY.get_sample_value("fednested_http_requests_total", labels) or 0.0


def test_requests_are_counted_by_route_name_and_the_database_gauges_are_read(
    world: WorkerWorld, make_update: Callable[..., Any]
) -> None:
    client = Client()
    device = enroll(world, "car-metrics")
    round_ = world.open_round(k=3)
    envelope, _ = make_update(device, round_id=round_.round_id)
    assert ingest_message(as_message(encode(envelope), device.row.client_id)).status == "buffered"
    EdgeDevice.objects.filter(pk=device.row.pk).update(last_seen=timezone.now() - timedelta(hours=2))
    before_tasks = requests_counted("task-list", "GET", "401")
    before_unmatched = requests_counted("<unmatched>", "GET", "404")

    assert client.get("/api/v1/tasks/").status_code == 401
    assert client.get("/api/v1/no/such/path-7f3a9/").status_code == 404
    samples = scrape(client)

    assert requests_counted("task-list", "GET", "401") == before_tasks + 1
    assert requests_counted("<unmatched>", "GET", "404") == before_unmatched + 1
    # Labels come from route names only: a client's made-up path never becomes a series.
    assert not [key for key in samples if any("path-7f3a9" in label for _, label in key[1])]
    assert value(samples, "fednested_database_metrics_up") == 1.0
    window = {"round_id": round_.round_id, "series": round_.series, "mode": "async", "status": "open"}
    assert value(samples, "fednested_window_buffered_updates", **window) == 1.0
    assert value(samples, "fednested_window_buffer_size", **window) == 3.0
    assert value(samples, "fednested_windows", status="open") == 1.0
    assert value(samples, "fednested_window_deadline_overdue_seconds") == 0.0
    assert value(samples, "fednested_devices", status="active") == 1.0
    unseen = {
        threshold: value(samples, "fednested_active_devices_unseen", threshold_seconds=threshold)
        for threshold in ("300", "3600", "86400")
    }
    assert unseen == {"300": 1.0, "3600": 1.0, "86400": 0.0}
    newest = value(samples, "fednested_device_last_seen_newest_age_seconds")
    assert newest is not None
    assert 7190 < newest < 7300
    assert value(samples, "fednested_outbox_pending_events") is not None


def test_a_window_past_its_deadline_shows_how_overdue_it_is(world: WorkerWorld) -> None:
    round_ = world.open_round(k=3)
    # Its deadline passed 20 minutes ago and no worker enqueued its aggregation (no ingest worker runs here).
    Round.objects.filter(pk=round_.pk).update(deadline_at=timezone.now() - timedelta(minutes=20))
    overdue = value(scrape(Client()), "fednested_window_deadline_overdue_seconds")
    assert overdue is not None
    assert 1190 < overdue < 1300


@pytest.mark.django_db
def test_only_direct_requests_from_allowed_networks_or_with_the_token_may_scrape() -> None:
    client = Client()
    assert client.get("/metrics", REMOTE_ADDR="10.1.2.3").status_code == 404
    # Through HAProxy every request comes from the proxy's (loopback) address, with X-Forwarded-For.
    assert client.get("/metrics", HTTP_X_FORWARDED_FOR="203.0.113.9").status_code == 404
    assert client.get("/metrics", HTTP_X_FEDNESTED_PROXY_SECRET="anything").status_code == 404
    assert client.post("/metrics").status_code == 405
    with override_settings(FEDNESTED_METRICS_ALLOWED_NETWORKS=["10.0.0.0/8"]):
        assert client.get("/metrics", REMOTE_ADDR="10.1.2.3").status_code == 200
        assert client.get("/metrics").status_code == 404
    with override_settings(FEDNESTED_METRICS_TOKEN="s3cret-scrape-token"):
        forwarded = {"HTTP_X_FORWARDED_FOR": "203.0.113.9", "REMOTE_ADDR": "10.1.2.3"}
        assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-scrape-token", **forwarded).status_code == 200
        assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong", **forwarded).status_code == 404
        assert client.get("/metrics", HTTP_AUTHORIZATION="Token s3cret-scrape-token", **forwarded).status_code == 404


def aggregation_runs(outcome: str) -> float:
    return REGISTRY.get_sample_value("fednested_aggregation_duration_seconds_count", {"outcome": outcome}) or 0.0


def test_aggregation_runs_are_timed_by_outcome() -> None:
    @timed_aggregation
    def run(result: SimpleNamespace | None) -> SimpleNamespace | None:
        if result is not None and result.version_id == "boom":
            raise RuntimeError("aggregation failed")
        return result

    before = {
        outcome: aggregation_runs(outcome) for outcome in ("candidate", "nothing_applied", "not_claimed", "failed")
    }
    run(SimpleNamespace(version_id="w1-candidate"))
    run(SimpleNamespace(version_id=None))
    run(None)
    with pytest.raises(RuntimeError, match="aggregation failed"):
        run(SimpleNamespace(version_id="boom"))
    after = {outcome: aggregation_runs(outcome) for outcome in before}
    assert {outcome: after[outcome] - before[outcome] for outcome in before} == {
        "candidate": 1.0,
        "nothing_applied": 1.0,
        "not_claimed": 1.0,
        "failed": 1.0,
    }


def test_celery_task_signals_count_states_and_time_runs() -> None:
    name = aggregate_round_task.name
    count = {"task": name, "state": "failure"}
    before = REGISTRY.get_sample_value("fednested_celery_tasks_total", count) or 0.0
    runs = REGISTRY.get_sample_value("fednested_celery_task_duration_seconds_count", {"task": name}) or 0.0
    task_prerun.send(sender=aggregate_round_task, task_id="t-1", task=aggregate_round_task, args=(), kwargs={})
    task_postrun.send(
        sender=aggregate_round_task, task_id="t-1", task=aggregate_round_task, args=(), kwargs={}, state="FAILURE"
    )
    assert REGISTRY.get_sample_value("fednested_celery_tasks_total", count) == before + 1
    assert REGISTRY.get_sample_value("fednested_celery_task_duration_seconds_count", {"task": name}) == runs + 1
