"""The test broker's SSL listener and the federation's ACLs, against the real broker: what a device certificate and
the control plane's certificate may do, that nothing else is allowed, and that certificates from elsewhere (or none)
are refused at the handshake. Each module run uses its own topic prefix and applies the ACLs for it with the same
`apply_acls` that `fednested messaging apply-acls` (run by scripts/services/kafka.sh) uses."""

import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from confluent_kafka import Consumer as RawConsumer
from confluent_kafka import KafkaError, Producer, TopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
)
from cryptography.hazmat.primitives.serialization import Encoding
from pydantic import ValidationError

from fednested.identity.ca import CertificateAuthority
from fednested.identity.keys import generate_private_key, make_csr, private_key_pem
from fednested.messaging import (
    AdapterSummary,
    BusError,
    Consumer,
    KafkaBusSettings,
    PayloadRef,
    RoundStart,
    Telemetry,
    Topic,
    TopicsConfig,
    UpdateEnvelope,
    bootstrap_topics,
    make_bus,
)
from fednested.messaging.acls import (
    CONTROL_PLANE_PRINCIPAL,
    DATAENGINE_GROUP,
    DEVICE_PRINCIPAL,
    EDGE_GROUP_PREFIX,
    INGEST_GROUP,
    KafkaAcl,
    Operation,
    Pattern,
    Resource,
    apply_acls,
    federation_acls,
)

pytestmark = pytest.mark.kafka
NOW = datetime.now(UTC).replace(microsecond=0)
POLL_DEADLINE_S = 20.0


# --- the ACL set, without a broker ------------------------------------------------------------------------------------


def test_federation_acls_are_exactly_what_the_producers_and_consumers_need() -> None:
    acls = federation_acls(TopicsConfig(prefix="staging."))
    device, control_plane = DEVICE_PRINCIPAL, CONTROL_PLANE_PRINCIPAL
    topic, group = Resource.TOPIC, Resource.GROUP
    literal, prefixed = Pattern.LITERAL, Pattern.PREFIXED
    read, write = Operation.READ, Operation.WRITE
    assert acls == [
        KafkaAcl(control_plane, group, "fednested-dataengine", literal, read),
        KafkaAcl(control_plane, group, "fednested-ingest", literal, read),
        KafkaAcl(control_plane, topic, "staging.control.federation_rounds", literal, write),
        KafkaAcl(control_plane, topic, "staging.tasks.training", literal, read),
        KafkaAcl(control_plane, topic, "staging.tasks.training", literal, write),
        KafkaAcl(control_plane, topic, "staging.telemetry.edge", literal, read),
        KafkaAcl(control_plane, topic, "staging.updates.experts.local", literal, read),
        KafkaAcl(device, group, "edge-", prefixed, read),
        KafkaAcl(device, topic, "staging.control.federation_rounds", literal, read),
        KafkaAcl(device, topic, "staging.telemetry.edge", literal, write),
        KafkaAcl(device, topic, "staging.updates.experts.local", literal, write),
    ]
    assert (device, control_plane) == ("User:fednested-device", "User:fednested-controlplane")


def test_the_ingest_group_is_the_one_the_ingest_worker_joins() -> None:
    from workers.ingest.consumer import DEFAULT_GROUP

    assert INGEST_GROUP == DEFAULT_GROUP


def test_the_dataengine_group_is_the_one_the_telemetry_worker_joins() -> None:
    from workers.telemetry.consumer import DEFAULT_GROUP

    assert DATAENGINE_GROUP == DEFAULT_GROUP


def test_tls_settings_need_certificate_and_key_together_and_a_ca(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="ssl_certificate and ssl_key go together"):
        KafkaBusSettings(bootstrap_servers="h:1", ssl_ca=tmp_path / "ca", ssl_certificate=tmp_path / "c")
    with pytest.raises(ValidationError, match="ssl_certificate needs ssl_ca"):
        KafkaBusSettings(bootstrap_servers="h:1", ssl_certificate=tmp_path / "c", ssl_key=tmp_path / "k")
    with pytest.raises(ValidationError, match=r"librdkafka sets security\.protocol"):
        KafkaBusSettings(bootstrap_servers="h:1", ssl_ca=tmp_path / "ca", librdkafka={"security.protocol": "ssl"})


# --- the broker -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """A client certificate and its key, as files."""

    certificate: Path
    key: Path


