"""The acting party of every audited action: one typed value for people, devices and automation.

Services take it as `actor=` and the audit trail stores its kind and label (apps.governance.audit). Callers build it
from what they know: a view from its request (`Actor.of_request`), a worker from its name (`Actor.automation`), the
enrollment flow from the client id (`Actor.device`). `as_actor` is the one adapter for services that also accept a
user account (the registry's, governance's, accounts' and the federation's operator services, called with a User by
the demo, the admin and the tests) or None for the system.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.http import HttpRequest

from apps.accounts.choices import Role
from apps.governance.choices import ActorKind

if TYPE_CHECKING:
    from apps.accounts.models import User

# AuditEvent.actor_label's column width.
MAX_LABEL = 200
DEVICE_PREFIX = "device:"
SYSTEM_LABEL = "system"
ANONYMOUS_LABEL = "anonymous"
# Labels name a party, they do not describe it: printable, no line breaks (they are CSV cells and log fields).
_LABEL = re.compile(r"^[^\x00-\x1f\x7f]{1,200}$")

# What services that also take a user account accept as `actor=` (see `as_actor`).
ActorLike: TypeAlias = "Actor | AbstractBaseUser | AnonymousUser | None"


@dataclass(frozen=True)
class Actor:
    """Who acted: `kind`, the `label` the audit trail names it by, and the user row of people and devices.

    The label is what the hash chain commits to (it outlives the user row): a person's username, `device:<client
    id>` for a device, the worker's or command's own name for automation (`worker:aggregation`, `system:jobs`).
    """

    kind: ActorKind
    label: str
    user: User | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not _LABEL.match(self.label):
            raise ValueError(f"actor label {self.label[:80]!r}: 1 to {MAX_LABEL} printable characters, no line breaks")
        if self.user is not None and self.kind not in (ActorKind.PERSON, ActorKind.DEVICE, ActorKind.AUTOMATION):
            raise ValueError(f"an {self.kind} actor has no user row (got {self.user.get_username()!r})")

    @classmethod
    def person(cls, user: User) -> Actor:
        """A signed-in person (an officer, an engineer, an admin): named by username."""
        return cls(ActorKind.PERSON, user.get_username(), user)

    @classmethod
    def device(cls, client_id: str, user: User | None = None) -> Actor:
        """An edge device, named by its client id (with its account when it has authenticated as one)."""
        return cls(ActorKind.DEVICE, f"{DEVICE_PREFIX}{client_id}"[:MAX_LABEL], user)

    @classmethod
    def automation(cls, name: str = SYSTEM_LABEL) -> Actor:
        """The control plane's own work: a worker (`worker:ingest`), a scheduler (`system:jobs`), a command."""
        return cls(ActorKind.AUTOMATION, name)

    @classmethod
    def anonymous(cls) -> Actor:
        """A party with no or an unknown credential (refused access only)."""
        return cls(ActorKind.ANONYMOUS, ANONYMOUS_LABEL)

    @classmethod
    def of_user(cls, user: AbstractBaseUser | AnonymousUser | None) -> Actor:
        """The actor a user account acts as: its device for a device's account, automation for the system
        account, a person otherwise; anonymous when the user is not authenticated."""
        from apps.accounts.models import User

        if not isinstance(user, User) or not user.is_authenticated:
            return cls.anonymous()
        if user.role == Role.DEVICE:
            from apps.federation.models import EdgeDevice  # federation imports the audit writer: import when used

            client_id = EdgeDevice.objects.filter(user=user).values_list("client_id", flat=True).first()
            if client_id is not None:
                return cls.device(client_id, user)
        if user.role == Role.SYSTEM:
            return cls(ActorKind.AUTOMATION, user.get_username(), user)
        return cls.person(user)

    @classmethod
    def of_request(cls, request: HttpRequest) -> Actor:
        """Who sent `request` (a Django or DRF request), as far as its authentication has established."""
        return cls.of_user(getattr(request, "user", None))


def as_actor(actor: ActorLike) -> Actor:
    """The acting party of an `actor=` that may be a user account: an Actor passes through, a user acts as what its
    account is (`Actor.of_user`), and None (or a user that is not signed in) is the control plane itself (system)."""
    if isinstance(actor, Actor):
        return actor
    party = Actor.of_user(actor)
    return Actor.automation() if party.kind == ActorKind.ANONYMOUS else party
