"""Refused access as audit events: failed authentication and refused permission on the REST API, the console and
the sign-in page, each recorded as `accounts.access.refused` with the acting party's kind and the reason.

A flood of refused requests must not grow the trail with it, so each party and reason (`Actor` kind and label, the
reason code) gets at most one event per FEDNESTED_ACCESS_AUDIT_WINDOW seconds in each control-plane process; the
refusals in between are counted in the cache and the next event of that party and reason carries the count
(`repeats_since_last_event`). The number of distinct keys is bounded too: labels are accounts and enrolled client
ids (or one `anonymous` label for whoever has no valid credential; a token, a user name typed at sign-in or a
certificate name that matches nothing never becomes a label), and reasons are the error codes of our own code.

Nothing secret or sent by the client is stored: no token (not even its prefix), no password, no request body, no
query string; the path (truncated) and the refusal's code, and for permission refusals the server's own message.
Allowed decisions on sensitive actions (approve, reject, override, revoke, enroll) are audited by their services as
the state changes they are, so they are not recorded again here.
"""

import contextlib
import hashlib
import logging
import re
from typing import Any

from django.conf import settings
from django.contrib.auth.signals import user_login_failed
from django.core.cache import cache
from django.db import DatabaseError, transaction
from django.dispatch import receiver
from django.http import HttpRequest, HttpResponse
from django.views.csrf import csrf_failure as django_csrf_failure
from rest_framework.exceptions import APIException, AuthenticationFailed, NotAuthenticated, PermissionDenied
from rest_framework.request import Request

from apps.accounts.models import User
from apps.governance.actors import Actor
from apps.governance.audit import record_audit_event
from apps.governance.models import AuditEvent

logger = logging.getLogger(__name__)

REFUSED_VERB = "accounts.access.refused"
# Counts of suppressed refusals wait this long for the party's next event before they expire (a day).
REPEATS_TTL_S = 86_400
# Reason codes: what our own code and DRF name a refusal with. Anything else is recorded as `other` (so a code
# derived from input could never widen the set of keys).
_REASON = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
MAX_WHERE = 200
MAX_DETAIL = 300
_RECORDED_ATTR = "_fednested_refusal_recorded"


class CredentialsRefused(AuthenticationFailed):
    """An authentication failure that says whom it refused (a revoked token's owner, a certificate's device, else
    `anonymous`) and why, in more detail than the response's code (`reason`, default the code): raised by the
    authentication classes so that the audit event names them."""

    def __init__(self, detail: str, *, actor: Actor, code: str | None = None, reason: str = "") -> None:
        super().__init__(detail, code)
        self.actor = actor
        self.reason = reason or _code(self)


def window_keys(actor: Actor, reason: str) -> tuple[str, str]:
    """The cache keys of a party and reason: its window's gate and its count of refusals not recorded."""
    digest = hashlib.sha256(f"{actor.kind}\x00{actor.label}\x00{reason}".encode()).hexdigest()[:32]
    return f"fednested:access-refused:gate:{digest}", f"fednested:access-refused:repeats:{digest}"


def _take_repeats(key: str) -> int:
    """The refusals counted since the last event, reset by the amount read (a count added meanwhile stays)."""
    count = int(cache.get(key, 0))
    if count:
        # Expired between the read and the decrement (ValueError): nothing is left to reset.
        with contextlib.suppress(ValueError):
            cache.decr(key, count)
    return count


def _count_repeat(key: str) -> None:
    cache.add(key, 0, timeout=REPEATS_TTL_S)
    try:
        cache.incr(key)
    except ValueError:  # expired between add and incr: start again at one
        cache.add(key, 1, timeout=REPEATS_TTL_S)


