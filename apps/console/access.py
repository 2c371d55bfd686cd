"""Who may see which console page: signed-in people with a role (officers for the audit log); devices never."""

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.shortcuts import render
from django.urls import reverse

from apps.accounts.choices import Role
from apps.accounts.refusals import record_console_refusal
from apps.accounts.roles import role_of

# Devices authenticate with API tokens only, and outsiders (no role) may do nothing: neither gets a page.
READER_ROLES = frozenset({Role.OFFICER, Role.ENGINEER, Role.ADMIN})
AUDIT_READER_ROLES = frozenset({Role.OFFICER, Role.ADMIN})

View = Callable[..., HttpResponseBase]  # pages, redirects and streamed downloads


def render_page(
    request: HttpRequest, template: str, context: dict[str, Any], *, nav: str = "", status: int = 200
) -> HttpResponse:
    """Render a console page with what the layout needs: the user's role and which navigation entry is current."""
    role = role_of(request.user)
    layout = {
        "nav": nav,
        "role": role.label if role else "",
        "is_officer": role == Role.OFFICER,
        "can_read_audit": role in AUDIT_READER_ROLES,
    }
    return render(request, template, {**layout, **context}, status=status)


def forbidden(request: HttpRequest, message: str, *, back_url: str = "") -> HttpResponse:
    """A 403 page that says why, in the console's layout."""
    record_console_refusal(request, message)  # every console refusal is an audit event (apps.accounts.refusals)
    return render_page(request, "console/forbidden.html", {"message": message, "back_url": back_url}, status=403)


def console_page(roles: frozenset[Role] = READER_ROLES) -> Callable[[View], View]:
    """Send anonymous visitors to sign in; answer 403 to users whose role is not in `roles`."""

    def decorate(view: View) -> View:
        @wraps(view)
        def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            if not request.user.is_authenticated:
                return redirect_to_login(request.get_full_path(), login_url=reverse("console:sign-in"))
            role = role_of(request.user)
            if role not in roles:
                allowed = ", ".join(sorted(str(r.label).lower() + "s" for r in roles))
                return forbidden(request, f"This page is for {allowed}; your account has no such role.")
            return view(request, *args, **kwargs)

        return wrapped

    return decorate
