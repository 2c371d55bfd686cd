"""Hostile input through the REST API: every error body is JSON with a `code` (field errors keep their shape), JSON
bodies are bounded in size, depth and values, numbers are bounded to what the columns and the model hold, and no
input gets a 500. Server errors and unknown URLs answer JSON under /api/ and plain pages elsewhere."""

import json
import types
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.http import HttpRequest, HttpResponse
from django.test import Client
from django.urls import path
from django.utils import timezone

from apps.federation.models import EnrollmentToken, Round
from apps.registry.models import ModelFamily, ModelVersion
from controlplane import urls as controlplane_urls
from controlplane.api_errors import with_code
from controlplane.parsers import MAX_JSON_DEPTH

pytestmark = pytest.mark.django_db


def error(response: Any) -> dict[str, Any]:
    """The JSON error body of `response`, checked to be an object with a string `code` (and no debug page)."""
    assert response["Content-Type"].startswith("application/json"), (response.status_code, response.content[:300])
    body = json.loads(response.content)
    assert isinstance(body, dict)
    assert isinstance(body.get("code"), str), body
    return body


@pytest.fixture
def v1(family_factory: Callable[..., ModelFamily], version_factory: Callable[..., ModelVersion]) -> ModelVersion:
    return version_factory(family_factory(), "tiny-moe-v1")


def round_body(**changes: Any) -> dict[str, Any]:
    deadline = (timezone.now() + timedelta(hours=1)).isoformat()
    return {"base_version": "tiny-moe-v1", "buffer_size_k": 2, "deadline_at": deadline, **changes}


# --- error bodies ---------------------------------------------------------------------------------------------------


def test_unknown_api_urls_get_a_json_404_that_lists_no_routes(cast: dict[str, Any]) -> None:
    for member in ("anonymous", "engineer"):
        response = cast[member].client.get("/api/v1/no-such-thing/")
        assert response.status_code == 404
        body = error(response)
        assert body["code"] == "not_found"
        assert "/api/v1/no-such-thing/" in body["detail"]
        assert b"enrollment-tokens" not in response.content  # no list of the URL patterns


def test_unknown_console_urls_get_a_plain_html_404(client: Client) -> None:
    response = client.get("/no-such-page/")
    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")
    assert b"URLconf" not in response.content
    assert b"api/v1/" not in response.content


def test_wrong_method_and_media_type_get_json_with_a_code(cast: dict[str, Any], v1: ModelVersion) -> None:
    engineer = cast["engineer"].client
    assert error(engineer.delete("/api/v1/rounds/"))["code"] == "method_not_allowed"
    wrong_type = engineer.post(
        "/api/v1/rounds/", data="buffer_size_k=2", content_type="application/x-www-form-urlencoded"
    )
    assert wrong_type.status_code == 415
    assert error(wrong_type)["code"] == "unsupported_media_type"
    assert error(engineer.post("/api/v1/rounds/", data=b"x", content_type="text/plain"))["code"] == (
        "unsupported_media_type"
    )


def test_field_errors_keep_their_shape_and_carry_a_code(cast: dict[str, Any], v1: ModelVersion) -> None:
    response = cast["engineer"].client.post("/api/v1/rounds/", round_body(buffer_size_k=0, mode="nope"))
    assert response.status_code == 400
    body = error(response)
    assert body["code"] == "invalid"
    assert body["buffer_size_k"] == ["Ensure this value is greater than or equal to 1."]
    assert body["mode"] == ['"nope" is not a valid choice.']
    # A service-layer error keeps its own code (here, one the round service gives none: invalid).
    no_cohort = cast["engineer"].client.post("/api/v1/rounds/", round_body(mode="sync"))
    assert error(no_cohort) == {
        "cohort": ["a synchronous round needs a cohort of at least one device"],
        "code": "invalid",
    }
    # A body that is not an object is no crash either.
    listed = cast["engineer"].client.post("/api/v1/rounds/", [1, 2, 3])
    assert listed.status_code == 400
    assert error(listed)["code"] == "invalid"


def test_permission_and_authentication_errors_carry_their_code(cast: dict[str, Any]) -> None:
    assert error(cast["anonymous"].client.get("/api/v1/rounds/"))["code"] == "not_authenticated"
    assert error(cast["outsider"].client.get("/api/v1/rounds/"))["code"] == "permission_denied"


def _boom(request: HttpRequest) -> HttpResponse:
    raise RuntimeError("secret internals: /etc/fednested/settings.py SECRET_KEY=hunter2")


