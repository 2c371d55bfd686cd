"""Kafka bus specifics beyond the shared contract: missing topics are reported, never auto-created."""

import uuid
from datetime import UTC, datetime

import pytest

from fednested.messaging import BusError, KafkaBusSettings, Telemetry, Topic, TopicsConfig, make_bus

pytestmark = pytest.mark.kafka
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def unbootstrapped(kafka_bootstrap_servers: str) -> KafkaBusSettings:
    prefix = f"missing-{uuid.uuid4().hex[:10]}."
    return KafkaBusSettings(bootstrap_servers=kafka_bootstrap_servers, topics=TopicsConfig(prefix=prefix))


def test_publish_and_consume_on_topics_never_bootstrapped_say_what_to_run(unbootstrapped: KafkaBusSettings) -> None:
    event = Telemetry(
        client_id="edge-1", loss=1.0, steps=1, duration_s=1.0, outcome="succeeded", started_at=NOW, finished_at=NOW
    )
    name = unbootstrapped.topics.physical_name(Topic.TELEMETRY)
    with make_bus(unbootstrapped) as bus:
        with pytest.raises(BusError, match=f"topic '{name}' does not exist on Kafka at .*bootstrap-topics"):
            bus.publish(Topic.TELEMETRY, event)
        with pytest.raises(BusError, match=rf"topic\(s\) {name} do not exist on Kafka at .*bootstrap-topics"):
            bus.consumer("g", [Topic.TELEMETRY])
