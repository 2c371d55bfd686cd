"""The HAProxy edge config: `haproxy -c` accepts what is rendered and written by the CLI, bad inputs are refused with
the option named, and a real HAProxy in front of a recording backend strips forged headers, sets the verified
identity, closes device routes to clients without a certificate and bounds bodies before the backend sees them."""

from __future__ import annotations

import json
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from fednested.cli import app
from fednested.identity.ca import CertificateAuthority, Revoked
from fednested.infra.endpoint import Endpoint, EndpointError, parse_endpoint
from fednested.infra.haproxy import (
    CLIENT_CN_HEADER,
    CLIENT_OU_HEADER,
    CLIENT_SERIAL_HEADER,
    PROXY_SECRET_HEADER,
    InfraConfigError,
    check_config,
    check_tls_files,
    push_crl,
    render_haproxy_config,
    write_certificate_bundle,
)
from tests.fednested.infra.haproxy_process import (
    EdgePki,
    RunningHAProxy,
    device_certificate,
    edge_options,
    make_edge_pki,
    require_tool,
    running_haproxy,
    tls_client,
)

runner = CliRunner()
MAX_BODY = 1024
MAX_UPLOAD = 8192


@pytest.fixture
def pki(tmp_path: Path) -> EdgePki:
    return make_edge_pki(tmp_path / "pki")


def test_rendered_config_passes_haproxy_check(tmp_path: Path, pki: EdgePki) -> None:
    require_tool("haproxy", "haproxy")
    for bind in (Endpoint("127.0.0.1", 8443), Endpoint("::1", 8443)):
        options = edge_options(pki, Endpoint("127.0.0.1", 8000), tmp_path, bind=bind)
        path = tmp_path / "haproxy.cfg"
        path.write_text(render_haproxy_config(options))
        assert "Configuration file is valid" in check_config(path)
    text = render_haproxy_config(options)
    assert f"set-header {PROXY_SECRET_HEADER} {pki.secret}" in text
    assert f"crl-file {pki.crl} verify optional" in text


def test_check_config_reports_haproxys_complaint(tmp_path: Path) -> None:
    require_tool("haproxy", "haproxy")
    path = tmp_path / "broken.cfg"
    path.write_text("frontend x\n    bind 127.0.0.1:1 ssl crt /nonexistent.pem\n")
    with pytest.raises(InfraConfigError, match=r"(?s)broken.cfg: `haproxy -c` refused it:\n.*nonexistent.pem"):
        check_config(path)


def test_options_refuse_weak_secrets_unsafe_paths_and_zero_limits(tmp_path: Path, pki: EdgePki) -> None:
    base = edge_options(pki, Endpoint("127.0.0.1", 8000), tmp_path)
    with pytest.raises(InfraConfigError, match="proxy secret: must be 32 to 256 characters"):
        replace(base, proxy_secret="short")
    with pytest.raises(InfraConfigError, match="proxy secret"):
        replace(base, proxy_secret="x" * 40 + " injected")
    with pytest.raises(InfraConfigError, match=r"crl_file: '/tmp/a b.pem' holds whitespace"):
        replace(base, crl_file=Path("/tmp/a b.pem"))
    with pytest.raises(InfraConfigError, match="max_upload_bytes: must be > 0, got 0"):
        replace(base, max_upload_bytes=0)


def test_parse_endpoint_accepts_ipv4_ipv6_and_names_and_names_the_option() -> None:
    assert parse_endpoint("127.0.0.1:8443", what="--bind") == Endpoint("127.0.0.1", 8443)
    assert str(parse_endpoint("[::1]:8443", what="--bind")) == "[::1]:8443"
    assert parse_endpoint("vpn.example.org:51820", what="--hub-endpoint").host == "vpn.example.org"
    for bad, problem in [
        ("127.0.0.1", "is not HOST:PORT"),
        ("::1:8443", "in brackets"),
        ("127.0.0.1:0", "from 1 to 65535"),
        ("bad host:1", "neither an IPv4 address nor a DNS name"),
    ]:
        with pytest.raises(EndpointError, match=f"--bind: .*{problem}"):
            parse_endpoint(bad, what="--bind")