@dataclass(frozen=True)
class TlsBroker:
    """The broker's two listeners, the services' CA, the control plane's certificate, and this module's topics."""

    plaintext: str
    ssl: str
    ca: CertificateAuthority
    control_plane: Identity
    topics: TopicsConfig

    def settings(self, identity: Identity | None) -> KafkaBusSettings:
        """Settings of a client on the SSL listener presenting `identity` (none: no client certificate)."""
        return KafkaBusSettings(
            bootstrap_servers=self.ssl,
            client_id="acl-tests",
            session_timeout_ms=6_000,
            publish_timeout_s=10.0,
            ssl_ca=self.ca.certificate_path,
            ssl_certificate=identity.certificate if identity else None,
            ssl_key=identity.key if identity else None,
            topics=self.topics,
        )

    def admin_settings(self) -> KafkaBusSettings:
        """The PLAINTEXT listener, where the test broker's clients are the super user ANONYMOUS."""
        return KafkaBusSettings(bootstrap_servers=self.plaintext, topics=self.topics)


def _required_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        if os.environ.get("FEDNESTED_REQUIRE_SERVICES") == "1":
            pytest.fail(f"FEDNESTED_REQUIRE_SERVICES=1 but {name} is not set: scripts/services.sh did not write it")
        pytest.skip("Kafka not running: `scripts/services.sh start && source var/services/env.sh`")
    return value


@pytest.fixture(scope="module")
def broker() -> TlsBroker:
    """The services' broker with this module's own topics, and the federation's ACLs applied for them."""
    plaintext = _required_env("FEDNESTED_KAFKA_BOOTSTRAP")
    ssl = _required_env("FEDNESTED_KAFKA_SSL_BOOTSTRAP")
    ca = CertificateAuthority.load(Path(_required_env("FEDNESTED_SERVICES_CA_DIR")))
    control_plane = Identity(
        Path(_required_env("FEDNESTED_KAFKA_CONTROLPLANE_CERT")),
        Path(_required_env("FEDNESTED_KAFKA_CONTROLPLANE_KEY")),
    )
    tls = TlsBroker(plaintext, ssl, ca, control_plane, TopicsConfig(prefix=f"acl-{uuid.uuid4().hex[:10]}."))
    bootstrap_topics(tls.admin_settings())
    apply_acls(tls.admin_settings(), federation_acls(tls.topics))
    return tls


def issue_device(ca: CertificateAuthority, directory: Path, client_id: str) -> Identity:
    """A device certificate issued the way enrollment issues it: from the device's own CSR."""
    key = generate_private_key()
    certificate = ca.issue_device(make_csr(key, client_id), client_id=client_id)
    directory.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = directory / f"{client_id}.key", directory / f"{client_id}.crt"
    key_path.write_bytes(private_key_pem(key))
    key_path.chmod(0o600)
    cert_path.write_bytes(certificate.public_bytes(Encoding.PEM))
    return Identity(cert_path, key_path)


@pytest.fixture
def device(broker: TlsBroker, tmp_path: Path) -> tuple[str, Identity]:
    client_id = f"edge-acl-{uuid.uuid4().hex[:8]}"
    return client_id, issue_device(broker.ca, tmp_path / "device", client_id)


def envelope(client_id: str) -> UpdateEnvelope:
    return UpdateEnvelope(
        update_id=uuid.uuid4(),
        client_id=client_id,
        base_version="v1",
        examples=10,
        routed_tokens={"0.1": 100},
        metrics={"loss": 2.5},
        payload=PayloadRef(uri=f"s3://deltas/{client_id}/1.safetensors", sha256="ab" * 32, size_bytes=4096),
        adapter=AdapterSummary(rank=8, alpha=16.0, target_modules=["w1", "w2"]),
        created_at=NOW,
    )


def telemetry(client_id: str) -> Telemetry:
    return Telemetry(
        client_id=client_id,
        loss=1.5,
        steps=3,
        duration_s=2.0,
        outcome="succeeded",
        started_at=NOW,
        finished_at=NOW + timedelta(seconds=2),
    )


def round_start() -> RoundStart:
    return RoundStart(
        round_id=f"r-{uuid.uuid4().hex[:8]}",
        base_version="v1",
        deadline=NOW + timedelta(hours=1),
        config={"local_steps": 2},
        started_at=NOW,
    )


