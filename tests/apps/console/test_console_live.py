"""The live console's server side: the audit signal's receiver broadcasts decisions only after they commit, a
broadcast that fails never fails the decision, and the websocket admits signed-in people with a console role only
(anonymous visitors, devices and outsiders are refused at the handshake) and delivers the group's events to them.

Run against both channel layers: the in-memory one of the demo, and Redis (the deployment's, REDIS_URL from the
project's services) under a prefix of this test's own so that other runs on the same Redis never reach it.
"""

import asyncio
import logging
import uuid
from typing import Any

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.conf import settings as django_settings
from django.db import connection, transaction
from django.test import Client

from apps.console.consumers import CLOSE_NO_ROLE, CLOSE_NOT_SIGNED_IN
from apps.console.live import CONSOLE_GROUP
from apps.governance.choices import ApprovalStatus
from apps.governance.models import ApprovalRequest
from apps.governance.services import approve_version, reject_version
from tests.apps.console.conftest import CANDIDATE_SCORES, _register
from tests.conftest import Member

ORIGIN = (b"origin", b"http://127.0.0.1")


def _layers(kind: str) -> dict[str, Any]:
    if kind == "memory":
        return {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    if not django_settings.REDIS_URL:
        pytest.fail("REDIS_URL is not set: source var/services/env.sh (scripts/services.sh starts Redis)")
    config = {
        "hosts": django_settings.CHANNEL_LAYERS["default"]["CONFIG"]["hosts"],
        "prefix": f"test-console-{uuid.uuid4().hex[:8]}",
    }
    return {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": config}}


async def _listen(layer: Any) -> str:
    channel: str = await layer.new_channel()
    await layer.group_add(CONSOLE_GROUP, channel)
    return channel


async def _next(layer: Any, channel: str, timeout: float = 5.0) -> dict[str, Any]:
    message: dict[str, Any] = await asyncio.wait_for(layer.receive(channel), timeout)
    return message


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_a_decision_is_broadcast_once_it_commits_and_a_rollback_sends_nothing(
    transactional_db: Any, cast: dict[str, Member], scene: dict[str, Any], settings: Any, kind: str
) -> None:
    settings.CHANNEL_LAYERS = _layers(kind)
    layer = get_channel_layer()

    async def scenario() -> list[dict[str, Any]]:
        channel = await _listen(layer)

        def decide_then_fail() -> None:
            with transaction.atomic():
                reject_version(scene["approval"], actor=cast["officer"].user, reason="legal regresses")
                raise RuntimeError("the caller's transaction fails after the decision")

        def roll_back() -> None:
            with pytest.raises(RuntimeError, match="fails after the decision"):
                decide_then_fail()

        await sync_to_async(roll_back)()
        with pytest.raises(asyncio.TimeoutError):
            await _next(layer, channel, timeout=0.5)
        await sync_to_async(approve_version)(scene["approval"], actor=cast["officer"].user, reason="cooking improves")
        received = []
        try:
            while True:
                received.append((await _next(layer, channel, timeout=1.0))["event"])
        except TimeoutError:
            return received

    events = async_to_sync(scenario)()
    verbs = [event["verb"] for event in events]
    assert "governance.approval.approved" in verbs
    assert "governance.approval.rejected" not in verbs
    approved = next(event for event in events if event["verb"] == "governance.approval.approved")
    assert approved | {"at": "-"} == {
        "verb": "governance.approval.approved",
        "actor": "olivia-officer",
        "at": "-",
        "approval": scene["approval"].pk,
        "approval_status": "approved",
        "requested_by": "eric-engineer",
        "version_id": "v2",
        "version_status": "candidate",  # the approval's own event comes before the version's status change
    }
    champion = [event for event in events if event["verb"] == "registry.version.status_changed"]
    assert {(event["version_id"], event["version_status"]) for event in champion} == {
        ("v1", "archived"),
        ("v2", "champion"),
    }
    # Only identifiers and statuses travel, never the reason.
    assert all("cooking improves" not in str(event) for event in events)


def test_a_broadcast_that_fails_never_fails_the_decision(
    transactional_db: Any, cast: dict[str, Member], scene: dict[str, Any], settings: Any, caplog: Any
) -> None:
    # A Redis that is not there (port 9 on loopback refuses connections): the decision commits, the failure is logged.
    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": ["redis://127.0.0.1:9/0"]}}
    }
    with caplog.at_level(logging.ERROR, logger="apps.console.live"):
        approve_version(scene["approval"], actor=cast["officer"].user, reason="cooking improves")
    assert ApprovalRequest.objects.get(pk=scene["approval"].pk).status == ApprovalStatus.APPROVED
    assert any("could not broadcast governance.approval.approved of v2" in r.getMessage() for r in caplog.records)


def _session_cookie(member: Member) -> tuple[bytes, bytes]:
    client = Client()
    assert member.user is not None
    client.force_login(member.user)
    return (
        b"cookie",
        f"{django_settings.SESSION_COOKIE_NAME}={client.cookies[django_settings.SESSION_COOKIE_NAME].value}".encode(),
    )


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_the_socket_admits_console_roles_only_and_delivers_decisions(
    transactional_db: Any, cast: dict[str, Member], scene: dict[str, Any], settings: Any, kind: str
) -> None:
    settings.CHANNEL_LAYERS = _layers(kind)
    from controlplane.asgi import application

    async def connect(*headers: tuple[bytes, bytes]) -> tuple[WebsocketCommunicator, bool, int | None]:
        communicator = WebsocketCommunicator(application, "/ws/console/", headers=[ORIGIN, *headers])
        connected, code = await communicator.connect(timeout=5)
        return communicator, connected, code

    cookies = {member: _session_cookie(cast[member]) for member in ("device", "outsider", "officer", "engineer")}

    async def scenario() -> dict[str, Any]:
        refusals = [
            ((), CLOSE_NOT_SIGNED_IN),
            ((cookies["device"],), CLOSE_NO_ROLE),
            ((cookies["outsider"],), CLOSE_NO_ROLE),
        ]
        for refused, expected in refusals:
            _communicator, connected, code = await connect(*refused)
            assert (connected, code) == (False, expected)
        # A page of another site (its Origin not one of ALLOWED_HOSTS) is refused before any session is read.
        foreign = WebsocketCommunicator(
            application, "/ws/console/", headers=[(b"origin", b"http://evil.example"), cookies["officer"]]
        )
        assert (await foreign.connect(timeout=5))[0] is False
        engineer, connected, _ = await connect(cookies["engineer"])
        assert connected
        if kind == "redis":
            # Longer than channels_redis's blocking pop (5 s), which redis-py 8's default socket timeout (also 5 s)
            # used to cut: the socket must still be there after an idle spell (controlplane/settings.py).
            await asyncio.sleep(6)
        await sync_to_async(approve_version)(scene["approval"], actor=cast["officer"].user, reason="fine")
        while True:
            event: dict[str, Any] = await engineer.receive_json_from(timeout=5)
            if event["verb"] == "governance.approval.approved":
                break
        # A job in a plain thread of the process (the demo runs its jobs so) registers a candidate: announced too.
        await asyncio.get_running_loop().run_in_executor(None, register_in_a_plain_thread)
        while True:
            announced: dict[str, Any] = await engineer.receive_json_from(timeout=5)
            if announced["verb"] == "registry.version.registered":
                break
        await engineer.disconnect()
        return event | {"announced": announced["version_id"]}

    def register_in_a_plain_thread() -> None:
        try:
            _register(scene["v2"].family, "v3", parent=scene["v2"], scores=CANDIDATE_SCORES, updates=[])
        finally:
            connection.close()

    event = async_to_sync(scenario)()
    assert (event["version_id"], event["approval_status"], event["actor"]) == ("v2", "approved", "olivia-officer")
    assert event["announced"] == "v3"
