"""Request limits that must hold before a body is read: Django's ASGI handler copies a whole request body into a
temporary file before any view (or its size and credential checks) runs, so this ASGI wrapper answers first.

- A body whose Content-Length exceeds its route's limit gets 413 at once, unread: FEDNESTED_MAX_UPDATE_BYTES on the
  payload upload route, FEDNESTED_MAX_REQUEST_BYTES everywhere else. A body without Content-Length (chunked) is
  counted as it arrives and cut off with 413 once it passes the limit.
- An upload that carries no credentials at all (no Authorization header, no session cookie, no client certificate
  name from the proxy) gets 401 unread: only an enrolled device may make the server take 64 MiB.

Servers that stream bodies to the application (uvicorn, hypercorn) then never receive the rest; daphne buffers the
whole request itself before it calls the application, so in front of daphne the proxy must cap body sizes too.
"""

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from django.conf import settings
from django.urls import Resolver404, resolve

from fednested.infra.haproxy import CLIENT_CN_HEADER, PAYLOAD_TOO_LARGE

# As django.core.handlers.asgi.ASGIHandler types them.
Scope = dict[str, Any]
Message = Mapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# The route whose body is an update payload (apps/federation/api: UpdateViewSet.payload, router basename "update").
PAYLOAD_UPLOAD_URL_NAME = "update-payload"
# The last segment of that route (checked against the URL conf by a test).
PAYLOAD_ROUTE_SUFFIX = "/payload"
# Set by HAProxy to the CN of a verified client certificate: credentials for this check (whether they are good is the
# authentication's business, apps.accounts.authentication).
PROXY_CLIENT_CN_HEADER = CLIENT_CN_HEADER.lower().encode("latin-1")


def is_payload_upload(scope: Scope) -> bool:
    path: str = scope.get("path", "")
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        path = path[len(root_path) :]
    # The route ends in `payload/`: any other path cannot resolve to it, and is spared a URL resolution here (it
    # was a tenth of a server worker's CPU under bench-api, on top of the resolution Django does itself).
    if not path.rstrip("/").endswith(PAYLOAD_ROUTE_SUFFIX):
        return False
    try:
        match = resolve(path)
    except Resolver404:
        return False
    return match.url_name == PAYLOAD_UPLOAD_URL_NAME


def has_credentials(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the request carries any credential at all (its validity is the view's business)."""
    session_cookie = settings.SESSION_COOKIE_NAME.encode("latin-1") + b"="
    for name, value in headers:
        lowered = name.lower()
        if lowered in (b"authorization", PROXY_CLIENT_CN_HEADER) and value.strip():
            return True
        if lowered == b"cookie" and any(part.strip().startswith(session_cookie) for part in value.split(b";")):
            return True
    return False


def declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The Content-Length header's value; None when absent; -1 when it is not one non-negative integer."""
    values = {value.strip() for name, value in headers if name.lower() == b"content-length"}
    if not values:
        return None
    if len(values) > 1 or not all(value.isdigit() for value in values):
        return -1
    return int(values.pop())


async def respond(send: Send, status: int, detail: str, code: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail, "code": code}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                # The rest of the body is not read: the connection cannot carry another request.
                (b"connection", b"close"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestLimits:
    """ASGI middleware applying the module's limits to HTTP requests; other scopes pass through untouched."""

    def __init__(self, app: AsgiApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = [(bytes(name), bytes(value)) for name, value in scope.get("headers", [])]
        upload = is_payload_upload(scope)
        if upload and not has_credentials(headers):
            await respond(
                send,
                401,
                "uploading an update payload needs credentials: send 'Authorization: Token <device token>'",
                "not_authenticated",
                [(b"www-authenticate", b"Token")],
            )
            return
        limit: int = settings.FEDNESTED_MAX_UPDATE_BYTES if upload else settings.FEDNESTED_MAX_REQUEST_BYTES
        length = declared_length(headers)
        if length == -1:
            await respond(send, 400, "the Content-Length header is not one non-negative integer", "bad_request")
            return
        if length is not None and length > limit:
            await respond(send, 413, too_large(length, limit), PAYLOAD_TOO_LARGE)
            return
        exchange = LimitedExchange(receive, send, limit)
        await self.app(scope, exchange.receive, exchange.send)


def too_large(size: int, limit: int) -> str:
    return f"the request body of {size} bytes is larger than the {limit} bytes this route accepts"


class LimitedExchange:
    """The application's `receive` and `send` for one request: `receive` counts body bytes, and past `limit` answers
    413 itself and tells the application that the client left; `send` then drops what the application sends."""

    def __init__(self, receive: Receive, send: Send, limit: int) -> None:
        self._receive = receive
        self._send = send
        self.limit = limit
        self.received = 0
        self.cut_off = False

    async def receive(self) -> Message:
        if self.cut_off:
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                self.cut_off = True
                await respond(self._send, 413, too_large(self.received, self.limit), PAYLOAD_TOO_LARGE)
                # Django's handler stops reading and sends nothing on a disconnect (RequestAborted).
                return {"type": "http.disconnect"}
        return message

    async def send(self, message: Message) -> None:
        if not self.cut_off:
            await self._send(message)