# --- devices ----------------------------------------------------------------------------------------------------------


def test_a_device_publishes_updates_and_telemetry(broker: TlsBroker, device: tuple[str, Identity]) -> None:
    client_id, identity = device
    with make_bus(broker.settings(identity)) as bus:
        # publish() returns once the broker acknowledged the write (acks=all), so each call is the proof.
        bus.publish(Topic.UPDATES, envelope(client_id))
        bus.publish(Topic.TELEMETRY, telemetry(client_id))


def poll_until_refused(consumer: Consumer) -> None:
    """Poll until the consumer raises (the caller expects BusError); fails the test if it reads a message instead or
    nothing happens within POLL_DEADLINE_S."""
    deadline = time.monotonic() + POLL_DEADLINE_S
    while time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is not None:
            pytest.fail(f"group {consumer.group!r} read {message.where()}, which it may not")
    pytest.fail(f"group {consumer.group!r}: no error within {POLL_DEADLINE_S}s")


def test_a_device_cannot_read_the_updates_of_devices(broker: TlsBroker, device: tuple[str, Identity]) -> None:
    client_id, identity = device
    settings = broker.settings(identity)
    # The device sees the topic (it may write to it), joins its own group, and is refused the fetch.
    with (
        make_bus(settings) as bus,
        bus.consumer(f"{EDGE_GROUP_PREFIX}{client_id}", [Topic.UPDATES]) as consumer,
        pytest.raises(BusError, match="Topic authorization failed"),
    ):
        poll_until_refused(consumer)
    # Below the bus too: reading a partition by name, without a group, is refused by the broker.
    raw = RawConsumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            **settings.tls_properties(),
            "group.id": f"{EDGE_GROUP_PREFIX}{client_id}",
            "enable.auto.commit": False,
        }
    )
    try:
        raw.assign([TopicPartition(broker.topics.physical_name(Topic.UPDATES), 0, 0)])
        code = _first_error_code(raw)
    finally:
        raw.close()
    assert code == KafkaError.TOPIC_AUTHORIZATION_FAILED


def _first_error_code(consumer: RawConsumer) -> int:
    """The code of the consumer's first error; fails the test if it reads a message first, or nothing happens."""
    deadline = time.monotonic() + POLL_DEADLINE_S
    while time.monotonic() < deadline:
        raw = consumer.poll(0.5)
        if raw is None:
            continue
        error = raw.error()
        if error is None:
            pytest.fail(f"the consumer read a message from {raw.topic()}[{raw.partition()}] it may not read")
        return int(error.code())
    pytest.fail(f"no error and no message within {POLL_DEADLINE_S}s")


def test_a_device_cannot_use_topics_it_has_no_part_in(broker: TlsBroker, device: tuple[str, Identity]) -> None:
    client_id, identity = device
    # tasks.training is the control plane's alone: the broker hides it from devices, and the bus says why.
    denied = r"topic authorization failed for acl-\w+\.tasks\.training: the broker's ACLs"
    with make_bus(broker.settings(identity)) as bus, pytest.raises(BusError, match=denied):
        bus.consumer(f"{EDGE_GROUP_PREFIX}{client_id}", [Topic.TASKS])


def test_a_device_cannot_publish_control_events(broker: TlsBroker, device: tuple[str, Identity]) -> None:
    _client_id, identity = device
    with (
        make_bus(broker.settings(identity)) as bus,
        pytest.raises(BusError, match=r"publish to acl-\w+\.control\.federation_rounds failed: .*authorization"),
    ):
        bus.publish(Topic.CONTROL_ROUNDS, round_start())


def test_a_device_cannot_join_the_ingest_group(broker: TlsBroker, device: tuple[str, Identity]) -> None:
    _client_id, identity = device
    # On the control topic, which the device may read: only the group is refused.
    with (
        make_bus(broker.settings(identity)) as bus,
        bus.consumer(INGEST_GROUP, [Topic.CONTROL_ROUNDS]) as consumer,
        pytest.raises(BusError, match=f"group '{INGEST_GROUP}'.*Group authorization failed"),
    ):
        poll_until_refused(consumer)


