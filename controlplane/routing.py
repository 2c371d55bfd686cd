"""Websocket routes served by controlplane.asgi: the console's live feed of decisions and new candidates."""

from django.urls import URLPattern, URLResolver, path

from apps.console.consumers import ConsoleConsumer

websocket_urlpatterns: list[URLPattern | URLResolver] = [
    path("ws/console/", ConsoleConsumer.as_asgi()),
]
