"""The web server's side: a middleware that times every request by its route name, and the `/metrics` view.

`/metrics` is for the deployment's Prometheus, never for devices: it answers a direct request from an address in
FEDNESTED_METRICS_ALLOWED_NETWORKS (loopback by default), or any request with `Authorization: Bearer
<FEDNESTED_METRICS_TOKEN>`. A request that came through HAProxy (it adds X-Forwarded-For and its secret header to
every request) arrives from HAProxy's address, often loopback, so it needs the token whatever that address is.
"""

import hmac
import ipaddress
import time
from collections.abc import Callable
from functools import cache

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from controlplane.metrics.database import DatabaseCollector
from controlplane.metrics.exposition import Scrape
from controlplane.metrics.families import record_request
from fednested.infra.haproxy import PROXY_SECRET_HEADER

# The label of requests no route matched (404s of unknown paths): one series for all of them.
UNMATCHED = "<unmatched>"
PROXY_HEADERS = ("X-Forwarded-For", PROXY_SECRET_HEADER)


def view_label(request: HttpRequest) -> str:
    """The matched route's name (`update-list`, `admin:index`), its pattern when it has no name, or UNMATCHED."""
    match = request.resolver_match
    if match is None:
        return UNMATCHED
    return match.view_name or match.route or UNMATCHED


class RequestMetricsMiddleware:
    """Counts and times each request (fednested_http_requests_total, fednested_http_request_duration_seconds).

    Placed first in MIDDLEWARE so the time includes every other middleware; an exception becomes Django's 500
    response before it gets here, so failures are counted with their status too. Requests the ASGI layer answers
    before Django (controlplane/limits.py: oversized bodies) are not seen here; the access log has them.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        started = time.perf_counter()
        response = self.get_response(request)
        record_request(view_label(request), request.method or "", response.status_code, time.perf_counter() - started)
        return response


def allowed_networks() -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(network) for network in settings.FEDNESTED_METRICS_ALLOWED_NETWORKS)


def may_scrape(request: HttpRequest) -> bool:
    """Whether `request` may read the metrics (see the module's docstring)."""
    token: str = settings.FEDNESTED_METRICS_TOKEN
    if token:
        presented = request.headers.get("Authorization", "")
        if hmac.compare_digest(presented.encode(), f"Bearer {token}".encode()):
            return True
    if any(header in request.headers for header in PROXY_HEADERS):
        return False
    try:
        address = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
    except ValueError:
        return False
    return any(address in network for network in allowed_networks())


@cache
def _registry() -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Scrape([DatabaseCollector()]))
    return registry


def metrics_view(request: HttpRequest) -> HttpResponse:
    """GET /metrics: Prometheus' text format, for the scrapers FEDNESTED_METRICS_* allow; 404 for anyone else, so
    the route's existence is not advertised to devices."""
    if not may_scrape(request):
        return HttpResponse("Not Found\n", status=404, content_type="text/plain; charset=utf-8")
    if request.method not in ("GET", "HEAD"):
        return HttpResponse("Method Not Allowed\n", status=405, headers={"Allow": "GET, HEAD"})
    return HttpResponse(generate_latest(_registry()), content_type=CONTENT_TYPE_LATEST)
