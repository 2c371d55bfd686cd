"""`controlplane.limits.is_payload_upload`: the ASGI gate's test for the payload route, with its cheap suffix check
kept in step with the URL conf."""

from django.urls import reverse

from controlplane.limits import PAYLOAD_ROUTE_SUFFIX, PAYLOAD_UPLOAD_URL_NAME, is_payload_upload


def test_the_payload_route_ends_with_the_suffix_the_gate_checks_first() -> None:
    path = reverse(PAYLOAD_UPLOAD_URL_NAME, kwargs={"update_id": "0b6b3c6e-5d1c-4a2e-9a43-6f0e9b9b8f11"})
    assert path.rstrip("/").endswith(PAYLOAD_ROUTE_SUFFIX)
    assert is_payload_upload({"path": path})
    assert is_payload_upload({"path": f"/prefix{path}", "root_path": "/prefix"})


def test_other_routes_and_look_alikes_are_not_payload_uploads() -> None:
    for path in (
        "/api/v1/updates/",
        "/api/v1/aliases/champion/",
        "/api/v1/payload/",
        "/api/v1/updates/x/y/payload/",
        "/no/such/route/payload",
        "",
    ):
        assert not is_payload_upload({"path": path}), path