def test_a_server_error_shows_no_traceback_or_settings(settings: Any) -> None:
    """handler500 as wired in controlplane.urls: JSON with a code under /api/, Django's plain page elsewhere."""
    urlconf = types.ModuleType("boom_urls")
    urlconf.urlpatterns = [  # type: ignore[attr-defined]
        path("api/v1/boom/", _boom),
        path("boom/", _boom),
        *controlplane_urls.urlpatterns,
    ]
    for name in ("handler400", "handler403", "handler404", "handler500"):
        setattr(urlconf, name, getattr(controlplane_urls, name))
    settings.ROOT_URLCONF = urlconf
    client = Client(raise_request_exception=False)
    api = client.get("/api/v1/boom/")
    assert api.status_code == 500
    assert error(api)["code"] == "server_error"
    console = client.get("/boom/")
    assert console.status_code == 500
    assert console["Content-Type"].startswith("text/html")
    for response in (api, console):
        assert b"hunter2" not in response.content
        assert b"Traceback" not in response.content
        assert b"settings.py" not in response.content


# --- bounded JSON bodies --------------------------------------------------------------------------------------------


def post_raw(client: Any, url: str, raw: bytes) -> Any:
    return client.post(url, data=raw, content_type="application/json")


def test_deeply_nested_json_on_the_anonymous_enroll_endpoint_is_a_400(cast: dict[str, Any]) -> None:
    anonymous = cast["anonymous"].client
    deep = b'{"token": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = post_raw(anonymous, "/api/v1/enroll/", deep)
    assert response.status_code == 400
    assert error(response)["code"] == "too_deep"
    # Just over the limit: parsed, then refused by depth (and the message says the limit).
    over = {"token": "x", "labels": json.loads("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)}
    response = anonymous.post("/api/v1/enroll/", over)
    assert (response.status_code, error(response)["code"]) == (400, "too_deep")
    assert f"more than {MAX_JSON_DEPTH} levels" in response.json()["detail"]


def test_a_json_body_over_the_limit_is_not_read_past_it(cast: dict[str, Any], settings: Any) -> None:
    settings.FEDNESTED_MAX_REQUEST_BYTES = 1000
    raw = json.dumps({"token": "x" * 2000, "client_id": "car-1"}).encode()
    response = post_raw(cast["anonymous"].client, "/api/v1/enroll/", raw)
    assert response.status_code == 400
    body = error(response)
    assert (body["code"], body["detail"]) == ("too_large", "the JSON body is larger than 1000 bytes")


@pytest.mark.parametrize(
    "raw",
    [
        b'{"note": NaN}',
        b'{"note": "x", "ttl_seconds": Infinity}',
        b'{"ttl_seconds": 1e999}',
        b'{"ttl_seconds": ' + b"9" * 5000 + b"}",
        b'{"note": "\\u0000"}',
        b'{"note": "\\ud800"}',
        b'{"\\u0000": 1}',
        b"\xff\xfe{}",
        b'{"note": ',
    ],
    ids=["nan", "infinity", "1e999", "5000-digit-int", "nul", "lone-surrogate", "nul-key", "not-utf8", "truncated"],
)
def test_json_the_api_cannot_use_is_malformed_json(cast: dict[str, Any], raw: bytes) -> None:
    response = post_raw(cast["engineer"].client, "/api/v1/enrollment-tokens/", raw)
    assert response.status_code == 400
    assert error(response)["code"] == "malformed_json"
    assert EnrollmentToken.objects.count() == 1  # the cast's device's, nothing new


# --- numbers bounded to what the columns and the model hold ----------------------------------------------------------


def test_a_token_lifetime_beyond_the_limit_is_a_400(cast: dict[str, Any]) -> None:
    for ttl in (10**20, 30 * 24 * 3600 + 1):
        response = cast["engineer"].client.post("/api/v1/enrollment-tokens/", {"ttl_seconds": ttl})
        assert response.status_code == 400, response.content
        assert error(response)["ttl_seconds"] == ["Ensure this value is less than or equal to 2592000."]


@pytest.mark.parametrize(
    "config",
    [
        {"max_wait_s": 1e300},
        {"clip_norm": 10**400},
        {"staleness_exponent": -(10**30)},
        {"max_staleness": 2**70},
        {"devices": {"note": "a\u0000b"}},
    ],
    ids=["max-wait-1e300", "clip-norm-10^400", "exponent-beyond-int64", "staleness-2^70", "nul-in-string"],
)
def test_round_configs_beyond_what_the_model_holds_are_a_400(
    cast: dict[str, Any], v1: ModelVersion, config: dict[str, Any]
) -> None:
    response = cast["engineer"].client.post("/api/v1/rounds/", round_body(config=config))
    assert response.status_code == 400, response.content
    # Named as a field error, or (a string no column can store) refused by the body parser, which names the path.
    assert "config" in error(response) or response.json()["detail"].startswith("the string at config.")
    assert not Round.objects.exists()


def test_artifact_sizes_and_indexes_beyond_their_columns_are_a_400(cast: dict[str, Any], v1: ModelVersion) -> None:
    artifact = {"file_name": "core.safetensors", "sha256": "0f" * 32, "size_bytes": 10, "partition": "core"}
    body = {"family": "tiny-moe", "version_id": "v9", "manifest": {}, "artifact_uri": "file:///a/v9"}
    for changes in ({"size_bytes": 2**63}, {"layer": 2**31}, {"expert_index": 10**20}):
        response = cast["engineer"].client.post("/api/v1/versions/", {**body, "artifacts": [{**artifact, **changes}]})
        assert response.status_code == 400, response.content
        [field] = changes
        assert field in str(error(response)["artifacts"])
    assert not ModelVersion.objects.filter(version_id="v9").exists()


def test_a_cohort_beyond_the_limit_is_refused_before_it_is_looked_up(
    cast: dict[str, Any], v1: ModelVersion, django_assert_max_num_queries: Any
) -> None:
    cohort = [f"car-{index}" for index in range(20_000)]
    with django_assert_max_num_queries(10):
        response = cast["engineer"].client.post("/api/v1/rounds/", round_body(mode="sync", cohort=cohort))
    assert response.status_code == 400
    assert error(response)["cohort"] == ["a cohort has at most 10000 devices, got 20000"]


def test_task_params_that_cannot_be_stored_are_a_400(cast: dict[str, Any]) -> None:
    for params in ({"steps": 10**19}, {"name": "\u0000"}, {"deep": json.loads("[" * 40 + "]" * 40)}):
        response = cast["engineer"].client.post("/api/v1/tasks/", {"kind": "evaluation", "params": params})
        assert response.status_code == 400, response.content
        assert error(response)["code"] in {"invalid", "too_deep", "malformed_json"}


# --- paths ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "/api/v1/rounds/%00/",
        "/api/v1/devices/car%00/",
        "/api/v1/versions/tiny-moe-v1/files/core%00.safetensors/",
        "/api/v1/versions/%00/lineage/",
        "/api/v1/updates/%00/",
        "/api/v1/approvals/99999999999999999999999/",
        "/api/v1/tasks/%00/",
        "/api/v1/rounds/?status=%00&base_version=%00",
        "/api/v1/updates/?received_after=9999-12-31T23:59:59-23:59",
        "/api/v1/rounds/?page=99999999999999999999999",
    ],
)
def test_hostile_paths_and_queries_are_no_server_error(cast: dict[str, Any], v1: ModelVersion, url: str) -> None:
    response = cast["engineer"].client.get(url)
    assert response.status_code in (200, 400, 404), response.content[:300]
    if response.status_code != 200:
        error(response)


def test_the_browsable_api_still_offers_its_json_form(cast: dict[str, Any], v1: ModelVersion) -> None:
    """With the JSON parser alone the browsable API keeps its raw-data form, which posts JSON."""
    page = cast["engineer"].client.get("/api/v1/rounds/", HTTP_ACCEPT="text/html")
    assert page.status_code == 200
    assert page["Content-Type"].startswith("text/html")
    assert b'id="id__content_type"' in page.content
    assert b'<option value="application/json"' in page.content
    assert b"multipart/form-data" not in page.content


def test_error_bodies_of_every_shape_get_a_string_code() -> None:
    assert with_code(["only one problem"], ["invalid"]) == {"detail": "only one problem", "code": "invalid"}
    assert with_code("throttled", "throttled") == {"detail": "throttled", "code": "throttled"}
    items = [{"file_name": ["This field is required."]}, {}]
    assert with_code(items, [{"file_name": ["required"]}, {}]) == {"detail": items, "code": "invalid"}
    # A field called `code` cannot take the place of the body's code.
    assert with_code({"code": ["too long"]}, {"code": ["max_length"]}) == {
        "code_errors": ["too long"],
        "code": "invalid",
    }
