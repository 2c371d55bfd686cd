"""ASGI entry point: Channels routes HTTP to Django and websockets to controlplane.routing; request limits
(controlplane/limits.py) answer oversized or credential-less uploads before Django reads their bodies."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")

from controlplane.observability import setup_tracing
from fednested.observability.tracing import CONTROLPLANE_WEB

# Before the application is built: Django's instrumentation adds its middleware to the chain built below.
setup_tracing(CONTROLPLANE_WEB, django=True)
# Django must be set up before anything imports models (the websocket consumers and auth middleware do).
django_asgi_application = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from controlplane.limits import RequestLimits  # noqa: E402
from controlplane.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": RequestLimits(django_asgi_application),
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
