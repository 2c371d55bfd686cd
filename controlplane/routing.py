"""Websocket routes served by controlplane.asgi (live round/approval feeds for the UI land here)."""

from django.urls import URLPattern, URLResolver

websocket_urlpatterns: list[URLPattern | URLResolver] = []