def test_a_device_reads_control_events_the_control_plane_publishes(
    broker: TlsBroker, device: tuple[str, Identity]
) -> None:
    client_id, identity = device
    event = round_start()
    with make_bus(broker.settings(broker.control_plane)) as control_plane:
        control_plane.publish(Topic.CONTROL_ROUNDS, event)
    with (
        make_bus(broker.settings(identity)) as bus,
        bus.consumer(f"{EDGE_GROUP_PREFIX}{client_id}", [Topic.CONTROL_ROUNDS]) as consumer,
    ):
        deadline = time.monotonic() + POLL_DEADLINE_S
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and isinstance(message.event, RoundStart):
                consumer.commit(message)  # committing to its group needs the group ACL too
                if message.event.round_id == event.round_id:
                    break
        else:
            pytest.fail(f"round {event.round_id} did not reach the device within {POLL_DEADLINE_S}s")


# --- the control plane ------------------------------------------------------------------------------------------------


def test_the_control_plane_ingests_device_updates_with_the_ingest_group(
    broker: TlsBroker, device: tuple[str, Identity]
) -> None:
    client_id, identity = device
    update = envelope(client_id)
    with make_bus(broker.settings(identity)) as bus:
        bus.publish(Topic.UPDATES, update)
    with (
        make_bus(broker.settings(broker.control_plane)) as bus,
        bus.consumer(INGEST_GROUP, [Topic.UPDATES]) as consumer,
    ):
        deadline = time.monotonic() + POLL_DEADLINE_S
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None:
                consumer.commit(message)
                if isinstance(message.event, UpdateEnvelope) and message.event.update_id == update.update_id:
                    assert message.key == client_id
                    break
        else:
            pytest.fail(f"update {update.update_id} did not reach the ingest group within {POLL_DEADLINE_S}s")


def test_the_control_plane_cannot_write_device_updates_nor_read_with_another_group(broker: TlsBroker) -> None:
    with make_bus(broker.settings(broker.control_plane)) as bus:
        with pytest.raises(BusError, match=r"publish to acl-\w+\.updates\.experts\.local failed: .*authorization"):
            bus.publish(Topic.UPDATES, envelope("edge-forged"))
        with (
            bus.consumer("not-the-ingest-group", [Topic.UPDATES]) as consumer,
            pytest.raises(BusError, match="Group authorization failed"),
        ):
            poll_until_refused(consumer)


# --- the handshake ----------------------------------------------------------------------------------------------------


def _handshake_errors(settings: KafkaBusSettings) -> list[KafkaError]:
    """Errors a client with `settings` reports when it first talks to the broker (bounded)."""
    errors: list[KafkaError] = []
    quiet = logging.getLogger("tests.kafka_acls.handshake")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    producer = Producer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            **settings.tls_properties(),
            "error_cb": errors.append,
            # One refused attempt is the evidence; no need for librdkafka's quick reconnects.
            "reconnect.backoff.ms": 5_000,
            "reconnect.backoff.max.ms": 10_000,
        },
        logger=quiet,
    )
    deadline = time.monotonic() + POLL_DEADLINE_S
    while not errors and time.monotonic() < deadline:
        producer.poll(0.2)
    return errors


def test_a_certificate_from_another_ca_is_refused_at_the_handshake(broker: TlsBroker, tmp_path: Path) -> None:
    other = CertificateAuthority.init(tmp_path / "other-ca", common_name="not the federation")
    # Same subject as a real device, so only the issuer differs.
    impostor = issue_device(other, tmp_path / "impostor", "edge-acl-impostor")
    errors = _handshake_errors(broker.settings(impostor))
    assert errors, f"no error from {broker.ssl} within {POLL_DEADLINE_S}s: the broker accepted the certificate"
    assert "alert bad certificate" in errors[0].str(), errors[0].str()


def test_a_client_without_a_certificate_is_refused_at_the_handshake(broker: TlsBroker) -> None:
    errors = _handshake_errors(broker.settings(None))
    assert errors, f"no error from {broker.ssl} within {POLL_DEADLINE_S}s: the broker accepted a client without one"
    assert "alert bad certificate" in errors[0].str(), errors[0].str()


def test_the_control_plane_certificate_is_accepted(broker: TlsBroker) -> None:
    # The contrast for the two refusals above: the same client code with a certificate of the federation's CA.
    metadata = AdminClient(
        {"bootstrap.servers": broker.ssl, **broker.settings(broker.control_plane).tls_properties()}
    ).list_topics(timeout=10)
    assert broker.topics.physical_name(Topic.CONTROL_ROUNDS) in metadata.topics


