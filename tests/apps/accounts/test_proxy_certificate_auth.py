"""Devices authenticated by their client certificate: a real Debian HAProxy on loopback terminates TLS in front of
Django's live server (PostgreSQL behind it), and real TLS clients present certificates the test CA issued at
enrollment. Also the Django side alone: the proxy headers count only with HAProxy's secret, device API tokens are
refused when certificates are required, and HAProxy's device routes are the views Django reserves to devices."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from cryptography import x509
from django.conf import settings as django_settings
from django.core.signals import request_started
from django.urls import resolve, reverse
from rest_framework.test import APIClient

from apps.accounts.choices import Role
from apps.accounts.models import User
from apps.federation.models import EdgeDevice
from apps.federation.services import enroll_device, issue_enrollment_token, revoke_device
from fednested.identity.ca import CertificateAuthority, load_certificate
from fednested.identity.keys import generate_private_key, make_csr, private_key_pem
from fednested.infra.endpoint import Endpoint
from fednested.infra.haproxy import (
    CLIENT_CN_HEADER,
    DEVICE_ROUTES,
    PROXY_SECRET_HEADER,
    push_crl,
    write_private_file,
)
from tests.fednested.infra.haproxy_process import (
    EdgePki,
    RunningHAProxy,
    device_certificate,
    edge_options,
    make_edge_pki,
    running_haproxy,
    tls_client,
)

pytestmark = pytest.mark.django_db(transaction=True)

MAX_BODY = 16 * 1024
MAX_UPLOAD = 64 * 1024
PROXY_AUTHENTICATION = "apps.accounts.authentication.ProxyClientCertificateAuthentication"


def meta_header(name: str) -> str:
    return "HTTP_" + name.upper().replace("-", "_")


@pytest.fixture
def pki(tmp_path: Path, settings: Any) -> EdgePki:
    """The test CA is the control plane's CA: enrollment issues device certificates, revocation writes the CRL
    HAProxy reads."""
    pki = make_edge_pki(tmp_path / "pki")
    settings.FEDNESTED_CA_DIR = str(pki.ca.directory)
    settings.FEDNESTED_CRL_PATH = str(pki.crl)
    settings.FEDNESTED_PROXY_SECRET = pki.secret
    settings.FEDNESTED_DEVICES_REQUIRE_CERTIFICATE = True
    return pki


@dataclass(frozen=True)
class Enrolled:
    """A device enrolled through the real service with its CSR: its row, API token and certificate files."""

    device: EdgeDevice
    api_token: str
    cert: Path
    key: Path
    serial_hex: str

    @property
    def credentials(self) -> tuple[Path, Path]:
        return self.cert, self.key


@pytest.fixture
def enroll(
    tmp_path: Path, pki: EdgePki, user_factory: Callable[[str, str], tuple[User, str]]
) -> Callable[[str], Enrolled]:
    engineer, _ = user_factory("erin-engineer", Role.ENGINEER)

    def build(client_id: str) -> Enrolled:
        key = generate_private_key()
        _, token = issue_enrollment_token(actor=engineer, note=client_id)
        enrollment = enroll_device(token=token, client_id=client_id, csr=make_csr(key, client_id).decode())
        assert enrollment.key.certificate_pem, "no certificate issued: FEDNESTED_CA_DIR must name the test CA"
        directory = tmp_path / "devices"
        directory.mkdir(exist_ok=True)
        cert, key_path = directory / f"{client_id}.crt", directory / f"{client_id}.key"
        cert.write_text(enrollment.key.certificate_pem)
        write_private_file(key_path, private_key_pem(key).decode())
        serial = format(load_certificate(enrollment.key.certificate_pem).serial_number, "x")
        return Enrolled(enrollment.device, enrollment.api_token, cert, key_path, serial)

    return build


@dataclass(frozen=True)
class DjangoRequest:
    method: str
    path: str
    client_cn: str | None
    proxy_secret: str | None


@pytest.fixture
def django_requests() -> Iterator[list[DjangoRequest]]:
    """Every request Django's handler starts (in the live server's thread), with the headers it received."""
    seen: list[DjangoRequest] = []
    lock = threading.Lock()

    def record(sender: Any, environ: dict[str, Any], **kwargs: Any) -> None:
        with lock:
            seen.append(
                DjangoRequest(
                    environ["REQUEST_METHOD"],
                    environ["PATH_INFO"],
                    environ.get(meta_header(CLIENT_CN_HEADER)),
                    environ.get(meta_header(PROXY_SECRET_HEADER)),
                )
            )

    request_started.connect(record, dispatch_uid="test-proxy-certificate-auth")
    try:
        yield seen
    finally:
        request_started.disconnect(dispatch_uid="test-proxy-certificate-auth")


@pytest.fixture
def edge(tmp_path: Path, pki: EdgePki, live_server: Any) -> Iterator[RunningHAProxy]:
    """HAProxy in front of the live server (by IP: HAProxy might resolve `localhost` to ::1)."""
    address = urlsplit(live_server.url)
    assert address.port is not None
    host = "127.0.0.1" if address.hostname == "localhost" else str(address.hostname)
    options = edge_options(
        pki, Endpoint(host, address.port), tmp_path, max_body_bytes=MAX_BODY, max_upload_bytes=MAX_UPLOAD
    )
    with running_haproxy(options, tmp_path) as running:
        yield running


@pytest.fixture
def version_v1(family_factory: Callable[..., Any], version_factory: Callable[..., Any]) -> Any:
    return version_factory(family_factory(), "v1")


def heartbeat(client: httpx.Client, edge: RunningHAProxy, client_id: str, **headers: str) -> httpx.Response:
    return client.post(
        f"{edge.url}/api/v1/devices/{client_id}/heartbeat/", json={"current_version": "v1"}, headers=headers
    )


# --- through HAProxy ----------------------------------------------------------------------------------------------


def test_a_device_calls_its_own_routes_with_its_certificate_and_no_other_devices(
    edge: RunningHAProxy, pki: EdgePki, enroll: Callable[[str], Enrolled], version_v1: Any
) -> None:
    car_a, car_b = enroll("car-a"), enroll("car-b")
    with tls_client(pki.ca_file, car_a.credentials) as client:
        own = heartbeat(client, edge, "car-a")
        assert own.status_code == 200, own.text
        assert own.json()["client_id"] == "car-a"
        other = heartbeat(client, edge, "car-b")
        assert other.status_code == 403
        assert other.json()["code"] == "not_owner"
        # Reads are open to the certificate too, and a device sees only itself.
        listed = client.get(f"{edge.url}/api/v1/devices/")
        assert listed.status_code == 200
        assert [row["client_id"] for row in listed.json()["results"]] == ["car-a"]
    assert EdgeDevice.objects.get(pk=car_a.device.pk).current_version == version_v1
    assert EdgeDevice.objects.get(pk=car_b.device.pk).current_version is None


def test_without_a_certificate_a_device_route_is_refused_before_django(
    edge: RunningHAProxy, pki: EdgePki, enroll: Callable[[str], Enrolled], django_requests: list[DjangoRequest]
) -> None:
    car_a = enroll("car-a")
    with tls_client(pki.ca_file) as client:
        refused = heartbeat(client, edge, "car-a", Authorization=f"Token {car_a.api_token}")
        assert refused.status_code == 403
        assert refused.json()["code"] == "client_certificate_required"
        # Elsewhere HAProxy lets the request through, and Django refuses the device's token.
        token = client.get(f"{edge.url}/api/v1/rounds/", headers={"Authorization": f"Token {car_a.api_token}"})
        assert token.status_code == 401
        assert token.json()["code"] == "client_certificate_required"
    assert [(seen.method, seen.path) for seen in django_requests] == [("GET", "/api/v1/rounds/")]


def test_a_certificate_from_another_ca_fails_the_handshake(
    edge: RunningHAProxy,
    pki: EdgePki,
    enroll: Callable[[str], Enrolled],
    tmp_path: Path,
    django_requests: list[DjangoRequest],
) -> None:
    enroll("car-a")
    other = CertificateAuthority.init(tmp_path / "other-ca")
    cert, key, _ = device_certificate(other, "car-a", tmp_path / "forged")
    with tls_client(pki.ca_file, (cert, key)) as client, pytest.raises(httpx.TransportError, match="unknown ca"):
        heartbeat(client, edge, "car-a")
    assert django_requests == []


def test_a_revoked_certificate_is_refused_by_django_at_once_and_by_haproxy_once_it_has_the_crl(
    edge: RunningHAProxy,
    pki: EdgePki,
    enroll: Callable[[str], Enrolled],
    user_factory: Callable[[str, str], tuple[User, str]],
    version_v1: Any,
) -> None:
    car_a = enroll("car-a")
    with tls_client(pki.ca_file, car_a.credentials) as client:
        assert heartbeat(client, edge, "car-a").status_code == 200
    engineer, _ = user_factory("eve-engineer", Role.ENGINEER)
    revoke_device(car_a.device, actor=engineer, reason="stolen")
    # The control plane wrote the CRL on commit; HAProxy still has the old one, but Django refuses the device.
    crl = pki.crl.read_bytes()
    assert int(car_a.serial_hex, 16) in {entry.serial_number for entry in x509.load_pem_x509_crl(crl)}
    with tls_client(pki.ca_file, car_a.credentials) as client:
        lagging = heartbeat(client, edge, "car-a")
    assert lagging.status_code == 401
    assert lagging.json()["code"] == "revoked_client"
    assert edge.options.admin_socket is not None
    push_crl(edge.options.admin_socket, pki.crl)
    with tls_client(pki.ca_file, car_a.credentials) as client, pytest.raises(httpx.TransportError, match="revoked"):
        heartbeat(client, edge, "car-a")


def test_forged_client_headers_are_dropped_by_haproxy(
    edge: RunningHAProxy,
    pki: EdgePki,
    enroll: Callable[[str], Enrolled],
    django_requests: list[DjangoRequest],
    version_v1: Any,
) -> None:
    car_a, car_b = enroll("car-a"), enroll("car-b")
    forged = {
        "X-Fednested-Client-Cn": "car-a",
        "X-Fednested-Client-Serial": car_a.serial_hex,
        "X-Fednested-Client-Ou": "device",
        "X-Fednested-Proxy-Secret": pki.secret,
    }
    with tls_client(pki.ca_file) as client:
        anonymous = client.get(f"{edge.url}/api/v1/devices/", headers=forged)
    assert anonymous.status_code == 401
    assert django_requests[-1].client_cn is None
    assert django_requests[-1].proxy_secret == pki.secret
    # With car-b's certificate, the forged CN of car-a is replaced by car-b's own.
    with tls_client(pki.ca_file, car_b.credentials) as client:
        impersonating = heartbeat(client, edge, "car-a", **forged)
    assert impersonating.status_code == 403
    assert impersonating.json()["code"] == "not_owner"
    assert "you are device 'car-b'" in impersonating.json()["detail"]
    assert django_requests[-1].client_cn == "car-b"


def test_an_oversized_body_is_refused_before_django(
    edge: RunningHAProxy, pki: EdgePki, enroll: Callable[[str], Enrolled], django_requests: list[DjangoRequest]
) -> None:
    car_a = enroll("car-a")
    with tls_client(pki.ca_file, car_a.credentials) as client:
        upload = client.put(
            f"{edge.url}/api/v1/updates/u-1/payload/",
            content=b"\0" * (MAX_UPLOAD + 1),
            headers={"X-Content-SHA256": "0" * 64},
        )
        envelope = client.post(
            f"{edge.url}/api/v1/updates/", content=b" " * (MAX_BODY + 1), headers={"Content-Type": "application/json"}
        )
    assert (upload.status_code, upload.json()["code"]) == (413, "payload_too_large")
    assert (envelope.status_code, envelope.json()["code"]) == (413, "payload_too_large")
    assert django_requests == []
    # Both answered by HAProxy itself: no server was chosen.
    assert edge.wait_for_log("fednested_edge/<NOSRV>", count=2).count("fednested_edge/<NOSRV>") == 2


def test_officers_still_use_their_tokens_through_haproxy(
    edge: RunningHAProxy,
    pki: EdgePki,
    enroll: Callable[[str], Enrolled],
    user_factory: Callable[[str, str], tuple[User, str]],
) -> None:
    enroll("car-a")
    _, officer_token = user_factory("olivia-officer", Role.OFFICER)
    with tls_client(pki.ca_file) as client:
        listed = client.get(f"{edge.url}/api/v1/devices/", headers={"Authorization": f"Token {officer_token}"})
        anonymous = client.get(f"{edge.url}/api/v1/devices/")
    assert listed.status_code == 200
    assert [row["client_id"] for row in listed.json()["results"]] == ["car-a"]
    assert anonymous.status_code == 401


# --- Django alone (no HAProxy): what the headers and tokens are worth ---------------------------------------------


def proxied(secret: str, cn: str, serial: str, unit: str = "device") -> APIClient:
    client = APIClient()
    client.credentials(
        **{
            meta_header(PROXY_SECRET_HEADER): secret,
            meta_header(CLIENT_CN_HEADER): cn,
            meta_header("X-Fednested-Client-Serial"): serial,
            meta_header("X-Fednested-Client-Ou"): unit,
        }
    )
    return client


def test_client_headers_count_only_with_the_proxy_secret(
    pki: EdgePki, enroll: Callable[[str], Enrolled], settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    car_a = enroll("car-a")
    serial = car_a.serial_hex.upper()
    accepted = proxied(pki.secret, "car-a", serial).get("/api/v1/devices/")
    assert accepted.status_code == 200
    assert [row["client_id"] for row in accepted.json()["results"]] == ["car-a"]

    with caplog.at_level(logging.WARNING, logger="apps.accounts.authentication"):
        wrong = proxied(pki.secret[:-1] + "X", "car-a", serial).get("/api/v1/devices/")
        settings.FEDNESTED_PROXY_SECRET = ""
        unset = proxied(pki.secret, "car-a", serial).get("/api/v1/devices/")
    assert (wrong.status_code, unset.status_code) == (401, 401)
    messages = [record.getMessage() for record in caplog.records if record.name == "apps.accounts.authentication"]
    assert len(messages) == 2
    assert "ignored client certificate headers (CN 'car-a')" in messages[0]
    assert "X-Fednested-Proxy-Secret is missing or wrong" in messages[0]
    assert "FEDNESTED_PROXY_SECRET is not set" in messages[1]


def test_the_certificate_must_be_a_live_device_certificate(
    pki: EdgePki, enroll: Callable[[str], Enrolled], user_factory: Callable[[str, str], tuple[User, str]]
) -> None:
    car_a, car_b = enroll("car-a"), enroll("car-b")
    cases = [
        (proxied(pki.secret, "car-a", "7f" * 16), "certificate_not_live"),
        # car-b's serial is live, but not car-a's.
        (proxied(pki.secret, "car-a", car_b.serial_hex), "certificate_not_live"),
        (proxied(pki.secret, "car-z", car_a.serial_hex), "unknown_client"),
        (proxied(pki.secret, "car-a", car_a.serial_hex, unit="service"), "not_a_device_certificate"),
        (proxied(pki.secret, "car-a", "not-hex"), "malformed_client_certificate"),
    ]
    for client, code in cases:
        response = client.get("/api/v1/devices/")
        assert (response.status_code, response.json()["code"]) == (401, code), response.json()
    engineer, _ = user_factory("eve-engineer", Role.ENGINEER)
    revoke_device(car_a.device, actor=engineer, reason="decommissioned")
    revoked = proxied(pki.secret, "car-a", car_a.serial_hex).get("/api/v1/devices/")
    assert (revoked.status_code, revoked.json()["code"]) == (401, "revoked_client")
    assert "device 'car-a' was revoked at" in revoked.json()["detail"]


def test_device_tokens_are_refused_only_when_certificates_are_required(
    pki: EdgePki, enroll: Callable[[str], Enrolled], settings: Any, user_factory: Callable[[str, str], tuple[User, str]]
) -> None:
    car_a = enroll("car-a")
    _, engineer_token = user_factory("eve-engineer", Role.ENGINEER)
    device, engineer = APIClient(), APIClient()
    device.credentials(HTTP_AUTHORIZATION=f"Token {car_a.api_token}")
    engineer.credentials(HTTP_AUTHORIZATION=f"Token {engineer_token}")
    refused = device.get("/api/v1/devices/")
    assert (refused.status_code, refused.json()["code"]) == (401, "client_certificate_required")
    assert engineer.get("/api/v1/devices/").status_code == 200
    settings.FEDNESTED_DEVICES_REQUIRE_CERTIFICATE = False
    assert device.get("/api/v1/devices/").status_code == 200


def test_haproxys_device_routes_are_the_views_django_reserves_to_devices() -> None:
    for route in DEVICE_ROUTES:
        path = reverse(route.view_name, kwargs=_lookup_kwargs(route.view_name))
        assert re.match(route.path_regex, path), (route, path)
        match = resolve(path)
        view: Any = match.func
        action = view.actions[route.method.lower()]
        assert view.cls.action_roles[action] == frozenset({Role.DEVICE}), (route, action)


def _lookup_kwargs(view_name: str) -> dict[str, str]:
    if view_name.startswith("device-"):
        return {"client_id": "car-a"}
    if view_name == "update-payload":
        return {"update_id": "u-1"}
    return {}


def test_settings_put_the_certificate_first() -> None:
    """Production wiring: the proxy class authenticates before tokens, so a verified certificate decides who a
    device is (listed in controlplane/settings.py REST_FRAMEWORK)."""
    classes = django_settings.REST_FRAMEWORK["DEFAULT_AUTHENTICATION_CLASSES"]
    assert classes[0] == PROXY_AUTHENTICATION, classes