def test_check_tls_files_refuses_an_expired_crl_a_foreign_crl_and_a_mismatched_bundle(
    tmp_path: Path, pki: EdgePki
) -> None:
    options = edge_options(pki, Endpoint("127.0.0.1", 8000), tmp_path)
    assert check_tls_files(options) == []
    # An expired CRL would make HAProxy (OpenSSL) refuse every client certificate.
    expired = tmp_path / "expired-crl.pem"
    expired.write_bytes(pki.ca.crl([], validity=timedelta(days=1), now=datetime.now(UTC) - timedelta(days=2)))
    with pytest.raises(InfraConfigError, match=r"the CRL expired at .* refuse every device certificate"):
        check_tls_files(replace(options, crl_file=expired))
    soon = tmp_path / "soon-crl.pem"
    soon.write_bytes(pki.ca.crl([], validity=timedelta(hours=3)))
    [warning] = check_tls_files(replace(options, crl_file=soon))
    assert "publish it again before then" in warning
    other = CertificateAuthority.init(tmp_path / "other-ca")
    foreign = other.write_crl([], tmp_path / "foreign-crl.pem")
    with pytest.raises(InfraConfigError, match="not a CRL signed by the CA in"):
        check_tls_files(replace(options, crl_file=foreign))
    other_key, _ = other.write_service("x", tmp_path / "other", ip_addresses=["127.0.0.1"])
    with pytest.raises(InfraConfigError, match="is not the private key of the certificate"):
        write_certificate_bundle(pki.bundle, other_key, tmp_path / "bundle.pem")
    missing = replace(options, crl_file=tmp_path / "nope.pem")
    with pytest.raises(InfraConfigError, match=r"nope.pem: cannot read it .*FEDNESTED_CRL_PATH"):
        check_tls_files(missing)