# --- applying the ACLs ------------------------------------------------------------------------------------------------


def _bindings(admin: AdminClient, principal: str) -> set[tuple[str, str, str, str, str, str]]:
    """The broker's ALLOW/DENY bindings of `principal`: (resource, name, pattern, operation, permission, host)."""
    everything = AclBindingFilter(
        ResourceType.ANY,
        None,  # type: ignore[arg-type]
        ResourcePatternType.ANY,
        principal,
        None,  # type: ignore[arg-type]
        AclOperation.ANY,
        AclPermissionType.ANY,
    )
    found = admin.describe_acls(everything, request_timeout=10).result(timeout=20)
    return {
        (b.restype.name, b.name, b.resource_pattern_type.name, b.operation.name, b.permission_type.name, b.host)
        for b in found
    }


def _expected(acls: list[KafkaAcl], principal: str) -> set[tuple[str, str, str, str, str, str]]:
    return {
        (a.resource.value, a.name, a.pattern.value, a.operation.value, "ALLOW", "*")
        for a in acls
        if a.principal == principal
    }


def test_the_services_script_applied_the_federation_acls(broker: TlsBroker) -> None:
    # The deployment's own topics (no prefix, or FEDNESTED_TOPIC_PREFIX), as `fednested messaging apply-acls` in
    # scripts/services/kafka.sh left them.
    wanted = federation_acls(TopicsConfig(prefix=os.environ.get("FEDNESTED_TOPIC_PREFIX", "")))
    admin = AdminClient({"bootstrap.servers": broker.plaintext})
    for principal in (DEVICE_PRINCIPAL, CONTROL_PLANE_PRINCIPAL):
        missing = _expected(wanted, principal) - _bindings(admin, principal)
        assert not missing, f"{principal} lacks {sorted(missing)} on the services' broker"


@pytest.fixture
def stray_acl(broker: TlsBroker) -> Iterator[AclBinding]:
    """A grant the federation's set does not hold: devices reading updates."""
    binding = AclBinding(
        ResourceType.TOPIC,
        broker.topics.physical_name(Topic.UPDATES),
        ResourcePatternType.LITERAL,
        DEVICE_PRINCIPAL,
        "*",
        AclOperation.READ,
        AclPermissionType.ALLOW,
    )
    admin = AdminClient({"bootstrap.servers": broker.plaintext})
    for future in admin.create_acls([binding], request_timeout=10).values():
        future.result(timeout=20)
    yield binding
    # Whatever the test did, leave the module's broker with exactly the federation's set.
    apply_acls(broker.admin_settings(), federation_acls(broker.topics))


def test_apply_acls_removes_grants_outside_the_set_and_is_idempotent(broker: TlsBroker, stray_acl: AclBinding) -> None:
    wanted = federation_acls(broker.topics)
    first = apply_acls(broker.admin_settings(), wanted)
    assert first.created == ()
    assert first.removed == (f"{DEVICE_PRINCIPAL} may READ topic {stray_acl.name}",)
    second = apply_acls(broker.admin_settings(), wanted)
    assert (second.created, second.removed, len(second.unchanged)) == ((), (), len(wanted))
    admin = AdminClient({"bootstrap.servers": broker.plaintext})
    prefix = broker.topics.prefix
    for principal in (DEVICE_PRINCIPAL, CONTROL_PLANE_PRINCIPAL):
        mine = {b for b in _bindings(admin, principal) if b[0] != "TOPIC" or b[1].startswith(prefix)}
        assert mine == _expected(wanted, principal)


def test_the_cli_command_reports_a_converged_broker(broker: TlsBroker) -> None:
    from typer.testing import CliRunner

    from fednested.cli import app

    arguments = ["messaging", "apply-acls", "--bootstrap", broker.plaintext, "--topic-prefix", broker.topics.prefix]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    converged = (
        f"ACLs on Kafka at {broker.plaintext}: 0 created, 0 removed, {len(federation_acls(broker.topics))} unchanged"
    )
    assert result.stdout.splitlines()[0] == converged
    refused = CliRunner().invoke(app, ["messaging", "apply-acls"])
    assert (refused.exit_code, refused.stderr) == (
        1,
        "error: give exactly one of --config PATH or --bootstrap HOST:PORT\n",
    )
