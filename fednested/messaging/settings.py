"""Bus settings as they appear in tier1/tier2 configs: which implementation (`kind`) and how to reach it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fednested.messaging.topics import TopicsConfig

LibrdkafkaValue: TypeAlias = str | int | float | bool
# librdkafka properties that the typed TLS fields set; naming them in `librdkafka` as well would be two sources.
TLS_PROPERTIES = frozenset({"security.protocol", "ssl.ca.location", "ssl.certificate.location", "ssl.key.location"})


class KafkaBusSettings(BaseModel):
    """Apache Kafka through confluent-kafka: deployments and CI."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["kafka"] = Field(default="kafka", description="Use Apache Kafka.")
    bootstrap_servers: str = Field(
        min_length=1,
        pattern=r"^[^,\s]+:\d+(,[^,\s]+:\d+)*$",
        description="Comma-separated HOST:PORT list of brokers.",
        examples=["127.0.0.1:9092"],
    )
    client_id: str = Field(default="fednested", min_length=1, description="Client id the broker logs and meters.")
    session_timeout_ms: int = Field(
        default=10_000,
        ge=1_000,
        description="A consumer that stops heartbeating for this long leaves its group and its partitions move.",
    )
    publish_timeout_s: float = Field(
        default=15.0, gt=0, description="How long publish() waits for the broker to acknowledge a write."
    )
    ssl_ca: Path | None = Field(
        default=None,
        description="CA certificate (PEM) the brokers' certificates must chain to; set, the bus connects over TLS.",
    )
    ssl_certificate: Path | None = Field(
        default=None,
        description="This client's certificate (PEM) from the federation's CA; the broker's ACLs follow its subject.",
    )
    ssl_key: Path | None = Field(default=None, description="Private key (PEM) of ssl_certificate.")
    librdkafka: dict[str, LibrdkafkaValue] = Field(
        default_factory=dict,
        description="Extra librdkafka properties (e.g. sasl.mechanism, socket.timeout.ms) for producer and consumer.",
    )
    topics: TopicsConfig = Field(default_factory=TopicsConfig, description="Topic names, partitions and retention.")

    @model_validator(mode="after")
    def _tls_fields_agree(self) -> KafkaBusSettings:
        if (self.ssl_certificate is None) != (self.ssl_key is None):
            raise ValueError("ssl_certificate and ssl_key go together: set both or neither")
        if self.ssl_certificate is not None and self.ssl_ca is None:
            raise ValueError("ssl_certificate needs ssl_ca (the CA that the brokers' certificates chain to)")
        if self.ssl_ca is not None:
            doubled = sorted(TLS_PROPERTIES & set(self.librdkafka))
            if doubled:
                raise ValueError(
                    f"librdkafka sets {', '.join(doubled)}, which ssl_ca/ssl_certificate/ssl_key set: drop them"
                )
        return self

    def tls_properties(self) -> dict[str, LibrdkafkaValue]:
        """The librdkafka properties of the TLS fields; empty when ssl_ca is unset."""
        if self.ssl_ca is None:
            return {}
        properties: dict[str, LibrdkafkaValue] = {"security.protocol": "ssl", "ssl.ca.location": str(self.ssl_ca)}
        if self.ssl_certificate is not None and self.ssl_key is not None:
            properties["ssl.certificate.location"] = str(self.ssl_certificate)
            properties["ssl.key.location"] = str(self.ssl_key)
        return properties


class EmbeddedBusSettings(BaseModel):
    """An SQLite file shared by the processes of one machine: the zero-setup demo."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["embedded"] = Field(default="embedded", description="Use the embedded single-machine bus.")
    path: Path = Field(
        default=Path("var/bus.sqlite3"),
        description="SQLite file holding the topics; every process on this machine that shares it shares the bus.",
    )
    session_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="A consumer that has not polled for this long leaves its group (dead processes leave at once).",
    )
    poll_interval_s: float = Field(
        default=0.05, gt=0, le=5, description="How often an idle poll() looks for new events, in seconds."
    )
    topics: TopicsConfig = Field(default_factory=TopicsConfig, description="Topic names, partitions and retention.")


BusSettings: TypeAlias = Annotated[KafkaBusSettings | EmbeddedBusSettings, Field(discriminator="kind")]
