"""Publishing device events (update envelopes, telemetry) on the bus through the sidecar, and naming a bus
destination the way the sidecar policy speaks about it."""

from __future__ import annotations

from dataclasses import dataclass

from edge_client.sidecar import OutboundApproval, OutboundRefused, OutboundRequest, Sidecar
from edge_client.sidecar.audit import canonical_json
from fednested.messaging.bus import Bus
from fednested.messaging.schemas import Event
from fednested.messaging.settings import EmbeddedBusSettings, KafkaBusSettings
from fednested.messaging.topics import Topic


def bus_destination(settings: KafkaBusSettings | EmbeddedBusSettings, topic: Topic) -> str:
    """`kafka://host:port[,host:port]/<topic>` or `embedded:<topic>` (the on-device bus), as policies name them."""
    if isinstance(settings, KafkaBusSettings):
        return f"kafka://{settings.bootstrap_servers}/{topic.value}"
    return f"embedded:{topic.value}"


@dataclass
class EventPublisher:
    """Sends events only after the sidecar approved them, and sends exactly the approved fields."""

    bus: Bus
    settings: KafkaBusSettings | EmbeddedBusSettings
    sidecar: Sidecar

    def publish(self, kind: str, topic: Topic, event: Event, *, key: str) -> OutboundApproval:
        destination = bus_destination(self.settings, topic)
        metadata = event.model_dump(mode="json")
        approval = self.sidecar.check(OutboundRequest(kind=kind, destination=destination, metadata=metadata))
        if canonical_json(approval.metadata) != canonical_json(metadata):
            # A scrubber changed the event: what leaves must be what was approved, so rebuild it from those fields.
            event = type(event).model_validate_json(canonical_json(approval.metadata))
            if canonical_json(event.model_dump(mode="json")) != canonical_json(approval.metadata):
                raise OutboundRefused(kind, destination, "event", "scrubbed fields no longer form a valid event")
        # Bus.publish returns only once the write is acknowledged (Kafka acks=all / SQLite commit).
        self.bus.publish(topic, event, key=key)
        return approval
