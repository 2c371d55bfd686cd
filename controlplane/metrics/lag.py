"""The ingest worker's consumer lag on Kafka, read when its metrics port is scraped: per partition of the updates
topic, the log end offset minus the group's committed offset (or minus the earliest offset, for a partition the
group never committed: it starts there, auto.offset.reset=earliest).

It asks the broker with a client of its own that joins no group (committed offsets and watermarks are plain
requests), so reading the lag never disturbs the consumer or triggers a rebalance; the ingest principal's READ on
the topic and the group covers both requests. The embedded bus (one machine, the demo) reports no lag.
"""

import logging
import threading
from collections.abc import Iterator
from typing import Any

from confluent_kafka import OFFSET_INVALID, KafkaException, TopicPartition
from confluent_kafka import Consumer as RawConsumer
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from fednested.messaging import EmbeddedBusSettings, KafkaBusSettings, Topic
from fednested.messaging.kafka import client_config

logger = logging.getLogger(__name__)

# A scrape waits at most this long for the broker (Prometheus' default scrape timeout is 10 s).
REQUEST_TIMEOUT_S = 3.0


def partition_lags(client: Any, group: str, name: str, timeout_s: float) -> dict[int, int]:
    """Partition → messages of topic `name` not yet committed by `group`; KafkaException when the broker does not
    answer in time. `client` is a confluent_kafka Consumer that joined no group."""
    metadata = client.list_topics(name, timeout=timeout_s)
    topic = metadata.topics.get(name)
    if topic is None or topic.error is not None:
        raise KafkaException(f"topic {name!r}: {topic.error if topic is not None else 'not in the metadata'}")
    partitions = [TopicPartition(name, partition) for partition in sorted(topic.partitions)]
    committed = {tp.partition: tp.offset for tp in client.committed(partitions, timeout=timeout_s)}
    lags = {}
    for tp in partitions:
        low, high = client.get_watermark_offsets(tp, timeout=timeout_s, cached=False)
        position = committed.get(tp.partition, OFFSET_INVALID)
        start = position if position >= 0 else low
        lags[tp.partition] = max(int(high) - int(start), 0)
    return lags


class ConsumerLagCollector:
    """The `fednested_ingest_consumer_lag` gauges of one consumer group on the updates topic."""

    def __init__(self, settings: KafkaBusSettings, group: str) -> None:
        self.settings = settings
        self.group = group
        self.topic = settings.topics.physical_name(Topic.UPDATES)
        self._client: Any = None
        # Scrapes may overlap (the metrics server answers each in a thread); the client is used by one at a time.
        self._lock = threading.Lock()

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "fednested_ingest_consumer_lag",
                "Messages of a partition the ingest worker's consumer group has not committed yet.",
                labels=["group", "topic", "partition"],
            ),
            GaugeMetricFamily(
                "fednested_ingest_consumer_lag_up",
                "1 when the broker answered this scrape's lag requests, else 0 (the lag series are then missing).",
                labels=["group", "topic"],
            ),
        )

    def collect(self) -> Iterator[Metric]:
        lag, up = self._families()
        with self._lock:
            try:
                if self._client is None:
                    self._client = RawConsumer(
                        {**client_config(self.settings), "group.id": self.group, "enable.auto.commit": False}
                    )
                lags = partition_lags(self._client, self.group, self.topic, REQUEST_TIMEOUT_S)
            except KafkaException as error:
                logger.warning("metrics: consumer lag of group %s on %s not read: %s", self.group, self.topic, error)
                up.add_metric([self.group, self.topic], 0.0)
                yield up
                return
        for partition, behind in lags.items():
            lag.add_metric([self.group, self.topic, str(partition)], float(behind))
        up.add_metric([self.group, self.topic], 1.0)
        yield up
        yield lag

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


def ingest_collectors(bus: KafkaBusSettings | EmbeddedBusSettings, group: str) -> list[ConsumerLagCollector]:
    """The scrape-time collectors of an ingest worker reading `bus` as `group`: its lag on Kafka, none on the
    embedded bus."""
    return [ConsumerLagCollector(bus, group)] if isinstance(bus, KafkaBusSettings) else []
