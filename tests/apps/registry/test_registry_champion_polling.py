"""What hundreds of polling devices cost (docs/operations/serving.md): the champion answer is kept per process and
checked with one query, ETags turn repeated polls into 304s, a promotion or an alias move shows at once, and a
heartbeat that repeats the recorded version is at most one UPDATE."""

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.core.exceptions import PermissionDenied
from django.db import connection
from django.test.utils import CaptureQueriesContext, override_settings
from django.utils import timezone

from apps.federation.choices import DeviceStatus
from apps.federation.models import EdgeDevice
from apps.federation.services import record_device_heartbeat
from apps.governance.services import approve_version, request_approval
from apps.registry.models import ModelFamily, ModelVersion
from apps.registry.services import move_alias

CHAMPION = "/api/v1/aliases/champion/"


@pytest.fixture
def v1(
    cast: dict[str, Any], family_factory: Callable[..., ModelFamily], version_factory: Callable[..., ModelVersion]
) -> ModelVersion:
    version = version_factory(family_factory(), "tiny-moe-v1")
    approve_version(request_approval(version, actor=cast["engineer"].user), actor=cast["officer"].user)
    return version


def test_a_repeated_poll_is_a_304_with_the_same_etag_and_two_queries(cast: dict[str, Any], v1: ModelVersion) -> None:
    device = cast["device"].client
    first = device.get(CHAMPION)
    assert first.status_code == 200
    etag = first["ETag"]
    assert etag.startswith('"')
    assert len(etag) == 66
    assert first["Cache-Control"] == "private, no-cache"
    assert first.json()["version"]["version_id"] == "tiny-moe-v1"

    with CaptureQueriesContext(connection) as queries:
        again = device.get(CHAMPION, HTTP_IF_NONE_MATCH=etag)
    assert again.status_code == 304
    assert again.content == b""
    assert again["ETag"] == etag
    # The token lookup and the fingerprint; no serializer queries, no token write (used a moment ago).
    assert len(queries) == 2, [query["sql"] for query in queries.captured_queries]

    with CaptureQueriesContext(connection) as queries:
        full = device.get(CHAMPION, HTTP_IF_NONE_MATCH='"some-other-etag", W/"x"')
    assert full.status_code == 200
    assert full.json() == first.json()
    assert len(queries) == 2


def test_a_promotion_and_an_alias_move_change_the_answer_at_once(
    cast: dict[str, Any], v1: ModelVersion, family_factory: Callable[..., ModelFamily], version_factory: Any
) -> None:
    device, engineer = cast["device"].client, cast["engineer"].user
    etag = device.get(CHAMPION)["ETag"]

    move_alias(name="candidate", version=v1, actor=engineer)
    moved = device.get(CHAMPION, HTTP_IF_NONE_MATCH=etag)
    assert moved.status_code == 200
    assert sorted(moved.json()["version"]["aliases"]) == ["candidate", "champion"]
    assert moved["ETag"] != etag

    v2 = version_factory(v1.family, "tiny-moe-v2", parent=v1)
    approve_version(request_approval(v2, actor=engineer), actor=cast["officer"].user)
    promoted = device.get(CHAMPION, HTTP_IF_NONE_MATCH=moved["ETag"])
    assert promoted.status_code == 200
    body = promoted.json()["version"]
    assert (body["version_id"], body["status"], body["parent"]) == ("tiny-moe-v2", "champion", "tiny-moe-v1")
    # The officer's view of the old champion shows its new status too (archived), not a kept answer.
    old = cast["engineer"].client.get("/api/v1/aliases/candidate/")
    assert old.json()["version"]["status"] == "archived"


def test_devices_read_only_the_champion_and_unknown_aliases_are_404(cast: dict[str, Any], v1: ModelVersion) -> None:
    move_alias(name="candidate", version=v1, actor=cast["engineer"].user)
    assert cast["device"].client.get("/api/v1/aliases/candidate/").status_code == 404
    assert cast["engineer"].client.get("/api/v1/aliases/candidate/").status_code == 200
    missing = cast["engineer"].client.get("/api/v1/aliases/nothing-here/")
    assert (missing.status_code, missing.json()["code"]) == (404, "not_found")
    assert cast["anonymous"].client.get(CHAMPION).status_code == 401


def test_a_repeated_heartbeat_writes_last_seen_at_most_once_per_resolution(
    cast: dict[str, Any], v1: ModelVersion
) -> None:
    device = cast["device"].client
    url = "/api/v1/devices/car-0001/heartbeat/"
    assert device.post(url, {"current_version": "tiny-moe-v1"}, format="json").status_code == 200
    recorded = EdgeDevice.objects.get(client_id="car-0001").last_seen

    with CaptureQueriesContext(connection) as queries:
        repeated = device.post(url, {"current_version": "tiny-moe-v1"}, format="json")
    assert repeated.status_code == 200
    assert repeated.json()["current_version"] == "tiny-moe-v1"
    assert EdgeDevice.objects.get(client_id="car-0001").last_seen == recorded
    # The token and the device (with its version); nothing written.
    assert len(queries) == 2, [query["sql"] for query in queries.captured_queries]

    EdgeDevice.objects.filter(client_id="car-0001").update(last_seen=timezone.now() - timedelta(seconds=31))
    with CaptureQueriesContext(connection) as queries:
        assert device.post(url, {"current_version": "tiny-moe-v1"}, format="json").status_code == 200
    updates = [query["sql"] for query in queries.captured_queries if query["sql"].startswith("UPDATE")]
    assert len(updates) == 1
    assert len(queries) == 3
    assert EdgeDevice.objects.get(client_id="car-0001").last_seen > timezone.now() - timedelta(seconds=5)


@override_settings(FEDNESTED_LAST_SEEN_RESOLUTION_S=0)
def test_a_revoked_device_cannot_refresh_last_seen_through_the_fast_path(
    cast: dict[str, Any], v1: ModelVersion
) -> None:
    url = "/api/v1/devices/car-0001/heartbeat/"
    device = cast["device"].client
    assert device.post(url, {"current_version": "tiny-moe-v1"}, format="json").status_code == 200
    stale = EdgeDevice.objects.select_related("current_version").get(client_id="car-0001")
    EdgeDevice.objects.filter(pk=stale.pk).update(status=DeviceStatus.REVOKED)
    before = EdgeDevice.objects.get(pk=stale.pk).last_seen
    with pytest.raises(PermissionDenied, match="revoked and may not report"):
        record_device_heartbeat(stale, current_version="tiny-moe-v1")
    assert EdgeDevice.objects.get(pk=stale.pk).last_seen == before
