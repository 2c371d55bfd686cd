"""The console's websocket: signed-in people with a console role join the live group and receive its events.

The session cookie authenticates the socket (AuthMiddlewareStack in controlplane.asgi), and the same roles as the
pages apply (apps.console.access.READER_ROLES): anonymous visitors, devices and outsiders are refused at the handshake.
The socket only listens: a page acts through its forms, where CSRF and the governance services decide.
"""

import asyncio
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from apps.accounts.roles import role_of
from apps.console.access import READER_ROLES
from apps.console.live import CONSOLE_GROUP, note_socket_loop

# Close codes in the application range (4000–4999), so the page can tell a refusal from a dropped connection.
CLOSE_NOT_SIGNED_IN = 4401
CLOSE_NO_ROLE = 4403


class ConsoleConsumer(AsyncJsonWebsocketConsumer):  # type: ignore[misc]
    """One open console page."""

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_NOT_SIGNED_IN)
            return
        if await database_sync_to_async(role_of)(user) not in READER_ROLES:
            await self.close(code=CLOSE_NO_ROLE)
            return
        note_socket_loop(asyncio.get_running_loop())
        await self.channel_layer.group_add(CONSOLE_GROUP, self.channel_name)
        self.joined = True
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if getattr(self, "joined", False):
            await self.channel_layer.group_discard(CONSOLE_GROUP, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        # Nothing a page sends is acted on; ignoring it (rather than closing) keeps a chatty proxy's pings harmless.
        return None

    async def console_event(self, message: dict[str, Any]) -> None:
        await self.send_json(message["event"])