def record_access_refusal(
    actor: Actor, *, reason: str, where: str, status: int | None, detail: str = ""
) -> AuditEvent | None:
    """Record that `actor` was refused at `where` (e.g. `API POST /api/v1/approvals/3/approve/`) for `reason`.

    Returns the event, or None when the window's bound counted it instead (see the module docstring). Never raises
    for a database failure: refusing the request matters more than recording it, and the failure is logged.
    """
    reason = reason if _REASON.match(reason) else "other"
    window = int(settings.FEDNESTED_ACCESS_AUDIT_WINDOW)
    repeats = 0
    if window > 0:
        gate, counter = window_keys(actor, reason)
        if not cache.add(gate, 1, timeout=window):
            _count_repeat(counter)
            return None
        repeats = _take_repeats(counter)
    data: dict[str, Any] = {"reason": reason, "where": where[:MAX_WHERE]}
    if status is not None:
        data["status"] = status
    if detail:
        data["detail"] = detail[:MAX_DETAIL]
    if repeats:
        data["repeats_since_last_event"] = repeats
    try:
        with transaction.atomic():
            return record_audit_event(actor=actor, verb=REFUSED_VERB, data=data)
    except DatabaseError:
        # The request's own log line (same request id) says where; this one says what was not recorded.
        logger.exception("could not record a refusal (%s) of %s in the audit trail", reason, actor.label)
        return None


def _where(request: HttpRequest, channel: str) -> str:
    return f"{channel} {request.method} {request.path}"


def _first_refusal_of(request: HttpRequest) -> bool:
    """True once per request: a request refused twice over (the console's CSRF page is also its 403 page) is one
    access decision, recorded with the first, most specific reason."""
    if getattr(request, _RECORDED_ATTR, False):
        return False
    setattr(request, _RECORDED_ATTR, True)
    return True


def record_api_refusal(exc: Exception, request: Request | None, status: int) -> None:
    """For the API's exception handler: record a 401 or 403 (authentication failed, no credentials, permission
    refused), against the party `exc` names, else the request's user (anonymous when authentication failed)."""
    if request is None or not isinstance(exc, AuthenticationFailed | NotAuthenticated | PermissionDenied):
        return
    if isinstance(exc, CredentialsRefused):
        actor, reason = exc.actor, exc.reason
    else:
        actor, reason = Actor.of_request(request), _code(exc)
    # Authentication messages may echo what the client sent; a permission refusal's message is the server's own.
    detail = str(exc.detail) if isinstance(exc, PermissionDenied) else ""
    record_access_refusal(actor, reason=reason, where=_where(request, "API"), status=status, detail=detail)


def _code(exc: APIException) -> str:
    codes = exc.get_codes()
    return codes if isinstance(codes, str) else exc.default_code


def record_console_refusal(request: HttpRequest, message: str, *, channel: str = "console") -> None:
    """For a 403 page (the console's; Django's handler403 as channel `web`): the signed-in user was refused a page or
    an action; `message` says why."""
    if not _first_refusal_of(request):
        return
    record_access_refusal(
        Actor.of_request(request), reason="forbidden", where=_where(request, channel), status=403, detail=message
    )


def record_csrf_refusal(request: HttpRequest) -> None:
    """A form post without a valid session or CSRF token (a forged post, or a page kept open across a sign-out)."""
    if _first_refusal_of(request):
        record_access_refusal(Actor.of_request(request), reason="csrf_failed", where=_where(request, "web"), status=403)


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    """A CSRF_FAILURE_VIEW for pages outside the console: Django's own page, the refusal recorded."""
    record_csrf_refusal(request)
    return django_csrf_failure(request, reason=reason)


@receiver(user_login_failed, dispatch_uid="fednested-audit-sign-in-failed")
def record_sign_in_failure(
    sender: Any, credentials: dict[str, Any], request: HttpRequest | None = None, **_: Any
) -> None:
    """A failed sign-in (console or admin): against the account named, when one exists, else `anonymous`. The
    name typed is not stored otherwise (it may be a mistyped password); Django has already hidden the password.

    This is a signal receiver because Django's sign-in (`authenticate`) reports failures only through this signal.
    """
    username = credentials.get("username")
    user = User.objects.filter(username=username).first() if isinstance(username, str) and username else None
    actor = Actor.of_user(user) if user is not None else Actor.anonymous()
    where = _where(request, "web") if request is not None else "sign-in"
    # No status: the sign-in page answers the failure with the form again.
    record_access_refusal(actor, reason="sign_in_failed", where=where, status=None)
