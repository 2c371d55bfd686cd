"""WSGI entry point (HTTP only); deployments that need websockets serve controlplane.asgi instead."""

import os
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")

from controlplane.observability import setup_tracing
from fednested.observability.tracing import CONTROLPLANE_WEB

# Before the application is built: Django's instrumentation adds its middleware to the chain built below.
setup_tracing(CONTROLPLANE_WEB, django=True)
django_application = get_wsgi_application()


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Django's WSGI application, with the request target kept as the server received it (RAW_URI, as gunicorn sets
    it). Without one, OpenTelemetry's middleware rebuilds the URL from PATH_INFO, which Django has replaced by the
    decoded UTF-8 path by then: a path with characters beyond Latin-1 failed the request with a 500 instead of a 404."""
    if "RAW_URI" not in environ and "REQUEST_URI" not in environ:
        # PEP 3333: PATH_INFO holds the path's bytes as Latin-1 characters here, before Django decodes it.
        target = quote(environ.get("PATH_INFO", ""), safe="/;=,", encoding="latin-1")
        query = environ.get("QUERY_STRING", "")
        environ["RAW_URI"] = f"{target}?{query}" if query else target
    return django_application(environ, start_response)
