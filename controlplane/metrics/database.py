"""Gauges read from the database when the web server's `/metrics` is scraped: the windows' buffers, devices' last
contact, aggregation running too long, the event outbox's backlog.

Each scrape runs a handful of aggregate queries whose answers have a bounded size (at most MAX_WINDOWS windows; the
device gauges are counts, never one series per device), so neither the scrape nor the number of series grows with
the fleet. Only the web server exports them: the workers' ports carry their own metrics only, so no gauge is
reported twice.
"""

import logging
from collections.abc import Iterator
from datetime import datetime, timedelta

from django.apps import apps
from django.db import DatabaseError
from django.db.models import Count, Max, Min, Q
from django.utils import timezone
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from apps.federation.choices import DeviceStatus, RoundStatus, TaskKind, TaskStatus, UpdateStatus
from apps.federation.models import EdgeDevice, Round, TrainingTask, Update

logger = logging.getLogger(__name__)

# Windows reported one by one, the most recently opened first; a deployment has one open window per series.
MAX_WINDOWS = 100
# "Not seen for longer than" thresholds of the device gauge: a heartbeat interval's worth, an hour, a day.
UNSEEN_THRESHOLDS_S = (300, 3600, 86400)
# The event outbox (apps.outbox: pending rows have sent_at and parked_at NULL), reported while the app is installed.
OUTBOX_APP = "outbox"


def _age_s(now: datetime, moment: datetime | None) -> float:
    return max((now - moment).total_seconds(), 0.0) if moment is not None else 0.0


