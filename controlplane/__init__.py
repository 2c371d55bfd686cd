"""The fednested control plane Django project (settings, URLs, ASGI/WSGI entry points, Celery app)."""

# Loading the Celery app with Django makes `@shared_task` in workers bind to it (Celery's Django recipe).
from controlplane.celery import app as celery_app

__all__ = ["celery_app"]
