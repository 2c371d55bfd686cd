"""WSGI entry point (HTTP only); deployments that need websockets serve controlplane.asgi instead."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")

from controlplane.observability import setup_tracing
from fednested.observability.tracing import CONTROLPLANE_WEB

# Before the application is built: Django's instrumentation adds its middleware to the chain built below.
setup_tracing(CONTROLPLANE_WEB, django=True)
application = get_wsgi_application()
