"""WSGI entry point (HTTP only); deployments that need websockets serve controlplane.asgi instead."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")

application = get_wsgi_application()
