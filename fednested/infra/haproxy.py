"""HAProxy at the control plane's edge: TLS termination, client certificates of devices checked against the
federation CA and its CRL, device routes closed to anyone without one, request bodies bounded before Django reads
them, and the verified identity handed to Django in headers only HAProxy can set.

`render_haproxy_config` is a pure function of `HAProxyOptions`; `check_tls_files` and `check_config` check what it
points at; `push_crl` hands a new CRL to a running HAProxy (no restart) through its admin socket.
Django's side is apps.accounts.authentication.ProxyClientCertificateAuthentication, which reads the header names
declared here.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from fednested.infra.endpoint import Endpoint

# Headers HAProxy sets on requests it forwards; every incoming header starting with `X-Fednested-` is deleted first,
# so a client can never send one of these itself.
CLIENT_CN_HEADER = "X-Fednested-Client-Cn"
CLIENT_SERIAL_HEADER = "X-Fednested-Client-Serial"
CLIENT_OU_HEADER = "X-Fednested-Client-Ou"
PROXY_SECRET_HEADER = "X-Fednested-Proxy-Secret"
# Header names are matched lower-case; `_` too because some WSGI servers map `X_Fednested_...` onto the same key.
_OWN_HEADERS_PATTERN = r"^x[-_]fednested[-_]"
# What a client could use to fake its address or scheme to Django; HAProxy sets its own.
_FORWARDING_HEADERS_PATTERN = r"^(forwarded|x[-_]forwarded[-_].*|x[-_]real[-_]ip)$"

CLIENT_CERTIFICATE_REQUIRED = "client_certificate_required"
PAYLOAD_TOO_LARGE = "payload_too_large"
LENGTH_REQUIRED = "length_required"

MIB = 1024 * 1024
# A proxy secret goes into an HTTP header and the config file verbatim: printable, no spaces or quotes.
_SECRET_PATTERN = re.compile(r"^[A-Za-z0-9._~+/=-]{32,256}$")
# Paths are written into the config unquoted: anything that would end or comment out the token is refused.
_UNSAFE_PATH_CHARACTERS = re.compile(r"[\s'\"#\\]")


class InfraConfigError(ValueError):
    """Options or files the config cannot be made from; the message names the option or file and what to do."""


@dataclass(frozen=True)
class DeviceRoute:
    """A route only enrolled devices call: HAProxy demands a verified client certificate on it."""

    method: str
    # Matched against the URL-decoded path, as Django routes it (a `%75pdates` cannot slip past).
    path_regex: str
    # The Django URL name of the view it guards (tests check that the two agree).
    view_name: str
    # Update payloads: bounded by `max_upload_bytes` rather than `max_body_bytes`.
    upload: bool = False


DEVICE_ROUTES: tuple[DeviceRoute, ...] = (
    DeviceRoute("POST", r"^/api/v1/updates/?$", "update-list"),
    DeviceRoute("PUT", r"^/api/v1/updates/[^/]+/payload/?$", "update-payload", upload=True),
    DeviceRoute("POST", r"^/api/v1/devices/[^/]+/heartbeat/?$", "device-heartbeat"),
    DeviceRoute("POST", r"^/api/v1/devices/[^/]+/certificate/?$", "device-certificate"),
)


@dataclass(frozen=True)
class HAProxyOptions:
    """Everything the HAProxy config is made from."""

    bind: Endpoint = field(metadata={"help": "Where HAProxy listens for TLS (HOST:PORT)."})
    backend: Endpoint = field(metadata={"help": "The Django control plane HAProxy forwards to (HOST:PORT)."})
    certificate_bundle: Path = field(
        metadata={"help": "PEM with HAProxy's server certificate (and chain) followed by its private key."}
    )
    ca_file: Path = field(metadata={"help": "The federation CA certificate client certificates must chain to."})
    crl_file: Path = field(
        metadata={"help": "The CA's CRL (FEDNESTED_CRL_PATH): revoked client certificates fail the TLS handshake."}
    )
    proxy_secret: str = field(
        metadata={"help": "Secret HAProxy sends in X-Fednested-Proxy-Secret; Django's FEDNESTED_PROXY_SECRET."}
    )
    max_body_bytes: int = field(
        default=1 * MIB,
        metadata={
            "help": "Largest request body on every route but the payload upload (413); keep it equal to "
            "FEDNESTED_MAX_REQUEST_BYTES."
        },
    )
    max_upload_bytes: int = field(
        default=64 * MIB,
        metadata={"help": "Largest update payload upload (413); keep it equal to FEDNESTED_MAX_UPDATE_BYTES."},
    )
    admin_socket: Path | None = field(
        default=None,
        metadata={"help": "Unix socket of HAProxy's runtime API (mode 0600), for `fednested infra push-crl`."},
    )
    max_connections: int = field(default=2000, metadata={"help": "Concurrent client connections (global maxconn)."})
    connect_timeout_s: int = field(default=5, metadata={"help": "Connecting to Django."})
    client_timeout_s: int = field(default=60, metadata={"help": "Client inactivity, mid-request or mid-upload."})
    server_timeout_s: int = field(default=120, metadata={"help": "Django inactivity while answering."})
    http_request_timeout_s: int = field(default=10, metadata={"help": "Receiving a request's headers."})
    keep_alive_timeout_s: int = field(default=10, metadata={"help": "An idle keep-alive connection."})
    device_routes: tuple[DeviceRoute, ...] = DEVICE_ROUTES

    def __post_init__(self) -> None:
        problems = []
        for name in ("certificate_bundle", "ca_file", "crl_file", "admin_socket"):
            value = getattr(self, name)
            if value is not None and (_UNSAFE_PATH_CHARACTERS.search(str(value)) or not str(value)):
                problems.append(f"{name}: {str(value)!r} holds whitespace, a quote, `#` or `\\`; use a plain path")
        if not _SECRET_PATTERN.match(self.proxy_secret):
            problems.append(
                "proxy secret: must be 32 to 256 characters of A-Z a-z 0-9 . _ ~ + / = - (make one with "
                "`openssl rand -hex 32`)"
            )
        for name in ("max_body_bytes", "max_upload_bytes", "max_connections"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}: must be > 0, got {getattr(self, name)}")
        for name in ("connect_timeout_s", "client_timeout_s", "server_timeout_s", "http_request_timeout_s"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}: must be > 0 seconds, got {getattr(self, name)}")
        if problems:
            raise InfraConfigError("; ".join(problems))


def _json_body(detail: str, code: str) -> str:
    """A `{"detail", "code"}` body (the control plane's error shape) as one single-quoted HAProxy word."""
    body = json.dumps({"detail": detail, "code": code})
    # Inside single quotes HAProxy takes every character literally, up to the next single quote.
    assert "'" not in body, body
    return f"'{body}'"


def _route_condition(route: DeviceRoute) -> str:
    return f"{{ method {route.method} }} {{ path,url_dec -m reg {route.path_regex} }}"


def render_haproxy_config(options: HAProxyOptions) -> str:
    """The haproxy.cfg (HAProxy 2.6) for `options`. It holds the proxy secret: write it with mode 0600."""
    certificate_required = _json_body(
        "this route is for enrolled devices and needs their client certificate: connect with the certificate the "
        "control plane issued at enrollment (renew it before it expires)",
        CLIENT_CERTIFICATE_REQUIRED,
    )
    upload_too_large = _json_body(
        f"update payload larger than {options.max_upload_bytes} bytes, the upload limit of this control plane",
        PAYLOAD_TOO_LARGE,
    )
    body_too_large = _json_body(
        f"request body larger than {options.max_body_bytes} bytes, the limit of this route", PAYLOAD_TOO_LARGE
    )
    length_required = _json_body(
        "request bodies must declare their size in Content-Length: chunked transfer encoding is not accepted",
        LENGTH_REQUIRED,
    )
    json_type = "content-type application/json"
    verified = "{ ssl_c_used } { ssl_c_verify 0 }"
    lines = [
        "# fednested control plane edge, written by `fednested infra generate-haproxy-config`.",
        "# It holds the proxy secret Django trusts: keep this file mode 0600. Check it with `haproxy -c -f <file>`.",
        "global",
        "    log stdout format raw local0 info",
        f"    maxconn {options.max_connections}",
        "    # No TLS session resumption: every connection's client certificate is verified against the current",
        "    # CRL, so a certificate revoked (and pushed with `set ssl crl-file`) cannot resume an earlier session.",
        "    tune.ssl.cachesize 0",
        "    ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets",
        "    ssl-default-bind-ciphers ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
        "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384:"
        "ECDHE-RSA-CHACHA20-POLY1305",
        "    ssl-default-bind-ciphersuites TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256",
    ]
    if options.admin_socket is not None:
        lines.append(f"    stats socket {options.admin_socket} mode 600 level admin")
    lines += [
        "",
        "defaults",
        "    mode http",
        "    log global",
        # httplog's fields, plus the verified client certificate's CN ("-" when none was presented).
        '    log-format "%ci:%cp [%tr] %ft %b/%s %TR/%Tw/%Tc/%Tr/%Ta %ST %B %CC %CS %tsc %ac/%fc/%bc/%sc/%rc '
        '%sq/%bq %hr %hs %{+Q}r cn=%{+Q}[ssl_c_s_dn(cn)]"',
        "    option forwardfor",
        f"    timeout connect {options.connect_timeout_s}s",
        f"    timeout client {options.client_timeout_s}s",
        f"    timeout server {options.server_timeout_s}s",
        f"    timeout http-request {options.http_request_timeout_s}s",
        f"    timeout http-keep-alive {options.keep_alive_timeout_s}s",
        "",
        "frontend fednested_edge",
        # `verify optional`: people (console, API tokens) connect without a certificate; a certificate that is
        # presented must chain to the CA and not be on the CRL, or the handshake fails.
        f"    bind {options.bind} ssl crt {options.certificate_bundle} ca-file {options.ca_file} "
        f"crl-file {options.crl_file} verify optional",
        "    # Identity and forwarding headers are HAProxy's alone: whatever the client sent is dropped.",
        f"    http-request del-header {_OWN_HEADERS_PATTERN} -m reg",
        f"    http-request del-header {_FORWARDING_HEADERS_PATTERN} -m reg",
        "    # Bodies are bounded here, before Django reads a byte. Without Content-Length (chunked) the size is",
        "    # unknown until the body is read, so such requests are refused: every client of the API sends it.",
        f"    http-request return status 411 {json_type} string {length_required} "
        "if { req.hdr_cnt(transfer-encoding) gt 0 }",
    ]
    uploads = [route for route in options.device_routes if route.upload]
    for route in uploads:
        lines.append(
            f"    http-request return status 413 {json_type} string {upload_too_large} "
            f"if {_route_condition(route)} {{ req.hdr_val(content-length) gt {options.max_upload_bytes} }}"
        )
    for route in uploads:
        lines.append(f"    http-request set-var(txn.fednested_upload) bool(true) if {_route_condition(route)}")
    lines += [
        f"    http-request return status 413 {json_type} string {body_too_large} "
        f"if !{{ var(txn.fednested_upload) -m bool }} {{ req.hdr_val(content-length) gt {options.max_body_bytes} }}",
        "    # Device routes: a verified client certificate or nothing.",
    ]
    for route in options.device_routes:
        lines.append(f"    http-request set-var(txn.fednested_device_route) bool(true) if {_route_condition(route)}")
    lines += [
        f"    http-request return status 403 {json_type} string {certificate_required} "
        f"if {{ var(txn.fednested_device_route) -m bool }} !{{ ssl_c_used }} || "
        f"{{ var(txn.fednested_device_route) -m bool }} !{{ ssl_c_verify 0 }}",
        "    # The verified identity, for apps.accounts.authentication.ProxyClientCertificateAuthentication.",
        f"    http-request set-header {CLIENT_CN_HEADER} %[ssl_c_s_dn(cn)] if {verified}",
        f"    http-request set-header {CLIENT_SERIAL_HEADER} %[ssl_c_serial,hex] if {verified}",
        f"    http-request set-header {CLIENT_OU_HEADER} %[ssl_c_s_dn(ou)] if {verified}",
        f"    http-request set-header {PROXY_SECRET_HEADER} {options.proxy_secret}",
        "    http-request set-header X-Forwarded-Proto https",
        "    default_backend fednested_controlplane",
        "",
        "backend fednested_controlplane",
        f"    server django {options.backend}",
        "",
    ]
    return "\n".join(lines)


# --- the files it points at ------------------------------------------------------------------------------------------


def read_proxy_secret(path: Path) -> str:
    """The secret in `path` (one line; surrounding whitespace ignored), as Django's FEDNESTED_PROXY_SECRET_FILE."""
    try:
        secret = path.read_text().strip()
    except OSError as exc:
        raise InfraConfigError(
            f"--proxy-secret-file {path}: cannot read it ({exc.strerror}); make one with "
            f"`(umask 077; openssl rand -hex 32 > {path})`"
        ) from None
    if not _SECRET_PATTERN.match(secret):
        raise InfraConfigError(
            f"--proxy-secret-file {path}: the secret must be one line of 32 to 256 characters of A-Z a-z 0-9 . _ ~ + "
            "/ = - (make one with `openssl rand -hex 32`)"
        )
    return secret


def _load_private_key(pem: bytes, where: Path) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise InfraConfigError(f"{where}: no unencrypted PEM private key ({exc})") from None


def _load_certificates(pem: bytes, where: Path) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise InfraConfigError(f"{where}: no PEM certificate ({exc})") from None
    return certificates


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` with mode 0600 from the first byte, replacing it atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_private_file(path: Path, text: str) -> Path:
    """A config or bundle holding secrets: mode 0600, replaced atomically."""
    _write_private(path, text.encode())
    return path


def write_certificate_bundle(certificate: Path, key: Path, out: Path) -> Path:
    """HAProxy wants one `crt` file: `certificate` (with any chain) then `key`, checked to belong together; 0600."""
    try:
        certificate_pem, key_pem = certificate.read_bytes(), key.read_bytes()
    except OSError as exc:
        raise InfraConfigError(f"{exc.filename}: cannot read it ({exc.strerror})") from None
    leaf = _load_certificates(certificate_pem, certificate)[0]
    private_key = _load_private_key(key_pem, key)
    if leaf.public_key() != private_key.public_key():
        raise InfraConfigError(f"{key} is not the private key of the certificate in {certificate}")
    _write_private(out, certificate_pem.rstrip(b"\n") + b"\n" + key_pem)
    return out


def check_tls_files(options: HAProxyOptions, *, now: datetime | None = None) -> list[str]:
    """Check the files HAProxy will load; raises InfraConfigError on what would stop it or lock devices out,
    returns warnings (e.g. a CRL close to its next update)."""
    now = now or datetime.now(UTC)
    try:
        bundle = options.certificate_bundle.read_bytes()
        ca_pem = options.ca_file.read_bytes()
        crl_pem = options.crl_file.read_bytes()
    except OSError as exc:
        hint = " (the control plane writes it to FEDNESTED_CRL_PATH)" if exc.filename == str(options.crl_file) else ""
        raise InfraConfigError(f"{exc.filename}: cannot read it ({exc.strerror}){hint}") from None
    leaf = _load_certificates(bundle, options.certificate_bundle)[0]
    if leaf.public_key() != _load_private_key(bundle, options.certificate_bundle).public_key():
        raise InfraConfigError(f"{options.certificate_bundle}: its private key is not the key of its certificate")
    if leaf.not_valid_after_utc <= now:
        raise InfraConfigError(
            f"{options.certificate_bundle}: the server certificate expired {leaf.not_valid_after_utc}"
        )
    ca = _load_certificates(ca_pem, options.ca_file)[0]
    try:
        crl = x509.load_pem_x509_crl(crl_pem)
    except ValueError as exc:
        raise InfraConfigError(f"{options.crl_file}: not a PEM CRL ({exc})") from None
    if crl.issuer != ca.subject or not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
        raise InfraConfigError(f"{options.crl_file}: not a CRL signed by the CA in {options.ca_file}")
    warnings = []
    next_update = crl.next_update_utc
    # OpenSSL refuses every client certificate once the CRL is past its next update: all devices would be locked out.
    if next_update is not None and next_update <= now:
        raise InfraConfigError(
            f"{options.crl_file}: the CRL expired at {next_update:%Y-%m-%d %H:%M} UTC; HAProxy would refuse every "
            "device certificate: publish a fresh CRL first"
        )
    if next_update is not None and (next_update - now).total_seconds() < 2 * 86400:
        warnings.append(
            f"{options.crl_file}: the CRL expires at {next_update:%Y-%m-%d %H:%M} UTC; once it has, HAProxy refuses "
            "every device certificate, so publish it again before then"
        )
    return warnings


def check_config(path: Path, *, haproxy: str = "haproxy", timeout_s: float = 30) -> str:
    """Run `haproxy -c -f path`; returns its output, or raises InfraConfigError with it."""
    try:
        result = subprocess.run(
            [haproxy, "-c", "-f", str(path)], capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except FileNotFoundError:
        raise InfraConfigError(f"`{haproxy}` is not installed (Debian: apt-get install haproxy)") from None
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0:
        raise InfraConfigError(f"{path}: `haproxy -c` refused it:\n{output}")
    return output


# --- runtime CRL updates ---------------------------------------------------------------------------------------------


def _runtime_command(admin_socket: Path, command: str, timeout_s: float) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(timeout_s)
        try:
            connection.connect(str(admin_socket))
            connection.sendall(command.encode())
            # One command per connection: HAProxy answers, then closes.
            chunks = []
            while chunk := connection.recv(65536):
                chunks.append(chunk)
        except OSError as exc:
            raise InfraConfigError(
                f"HAProxy admin socket {admin_socket}: {exc.strerror or exc} (is HAProxy running with "
                "`stats socket ... level admin` at that path?)"
            ) from None
    return b"".join(chunks).decode(errors="replace")


def push_crl(admin_socket: Path, crl_file: Path, *, timeout_s: float = 10) -> str:
    """Make a running HAProxy use the CRL now in `crl_file` (which must be the path its config names): the runtime
    API's `set ssl crl-file` then `commit ssl crl-file`. New handshakes check the new CRL at once."""
    try:
        crl_pem = crl_file.read_text()
        x509.load_pem_x509_crl(crl_pem.encode())
    except OSError as exc:
        raise InfraConfigError(f"{crl_file}: cannot read it ({exc.strerror})") from None
    except ValueError as exc:
        raise InfraConfigError(f"{crl_file}: not a PEM CRL ({exc})") from None
    name = str(crl_file)
    # `<<` opens a multi-line payload, which an empty line ends.
    answer = _runtime_command(admin_socket, f"set ssl crl-file {name} <<\n{crl_pem.strip()}\n\n", timeout_s)
    if "transaction created" not in answer and "transaction updated" not in answer:
        raise InfraConfigError(f"HAProxy refused the CRL for {name}: {answer.strip()}")
    answer = _runtime_command(admin_socket, f"commit ssl crl-file {name}\n", timeout_s)
    if "Success!" not in answer:
        _runtime_command(admin_socket, f"abort ssl crl-file {name}\n", timeout_s)
        raise InfraConfigError(f"HAProxy could not commit the CRL for {name}: {answer.strip()}")
    return answer.strip()
