"""Who may do what on the Kafka bus: the principals that certificates map to, and the ACLs each gets, derived from
which party produces and consumes each topic. `apply_acls` makes a broker's ACLs for those principals equal this set.

Kafka maps a client certificate's subject to a principal with `ssl.principal.mapping.rules`
(`principal_mapping_rules()`): every device certificate (`OU=device`) maps to the one principal
`User:fednested-device`, a service certificate (`OU=service`) to `User:<its CN>`. Kafka ACLs cannot match a
principal by prefix, so devices share their rights; a revoked device is stopped by the control plane, which refuses
envelopes its key signed, and by its certificate's short validity, not by the broker (which reads no CRL).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from fednested.identity.ca import DEVICE_UNIT, SERVICE_UNIT
from fednested.messaging.topics import Topic, TopicsConfig

if TYPE_CHECKING:
    from fednested.messaging.settings import KafkaBusSettings

# The principal of every device certificate. A service named like this would get the devices' rights: do not.
DEVICE_USER = "fednested-device"
# The service certificate the control plane's processes (web, ingest worker) present; its CN is its principal.
CONTROL_PLANE_SERVICE = "fednested-controlplane"
# Consumer groups, as the consumers name them: the ingest worker's (workers/ingest/consumer.py DEFAULT_GROUP) and the
# prefix of each device's own group on the control topic (edge_client/runner.py: `edge-<client id>`).
INGEST_GROUP = "fednested-ingest"
# The data engine's consumer (workers/telemetry/consumer.py DEFAULT_GROUP), on telemetry.edge and tasks.training.
DATAENGINE_GROUP = "fednested-dataengine"
EDGE_GROUP_PREFIX = "edge-"

ACL_TIMEOUT_S = 20.0


def principal(user: str) -> str:
    return f"User:{user}"


DEVICE_PRINCIPAL = principal(DEVICE_USER)
CONTROL_PLANE_PRINCIPAL = principal(CONTROL_PLANE_SERVICE)


def principal_mapping_rules() -> str:
    """The broker's `ssl.principal.mapping.rules`: subjects are RFC 2253 strings, most specific name first.

    A subject no rule matches keeps its whole DN as principal, which no ACL names: such a client may do nothing.
    """
    return ",".join(
        (
            f"RULE:^CN=[^,]+,OU={DEVICE_UNIT},O=[^,]+$/{DEVICE_USER}/",
            f"RULE:^CN=([^,]+),OU={SERVICE_UNIT},O=[^,]+$/$1/",
            "DEFAULT",
        )
    )


@dataclass(frozen=True)
class Produces:
    """`principal` publishes to `topic`."""

    principal: str
    topic: Topic


@dataclass(frozen=True)
class Consumes:
    """`principal` reads `topic` in consumer group `group` (or in any group whose id starts with it)."""

    principal: str
    topic: Topic
    group: str
    group_is_prefix: bool


# Every producer and consumer in the code, and nothing else: a topic nobody used here would get no ACL until code
# used it, and only super users would reach it meanwhile.
FLOWS: tuple[Produces | Consumes, ...] = (
    Produces(DEVICE_PRINCIPAL, Topic.UPDATES),  # edge_client/spool.py: update envelopes
    Produces(DEVICE_PRINCIPAL, Topic.TELEMETRY),  # edge_client/spool.py: telemetry
    Consumes(DEVICE_PRINCIPAL, Topic.CONTROL_ROUNDS, EDGE_GROUP_PREFIX, True),  # edge_client/runner.py: rounds
    Produces(CONTROL_PLANE_PRINCIPAL, Topic.CONTROL_ROUNDS),  # apps/federation/events.py: RoundStart, ModelAvailable
    Consumes(CONTROL_PLANE_PRINCIPAL, Topic.UPDATES, INGEST_GROUP, False),  # workers/ingest/consumer.py
    # apps/dataengine/services.py (through the outbox relay): the data engine's TrainingTask events
    Produces(CONTROL_PLANE_PRINCIPAL, Topic.TASKS),
    Consumes(CONTROL_PLANE_PRINCIPAL, Topic.TELEMETRY, DATAENGINE_GROUP, False),  # workers/telemetry/consumer.py
    Consumes(CONTROL_PLANE_PRINCIPAL, Topic.TASKS, DATAENGINE_GROUP, False),  # workers/telemetry/consumer.py
)


class Resource(StrEnum):
    """Kafka resource types we grant on (names as confluent_kafka's ResourceType)."""

    TOPIC = "TOPIC"
    GROUP = "GROUP"


class Pattern(StrEnum):
    """How the resource name matches: exactly, or as a prefix of the names (confluent_kafka's ResourcePatternType)."""

    LITERAL = "LITERAL"
    PREFIXED = "PREFIXED"


class Operation(StrEnum):
    """Operations we grant (confluent_kafka's AclOperation). READ and WRITE imply DESCRIBE in Kafka, and WRITE on a
    topic implies the idempotent producer's IDEMPOTENT_WRITE, so neither is listed separately."""

    READ = "READ"
    WRITE = "WRITE"


@dataclass(frozen=True, order=True)
class KafkaAcl:
    """One ALLOW binding from any host: `principal` may `operation` on the resource `name` matches."""

    principal: str
    resource: Resource
    name: str
    pattern: Pattern
    operation: Operation


def federation_acls(topics: TopicsConfig) -> list[KafkaAcl]:
    """The ACLs of the federation's principals on the topics of `topics` (physical names, so with its prefix), sorted.

    Topics are LITERAL: a PREFIXED pattern on a topic name would also grant every topic whose name extends it.
    """
    acls: set[KafkaAcl] = set()
    for flow in FLOWS:
        who = flow.principal
        name = topics.physical_name(flow.topic)
        if isinstance(flow, Produces):
            acls.add(KafkaAcl(who, Resource.TOPIC, name, Pattern.LITERAL, Operation.WRITE))
            continue
        acls.add(KafkaAcl(who, Resource.TOPIC, name, Pattern.LITERAL, Operation.READ))
        # Joining, committing to and fetching the offsets of a group all need READ on it.
        group_pattern = Pattern.PREFIXED if flow.group_is_prefix else Pattern.LITERAL
        acls.add(KafkaAcl(who, Resource.GROUP, flow.group, group_pattern, Operation.READ))
    return sorted(acls)


# --- applying them ---------------------------------------------------------------------------------------------------

# (principal, resource type, name, pattern type, operation, permission, host): what identifies a binding on a broker.
BindingKey = tuple[str, str, str, str, str, str, str]


def _key(acl: KafkaAcl) -> BindingKey:
    return (acl.principal, acl.resource.value, acl.name, acl.pattern.value, acl.operation.value, "ALLOW", "*")


def _describe_key(key: BindingKey) -> str:
    who, resource, name, pattern, operation, permission, host = key
    matched = f"{name}*" if pattern == "PREFIXED" else name
    verb = "may" if permission == "ALLOW" else f"{permission.lower()}:"
    origin = "" if host == "*" else f" from {host}"
    return f"{who} {verb} {operation} {resource.lower()} {matched}{origin}"


def _in_scope(key: BindingKey, prefix: str) -> bool:
    """Whether a binding can reach a topic under `prefix` (or is not about topics): those are the ones we own."""
    _who, resource, name, pattern, *_ = key
    if resource != "TOPIC":
        return True
    if pattern == "PREFIXED":
        return name.startswith(prefix) or prefix.startswith(name)
    return name == "*" or name.startswith(prefix)


@dataclass(frozen=True)
class AclReport:
    """What `apply_acls` changed on the broker."""

    target: str
    created: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        counts = f"{len(self.created)} created, {len(self.removed)} removed, {len(self.unchanged)} unchanged"
        out = [f"ACLs on {self.target}: {counts}"]
        out += [f"  created  {line}" for line in self.created]
        out += [f"  removed  {line}" for line in self.removed]
        out += [f"  kept     {line}" for line in self.unchanged]
        return out


def apply_acls(settings: KafkaBusSettings, wanted: Sequence[KafkaAcl]) -> AclReport:
    """Make the broker's ACLs of the principals in `wanted` equal `wanted`: create the missing ones and delete the
    others that can reach a topic under `settings.topics.prefix` or concern groups or the cluster. Idempotent.

    The client of `settings` must be allowed to alter ACLs (a super user). Raises BusError saying what failed.
    """
    # confluent_kafka only here, so the ACL set can be computed (and tested) without it.
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import (  # type: ignore[attr-defined]
        AclBinding,
        AclBindingFilter,
        AclOperation,
        AclPermissionType,
        AdminClient,
        ResourcePatternType,
        ResourceType,
    )

    from fednested.messaging.bus import BusError
    from fednested.messaging.kafka import client_config

    where = f"Kafka at {settings.bootstrap_servers}"
    principals = sorted({acl.principal for acl in wanted})
    admin = AdminClient(client_config(settings))

    def wait(futures: Iterable[Any], action: str) -> list[Any]:
        results = []
        for future in futures:
            try:
                results.append(future.result(timeout=ACL_TIMEOUT_S))
            except KafkaException as error:
                raise BusError(f"{where}: cannot {action}: {error.args[0].str()}") from error
            except TimeoutError:
                raise BusError(f"{where}: no answer within {ACL_TIMEOUT_S:.0f}s to {action}") from None
        return results

    existing: set[BindingKey] = set()
    for who in principals:
        # None matches any name and any host; the stubs type both as str only.
        everything = AclBindingFilter(
            ResourceType.ANY,
            None,  # type: ignore[arg-type]
            ResourcePatternType.ANY,
            who,
            None,  # type: ignore[arg-type]
            AclOperation.ANY,
            AclPermissionType.ANY,
        )
        future = admin.describe_acls(everything, request_timeout=ACL_TIMEOUT_S)
        for binding in wait([future], f"list the ACLs of {who} (is this client a super user?)")[0]:
            key: BindingKey = (
                binding.principal,
                binding.restype.name,
                binding.name,
                binding.resource_pattern_type.name,
                binding.operation.name,
                binding.permission_type.name,
                binding.host,
            )
            if _in_scope(key, settings.topics.prefix):
                existing.add(key)
    wanted_keys = {_key(acl) for acl in wanted}
    to_create = sorted(wanted_keys - existing)
    to_remove = sorted(existing - wanted_keys)

    def binding_args(key: BindingKey) -> tuple[Any, ...]:
        who, resource, name, pattern, operation, permission, host = key
        return (
            ResourceType[resource],
            name,
            ResourcePatternType[pattern],
            who,
            host,
            AclOperation[operation],
            AclPermissionType[permission],
        )

    if to_create:
        bindings = [AclBinding(*binding_args(key)) for key in to_create]
        wait(admin.create_acls(bindings, request_timeout=ACL_TIMEOUT_S).values(), "create ACLs")
    if to_remove:
        filters = [AclBindingFilter(*binding_args(key)) for key in to_remove]
        wait(admin.delete_acls(filters, request_timeout=ACL_TIMEOUT_S).values(), "delete ACLs")
    return AclReport(
        target=where,
        created=tuple(_describe_key(key) for key in to_create),
        removed=tuple(_describe_key(key) for key in to_remove),
        unchanged=tuple(_describe_key(key) for key in sorted(wanted_keys & existing)),
    )
