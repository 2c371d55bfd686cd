"""Event bus: wire schemas, topics, and one bus interface with Kafka and embedded (SQLite) implementations.

Importing this package never imports confluent_kafka; only `make_bus`/`bootstrap_topics` for a Kafka config do.
"""

from fednested.messaging.bus import (
    BootstrapReport,
    Bus,
    BusError,
    Consumer,
    Message,
    TopicOutcome,
    bootstrap_topics,
    make_bus,
)
from fednested.messaging.schemas import (
    SCHEMA_REGISTRY,
    AdapterSummary,
    ConfigChange,
    Event,
    ModelAvailable,
    PayloadRef,
    RoundStart,
    SchemaError,
    Telemetry,
    TelemetryV2,
    TrainingTask,
    UpdateEnvelope,
    decode,
    encode,
)
from fednested.messaging.settings import BusSettings, EmbeddedBusSettings, KafkaBusSettings
from fednested.messaging.topics import TOPIC_SPECS, Topic, TopicError, TopicsConfig, TopicSettings

__all__ = [
    "SCHEMA_REGISTRY",
    "TOPIC_SPECS",
    "AdapterSummary",
    "BootstrapReport",
    "Bus",
    "BusError",
    "BusSettings",
    "ConfigChange",
    "Consumer",
    "EmbeddedBusSettings",
    "Event",
    "KafkaBusSettings",
    "Message",
    "ModelAvailable",
    "PayloadRef",
    "RoundStart",
    "SchemaError",
    "Telemetry",
    "TelemetryV2",
    "Topic",
    "TopicError",
    "TopicOutcome",
    "TopicSettings",
    "TopicsConfig",
    "TrainingTask",
    "UpdateEnvelope",
    "bootstrap_topics",
    "decode",
    "encode",
    "make_bus",
]
