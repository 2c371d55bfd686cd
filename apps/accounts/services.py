"""Accounts services: every write to users and API tokens, each audited."""

from datetime import timedelta

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from apps.accounts.choices import Role
from apps.accounts.models import ApiToken, User
from apps.accounts.tokens import new_secret, secret_sha256
from apps.governance.actors import Actor, ActorLike
from apps.governance.audit import record_audit_event

API_TOKEN_PREFIX = "fna"
# The account automated work acts as where a person is required (e.g. the requester of an approval request).
SYSTEM_USERNAME = "fednested-system"


def _check_role(role: str) -> Role | str:
    """A valid role, or '' for none (a user with no role may do nothing until given one)."""
    if role == "":
        return ""
    if role not in Role.values:
        raise ValidationError({"role": f"unknown role {role!r}: use one of {', '.join(Role.values)} (or '' for none)"})
    if role == Role.SYSTEM:
        raise ValidationError({"role": f"the system role belongs to the {SYSTEM_USERNAME!r} account only"})
    return Role(role)


@transaction.atomic
def create_user_with_role(
    *, username: str, role: str, actor: ActorLike, email: str = "", password: str | None = None
) -> User:
    """A new active user with `role` ('' for none); without a password it can only authenticate with API tokens."""
    checked_role = _check_role(role)
    if User.objects.filter(username=username).exists():
        raise ValidationError({"username": f"user {username!r} already exists"})
    user = User(username=username, email=email, role=checked_role)
    if password:
        user.set_password(password)
    else:
        user.set_unusable_password()
    user.full_clean()
    user.save()
    record_audit_event(actor=actor, verb="accounts.user.created", target=user, data={"role": checked_role})
    return user


@transaction.atomic
def set_user_role(user: User, role: str, *, actor: ActorLike) -> User:
    """Give `user` another role ('' removes every right)."""
    new_role = _check_role(role)
    old_role = user.role
    User.objects.filter(pk=user.pk).update(role=new_role)
    user.refresh_from_db(fields=["role"])
    record_audit_event(
        actor=actor, verb="accounts.user.role_changed", target=user, data={"from": old_role, "to": new_role}
    )
    return user


@transaction.atomic
def issue_api_token(user: User, *, actor: ActorLike, name: str) -> tuple[ApiToken, str]:
    """A new API token for `user`: the row and the plaintext, which is never stored and cannot be shown again."""
    if not name.strip():
        raise ValidationError({"name": "an API token needs a name saying what it is for"})
    plaintext = new_secret(API_TOKEN_PREFIX)
    token = ApiToken.objects.create(
        user=user, name=name.strip()[:100], key_prefix=plaintext[:12], key_sha256=secret_sha256(plaintext)
    )
    record_audit_event(
        actor=actor,
        verb="accounts.api_token.issued",
        target=token,
        data={"user": user.username, "name": token.name, "key_prefix": token.key_prefix},
    )
    return token, plaintext


@transaction.atomic
def revoke_api_token(token: ApiToken, *, actor: ActorLike) -> bool:
    """Revoke one token; False (and no audit row) when it was already revoked."""
    revoked = ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    token.refresh_from_db(fields=["revoked_at"])
    if revoked:
        record_audit_event(
            actor=actor,
            verb="accounts.api_token.revoked",
            target=token,
            data={"user": token.user.username, "key_prefix": token.key_prefix},
        )
    return bool(revoked)


@transaction.atomic
def deactivate_user(user: User, *, actor: ActorLike, reason: str) -> User:
    """Sign `user` out for good: inactive, every API token revoked."""
    User.objects.filter(pk=user.pk).update(is_active=False)
    user.refresh_from_db(fields=["is_active"])
    for token in ApiToken.objects.filter(user=user, revoked_at__isnull=True):
        revoke_api_token(token, actor=actor)
    record_audit_event(actor=actor, verb="accounts.user.deactivated", target=user, data={"reason": reason})
    return user


def system_user() -> User:
    """The `system` account workers act as (created, audited, on first use): it requests approval of versions that
    automated rounds produced, so an officer — never the system itself — decides.

    It has an unusable password and no API token, and its role has no API rights: nobody can sign in as it.
    """
    user = User.objects.filter(username=SYSTEM_USERNAME).first()
    if user is not None:
        if user.role != Role.SYSTEM or not user.is_active:
            raise ValidationError(
                {"username": f"account {SYSTEM_USERNAME!r} exists but is not the active system account; fix it"}
            )
        return user
    try:
        with transaction.atomic():
            user = User(username=SYSTEM_USERNAME, role=Role.SYSTEM)
            user.set_unusable_password()
            user.save()
            record_audit_event(
                actor=Actor.automation(),
                verb="accounts.user.created",
                target=user,
                data={"role": Role.SYSTEM, "system": True},
            )
    except IntegrityError:
        # Two workers created it at once; the other one's row is the account.
        user = User.objects.get(username=SYSTEM_USERNAME)
    return user


def record_api_token_use(token: ApiToken, *, min_interval_s: int = 60) -> None:
    """Bookkeeping, not a state change (no audit): refresh last_used_at, at most once a minute per token."""
    now = timezone.now()
    stale_before = now - timedelta(seconds=min_interval_s)
    if token.last_used_at is not None and token.last_used_at >= stale_before:
        return  # the row was just read with a fresh value: no statement at all on most requests
    ApiToken.objects.filter(pk=token.pk).filter(Q(last_used_at__isnull=True) | Q(last_used_at__lt=stale_before)).update(
        last_used_at=now
    )
