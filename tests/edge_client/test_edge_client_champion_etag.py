"""The edge client's champion poll sends back the ETag it holds: against the real alias endpoint (pytest-django's
live server) a repeated poll is a 304 the client answers from what it holds, and a promotion gives the new champion."""

from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from apps.federation.services import issue_enrollment_token
from apps.registry.services import move_alias
from edge_client.enrollment import ensure_enrolled
from edge_client.sidecar import AuditLog, Sidecar, example_policy, load_policy
from edge_client.state import StateDir
from edge_client.transport.http import ControlPlaneClient


class RecordingTransport(httpx.HTTPTransport):
    """A real HTTP transport that notes each champion request's If-None-Match and the status it got."""

    def __init__(self) -> None:
        super().__init__()
        self.champion_calls: list[tuple[str | None, int]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.url.path.endswith("/aliases/champion/"):
            self.champion_calls.append((request.headers.get("If-None-Match"), response.status_code))
        return response


@pytest.mark.django_db(transaction=True)
def test_a_repeated_poll_is_answered_304_and_a_promotion_is_seen(
    tmp_path: Path, live_server: Any, cast: Any, family_factory: Any, version_factory: Any
) -> None:
    engineer = cast["engineer"].user
    _, token = issue_enrollment_token(actor=engineer, note="etag")
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(example_policy(live_server.url)))
    sidecar = Sidecar(load_policy(policy), AuditLog(tmp_path / "audit.jsonl"))
    transport = RecordingTransport()
    with ControlPlaneClient(live_server.url, sidecar, transport=transport) as api:
        credential = ensure_enrolled(
            StateDir(tmp_path / "state"), api, sidecar, client_id="edge-etag-1", token_file=token_file
        )
        api.api_token = credential.api_token
        family = family_factory()
        v1 = version_factory(family, "v1")
        move_alias(name="champion", version=v1, actor=engineer)
        first = api.champion()
        assert first.version_id == "v1"
        assert api.champion() == first

        move_alias(name="champion", version=version_factory(family, "v2", parent=v1), actor=engineer)
        promoted = api.champion()
        assert (promoted.version_id, promoted.parent_version) == ("v2", "v1")

    (no_etag, first_status), (etag, second_status), (same_etag, third_status) = transport.champion_calls
    assert (no_etag, first_status) == (None, 200)
    assert etag is not None
    assert second_status == 304
    assert (same_etag, third_status) == (etag, 200)