def test_cli_writes_a_checked_config_and_a_0600_bundle(tmp_path: Path, pki: EdgePki) -> None:
    require_tool("haproxy", "haproxy")
    key_path, cert_path = pki.ca.write_service("edge", tmp_path / "tls", ip_addresses=["127.0.0.1"])
    secret_file = tmp_path / "proxy-secret"
    secret_file.write_text(pki.secret + "\n")
    out = tmp_path / "haproxy" / "haproxy.cfg"
    result = runner.invoke(
        app,
        [
            "infra",
            "generate-haproxy-config",
            "--bind",
            "127.0.0.1:8443",
            "--backend",
            "127.0.0.1:8000",
            "--server-cert",
            str(cert_path),
            "--server-key",
            str(key_path),
            "--ca-file",
            str(pki.ca_file),
            "--crl-file",
            str(pki.crl),
            "--proxy-secret-file",
            str(secret_file),
            "--max-body-bytes",
            "2048",
            "--max-upload-bytes",
            "1048576",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"checked: `haproxy -c -f {out}` accepts it" in result.stdout
    bundle = out.with_name("haproxy-server.pem")
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o600
    assert bundle.read_text() == cert_path.read_text() + key_path.read_text()
    text = out.read_text()
    assert f"ssl crt {bundle} ca-file {pki.ca_file}" in text
    assert "{ req.hdr_val(content-length) gt 2048 }" in text
    assert "{ req.hdr_val(content-length) gt 1048576 }" in text

    secret_file.write_text("too-short\n")
    refused = runner.invoke(app, ["infra", "generate-haproxy-config", *_cli_args(out, pki, secret_file, cert_path)])
    assert refused.exit_code == 1
    assert "--proxy-secret-file" in refused.stderr
    assert "32 to 256 characters" in refused.stderr


def _cli_args(out: Path, pki: EdgePki, secret_file: Path, bundle: Path) -> list[str]:
    return [
        "--bind",
        "127.0.0.1:8443",
        "--backend",
        "127.0.0.1:8000",
        "--server-cert",
        str(bundle),
        "--ca-file",
        str(pki.ca_file),
        "--crl-file",
        str(pki.crl),
        "--proxy-secret-file",
        str(secret_file),
        "--out",
        str(out),
    ]


# --- a real HAProxy in front of a backend that records what reaches it ------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body_bytes: int


@dataclass
class RecordingBackend:
    endpoint: Endpoint
    requests: list[Seen] = field(default_factory=list)


@pytest.fixture
def backend() -> Iterator[RecordingBackend]:
    recorded: list[Seen] = []

    class Handler(BaseHTTPRequestHandler):
        def handle_any(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            recorded.append(Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, len(body)))
            answer = json.dumps({"ok": True}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        do_GET = do_POST = do_PUT = handle_any

        def log_message(self, format: str, *args: object) -> None:  # keep pytest's output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield RecordingBackend(Endpoint("127.0.0.1", server.server_address[1]), recorded)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def edge(tmp_path: Path, pki: EdgePki, backend: RecordingBackend) -> Iterator[RunningHAProxy]:
    options = edge_options(pki, backend.endpoint, tmp_path, max_body_bytes=MAX_BODY, max_upload_bytes=MAX_UPLOAD)
    with running_haproxy(options, tmp_path) as running:
        yield running


def test_forged_identity_and_forwarding_headers_are_replaced(
    edge: RunningHAProxy, pki: EdgePki, backend: RecordingBackend, tmp_path: Path
) -> None:
    forged = {
        "X-Fednested-Client-Cn": "someone-else",
        "x-fednested-client-serial": "01",
        "X_Fednested_Client_Ou": "device",
        "X-FEDNESTED-PROXY-SECRET": "guess",
        "X-Forwarded-For": "10.9.9.9",
        "X-Forwarded-Proto": "http",
    }
    with tls_client(pki.ca_file) as client:
        assert client.get(f"{edge.url}/api/v1/rounds/", headers=forged).status_code == 200
    seen = backend.requests[-1].headers
    assert {name for name in seen if "fednested" in name} == {PROXY_SECRET_HEADER.lower()}
    assert seen[PROXY_SECRET_HEADER.lower()] == pki.secret
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "https"

    cert, key, serial = device_certificate(pki.ca, "car-7", tmp_path / "devices")
    with tls_client(pki.ca_file, (cert, key)) as client:
        assert client.get(f"{edge.url}/api/v1/rounds/", headers=forged).status_code == 200
    seen = backend.requests[-1].headers
    assert seen[CLIENT_CN_HEADER.lower()] == "car-7"
    assert int(seen[CLIENT_SERIAL_HEADER.lower()], 16) == serial
    assert seen[CLIENT_OU_HEADER.lower()] == "device"


def test_device_routes_need_a_verified_certificate(
    edge: RunningHAProxy, pki: EdgePki, backend: RecordingBackend, tmp_path: Path
) -> None:
    routes = [
        ("POST", "/api/v1/updates/"),
        ("PUT", "/api/v1/updates/u-1/payload/"),
        ("POST", "/api/v1/devices/car-7/heartbeat/"),
        ("POST", "/api/v1/devices/car-7/certificate/"),
        # Django routes the decoded path: an encoded one must not slip past.
        ("POST", "/api/v1/%75pdates/"),
        ("POST", "/api/v1/devices/car-7/heartbeat"),
    ]
    with tls_client(pki.ca_file) as client:
        for method, path in routes:
            response = client.request(method, f"{edge.url}{path}", content=b"{}")
            assert response.status_code == 403, (method, path)
            assert response.json()["code"] == "client_certificate_required"
        # The same paths with other methods, and other routes, are no device routes.
        assert client.get(f"{edge.url}/api/v1/updates/").status_code == 200
        assert client.post(f"{edge.url}/api/v1/enroll/", content=b"{}").status_code == 200
    assert [(seen.method, seen.path) for seen in backend.requests] == [
        ("GET", "/api/v1/updates/"),
        ("POST", "/api/v1/enroll/"),
    ]
    cert, key, _ = device_certificate(pki.ca, "car-7", tmp_path / "devices")
    with tls_client(pki.ca_file, (cert, key)) as client:
        for method, path in routes[:4]:
            assert client.request(method, f"{edge.url}{path}", content=b"{}").status_code == 200, (method, path)


def test_a_certificate_of_another_ca_fails_the_handshake(
    edge: RunningHAProxy, pki: EdgePki, backend: RecordingBackend, tmp_path: Path
) -> None:
    other = CertificateAuthority.init(tmp_path / "other-ca")
    cert, key, _ = device_certificate(other, "car-7", tmp_path / "devices")
    with tls_client(pki.ca_file, (cert, key)) as client, pytest.raises(httpx.TransportError, match="unknown ca"):
        client.get(f"{edge.url}/api/v1/rounds/")
    assert backend.requests == []
    edge.wait_for_log("SSL client certificate not trusted")


def test_bodies_are_bounded_before_the_backend_reads_them(
    edge: RunningHAProxy, pki: EdgePki, backend: RecordingBackend, tmp_path: Path
) -> None:
    cert, key, _ = device_certificate(pki.ca, "car-7", tmp_path / "devices")
    payload = f"{edge.url}/api/v1/updates/u-1/payload/"
    with tls_client(pki.ca_file, (cert, key)) as client:
        too_big = client.put(payload, content=b"x" * (MAX_UPLOAD + 1))
        assert too_big.status_code == 413
        assert too_big.json()["code"] == "payload_too_large"
        assert str(MAX_UPLOAD) in too_big.json()["detail"]
        # Far beyond the limit: refused from the headers, HAProxy does not wait for the body.
        assert client.put(payload, content=b"x" * (8 * 1024 * 1024)).status_code == 413
        # Uploads may exceed the general limit, up to their own.
        assert client.put(payload, content=b"x" * MAX_UPLOAD).status_code == 200
        general = client.post(f"{edge.url}/api/v1/updates/", content=b"x" * (MAX_BODY + 1))
        assert general.status_code == 413
        assert str(MAX_BODY) in general.json()["detail"]
        # A chunked body has no size to check before reading it: refused.
        chunked = client.put(payload, content=iter([b"x" * 10]))
        assert chunked.status_code == 411
        assert chunked.json()["code"] == "length_required"
        assert client.post(f"{edge.url}/api/v1/enroll/", content=iter([b"{}"])).status_code == 411
    assert [(seen.method, seen.path, seen.body_bytes) for seen in backend.requests] == [
        ("PUT", "/api/v1/updates/u-1/payload/", MAX_UPLOAD)
    ]


def test_push_crl_revokes_a_certificate_in_a_running_haproxy(
    edge: RunningHAProxy, pki: EdgePki, backend: RecordingBackend, tmp_path: Path
) -> None:
    cert, key, serial = device_certificate(pki.ca, "car-7", tmp_path / "devices")
    with tls_client(pki.ca_file, (cert, key)) as client:
        assert client.get(f"{edge.url}/api/v1/rounds/").status_code == 200
    pki.ca.write_crl([Revoked(serial=serial, revoked_at=datetime.now(UTC))], pki.crl)
    assert edge.options.admin_socket is not None
    result = runner.invoke(
        app, ["infra", "push-crl", "--admin-socket", str(edge.options.admin_socket), "--crl-file", str(pki.crl)]
    )
    assert result.exit_code == 0, result.output
    with tls_client(pki.ca_file, (cert, key)) as client, pytest.raises(httpx.TransportError, match="revoked"):
        client.get(f"{edge.url}/api/v1/rounds/")
    assert len(backend.requests) == 1
    with pytest.raises(InfraConfigError, match=r"admin socket .*is HAProxy running"):
        push_crl(tmp_path / "no.sock", pki.crl)