class DatabaseCollector:
    """Computes the database gauges at scrape time (prometheus_client calls `collect` once per scrape)."""

    def describe(self) -> Iterator[Metric]:
        """The families `collect` yields, without querying (prometheus_client calls it when registering)."""
        yield self._up()
        yield from self._families()

    def _up(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "fednested_database_metrics_up", "1 when the database gauges of this scrape could be read, else 0."
        )

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        up = self._up()
        try:
            self._fill(families, timezone.now())
        except DatabaseError:
            # The scrape still answers (request metrics, `up`), and the alert on this gauge says why data is missing.
            logger.exception("metrics: the database gauges could not be read")
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        yield from families

    def _families(self) -> list[GaugeMetricFamily]:
        families = [
            GaugeMetricFamily(
                "fednested_window_buffered_updates",
                f"Updates buffered in each open or aggregating window (the {MAX_WINDOWS} most recently opened).",
                labels=["round_id", "series", "mode", "status"],
            ),
            GaugeMetricFamily(
                "fednested_window_buffer_size",
                "The window's K: it is aggregated once this many updates are buffered.",
                labels=["round_id", "series", "mode", "status"],
            ),
            GaugeMetricFamily(
                "fednested_windows", "Windows (rounds) that are open or aggregating, by status.", labels=["status"]
            ),
            GaugeMetricFamily(
                "fednested_updates_waiting",
                "Buffered updates that no window took yet (they wait for the next window of their series).",
            ),
            GaugeMetricFamily(
                "fednested_window_deadline_overdue_seconds",
                "How long past its deadline the most overdue open window is (0 when none is): the ingest worker "
                "enqueues a window's aggregation within seconds of its deadline.",
            ),
            GaugeMetricFamily(
                "fednested_aggregation_running_seconds",
                "Age of the oldest running aggregation task (0 when none runs); FEDNESTED_AGGREGATION_TIMEOUT_S "
                "releases it as lost.",
            ),
            GaugeMetricFamily(
                "fednested_training_tasks",
                "Training tasks pending or running, by kind and status.",
                labels=["kind", "status"],
            ),
            GaugeMetricFamily("fednested_devices", "Enrolled devices, by status.", labels=["status"]),
            GaugeMetricFamily(
                "fednested_active_devices_unseen",
                "Active devices not heard from for longer than threshold_seconds (never seen counts as unseen).",
                labels=["threshold_seconds"],
            ),
            GaugeMetricFamily(
                "fednested_device_last_seen_newest_age_seconds",
                "Time since the most recent contact of any active device (0 when no device was ever seen).",
            ),
        ]
        if apps.is_installed(f"apps.{OUTBOX_APP}"):
            families += [
                GaugeMetricFamily(
                    "fednested_outbox_pending_events", "Outbox events the relay has not delivered yet (nor parked)."
                ),
                GaugeMetricFamily(
                    "fednested_outbox_oldest_pending_age_seconds",
                    "Age of the oldest outbox event not yet published (0 when none waits).",
                ),
                GaugeMetricFamily(
                    "fednested_outbox_parked_events",
                    "Outbox events the relay gave up on (parked: their delivery can never succeed); an operator "
                    "must look at each.",
                ),
            ]
        return families

    def _fill(self, families: list[GaugeMetricFamily], now: datetime) -> None:
        by_name = {family.name: family for family in families}
        live = [RoundStatus.OPEN, RoundStatus.AGGREGATING]
        windows = (
            Round.objects.filter(status__in=live)
            .annotate(buffered=Count("updates", filter=Q(updates__status=UpdateStatus.BUFFERED)))
            .order_by("-opened_at", "-id")
            .values_list("round_id", "series", "mode", "status", "buffer_size_k", "buffered")[:MAX_WINDOWS]
        )
        for round_id, series, mode, status, size, buffered in windows:
            labels = [round_id, series, mode, status]
            by_name["fednested_window_buffered_updates"].add_metric(labels, float(buffered))
            by_name["fednested_window_buffer_size"].add_metric(labels, float(size))
        counts = dict(
            Round.objects.filter(status__in=live)
            .order_by()
            .values("status")
            .annotate(n=Count("id"))
            .values_list("status", "n")
        )
        for status in live:
            by_name["fednested_windows"].add_metric([status], float(counts.get(status, 0)))
        waiting = Update.objects.filter(status=UpdateStatus.BUFFERED, round__isnull=True).count()
        by_name["fednested_updates_waiting"].add_metric([], float(waiting))
        overdue = Round.objects.filter(status=RoundStatus.OPEN, deadline_at__lt=now).aggregate(m=Min("deadline_at"))
        by_name["fednested_window_deadline_overdue_seconds"].add_metric([], _age_s(now, overdue["m"]))
        running = TrainingTask.objects.filter(
            kind=TaskKind.EXPERT_AGGREGATION, status=TaskStatus.RUNNING, started_at__isnull=False
        ).aggregate(m=Min("started_at"))
        by_name["fednested_aggregation_running_seconds"].add_metric([], _age_s(now, running["m"]))
        tasks = dict(
            ((kind, status), n)
            for kind, status, n in TrainingTask.objects.filter(status__in=[TaskStatus.PENDING, TaskStatus.RUNNING])
            .order_by()
            .values("kind", "status")
            .annotate(n=Count("id"))
            .values_list("kind", "status", "n")
        )
        for kind in TaskKind.values:
            for status in (TaskStatus.PENDING, TaskStatus.RUNNING):
                by_name["fednested_training_tasks"].add_metric([kind, status], float(tasks.get((kind, status), 0)))
        self._fill_devices(by_name, now)
        if "fednested_outbox_pending_events" in by_name:
            self._fill_outbox(by_name, now)

    def _fill_devices(self, by_name: dict[str, GaugeMetricFamily], now: datetime) -> None:
        active = Q(status=DeviceStatus.ACTIVE)
        unseen = {
            f"unseen_{threshold}": Count(
                "id", filter=active & (Q(last_seen__isnull=True) | Q(last_seen__lt=now - timedelta(seconds=threshold)))
            )
            for threshold in UNSEEN_THRESHOLDS_S
        }
        row = EdgeDevice.objects.aggregate(
            active=Count("id", filter=active),
            revoked=Count("id", filter=Q(status=DeviceStatus.REVOKED)),
            newest=Max("last_seen", filter=active),
            **unseen,
        )
        by_name["fednested_devices"].add_metric([DeviceStatus.ACTIVE], float(row["active"]))
        by_name["fednested_devices"].add_metric([DeviceStatus.REVOKED], float(row["revoked"]))
        for threshold in UNSEEN_THRESHOLDS_S:
            by_name["fednested_active_devices_unseen"].add_metric([str(threshold)], float(row[f"unseen_{threshold}"]))
        by_name["fednested_device_last_seen_newest_age_seconds"].add_metric([], _age_s(now, row["newest"]))

    def _fill_outbox(self, by_name: dict[str, GaugeMetricFamily], now: datetime) -> None:
        model = apps.get_model(OUTBOX_APP, "OutboxEvent")
        pending = Q(sent_at__isnull=True, parked_at__isnull=True)
        row = model.objects.aggregate(
            pending=Count("pk", filter=pending),
            oldest=Min("created_at", filter=pending),
            parked=Count("pk", filter=Q(sent_at__isnull=True, parked_at__isnull=False)),
        )
        by_name["fednested_outbox_pending_events"].add_metric([], float(row["pending"]))
        by_name["fednested_outbox_oldest_pending_age_seconds"].add_metric([], _age_s(now, row["oldest"]))
        by_name["fednested_outbox_parked_events"].add_metric([], float(row["parked"]))
