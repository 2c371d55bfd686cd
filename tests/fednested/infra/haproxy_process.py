"""A real Debian HAProxy on loopback for tests: a test CA with HAProxy's server certificate and an empty CRL, the
process started from a rendered config and stopped at exit, and TLS clients with or without a client certificate.
Used by tests/fednested/infra (behind a recording backend) and tests/apps/accounts (in front of Django)."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest

from fednested.identity.ca import CertificateAuthority, certificate_pem
from fednested.identity.keys import generate_private_key, make_csr, private_key_pem
from fednested.infra.endpoint import Endpoint
from fednested.infra.haproxy import HAProxyOptions, render_haproxy_config, write_private_file

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
CLIENT_TIMEOUT_S = 10.0


def require_tool(command: str, package: str) -> str:
    """The path of `command`; fails when the services are required (`make test`), skips otherwise."""
    found = shutil.which(command)
    if found is None:
        message = f"`{command}` is not installed (Debian package {package}: `scripts/services.sh packages`)"
        if os.environ.get("FEDNESTED_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{message}, but FEDNESTED_REQUIRE_SERVICES=1 says it must be there")
        pytest.skip(message)
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class EdgePki:
    """A test federation CA, HAProxy's certificate bundle for 127.0.0.1, an (empty) CRL and a proxy secret."""

    ca: CertificateAuthority
    bundle: Path
    crl: Path
    secret: str

    @property
    def ca_file(self) -> Path:
        return self.ca.certificate_path


def make_edge_pki(directory: Path) -> EdgePki:
    ca = CertificateAuthority.init(directory / "ca")
    key_path, cert_path = ca.write_service("haproxy", directory / "haproxy-tls", ip_addresses=["127.0.0.1"])
    bundle = directory / "haproxy-tls" / "haproxy.pem"
    write_private_file(bundle, cert_path.read_text() + key_path.read_text())
    crl = ca.write_crl([], directory / "crl.pem")
    return EdgePki(ca=ca, bundle=bundle, crl=crl, secret="s" * 16 + os.urandom(16).hex())


def device_certificate(ca: CertificateAuthority, client_id: str, directory: Path) -> tuple[Path, Path, int]:
    """A device key and a certificate `ca` issued from its CSR: (cert path, key path, serial)."""
    key = generate_private_key()
    certificate = ca.issue_device(make_csr(key, client_id), client_id=client_id)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{client_id}.crt", directory / f"{client_id}.key"
    cert_path.write_text(certificate_pem(certificate))
    write_private_file(key_path, private_key_pem(key).decode())
    return cert_path, key_path, certificate.serial_number


def tls_client(ca_file: Path, certificate: tuple[Path, Path] | None = None) -> httpx.Client:
    """An HTTPS client trusting `ca_file`, presenting `certificate` (cert, key) when given; a fresh TLS session."""
    context = ssl.create_default_context(cafile=str(ca_file))
    if certificate is not None:
        context.load_cert_chain(str(certificate[0]), str(certificate[1]))
    return httpx.Client(verify=context, timeout=CLIENT_TIMEOUT_S)


@dataclass(frozen=True)
class RunningHAProxy:
    options: HAProxyOptions
    config: Path
    log_path: Path

    @property
    def url(self) -> str:
        return f"https://{self.options.bind}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, count: int = 1, timeout_s: float = 5.0) -> str:
        """The log once it holds `text` `count` times: HAProxy logs a request when it ends, just after answering."""
        deadline = time.monotonic() + timeout_s
        while (log := self.log()).count(text) < count:
            if time.monotonic() > deadline:
                pytest.fail(f"haproxy logged {text!r} {log.count(text)} times, not {count}, in {timeout_s}s:\n{log}")
            time.sleep(0.05)
        return log


def edge_options(pki: EdgePki, backend: Endpoint, directory: Path, **overrides: object) -> HAProxyOptions:
    options = HAProxyOptions(
        bind=Endpoint("127.0.0.1", free_port()),
        backend=backend,
        certificate_bundle=pki.bundle,
        ca_file=pki.ca_file,
        crl_file=pki.crl,
        proxy_secret=pki.secret,
        admin_socket=directory / "admin.sock",
    )
    return replace(options, **overrides)  # type: ignore[arg-type]


@contextmanager
def running_haproxy(options: HAProxyOptions, directory: Path) -> Iterator[RunningHAProxy]:
    """HAProxy in the foreground (`-db`) on `options.bind`, logging to a file; stopped when the block ends."""
    binary = require_tool("haproxy", "haproxy")
    config = write_private_file(directory / "haproxy.cfg", render_haproxy_config(options))
    log_path = directory / "haproxy.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([binary, "-f", str(config), "-db"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"haproxy exited with {process.returncode} at start:\n{log_path.read_text()}")
            try:
                socket.create_connection((options.bind.host, options.bind.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"haproxy did not listen on {options.bind} in {START_TIMEOUT_S}s:\n{log_path.read_text()}"
                    )
                time.sleep(0.05)
        yield RunningHAProxy(options=options, config=config, log_path=log_path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)
