"""`fednested ca init | issue-service | show` through Typer's CliRunner, on real files: key modes, refusal to
overwrite, certificates the CA really signed with the names asked for."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from typer.testing import CliRunner

from fednested.cli import app
from fednested.identity.ca import CertificateAuthority, certificate_fingerprint, load_certificate

runner = CliRunner()


def test_init_creates_a_private_ca_and_refuses_to_overwrite_it(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    result = runner.invoke(app, ["ca", "init", str(directory), "--organization", "acme-fl"])
    assert result.exit_code == 0, result.output
    key, cert = directory / "ca.key", directory / "ca.crt"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    certificate = load_certificate(cert.read_bytes())
    assert f"key:         {key}" in result.stdout
    assert f"certificate: {cert}" in result.stdout
    assert certificate_fingerprint(certificate) in result.stdout
    assert CertificateAuthority.load(directory).organization == "acme-fl"

    key_before, cert_before = key.read_bytes(), cert.read_bytes()
    again = runner.invoke(app, ["ca", "init", str(directory)])
    assert again.exit_code == 1
    assert again.stderr == f"error: {key} already exists: a CA is there already (use it, or pick another path)\n"
    assert (key.read_bytes(), cert.read_bytes()) == (key_before, cert_before)


def test_init_defaults_to_var_ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert runner.invoke(app, ["ca", "init"]).exit_code == 0
    assert (tmp_path / "var" / "ca" / "ca.key").exists()


def test_issue_service_writes_a_signed_server_certificate(tmp_path: Path) -> None:
    assert runner.invoke(app, ["ca", "init", str(tmp_path / "ca")]).exit_code == 0
    out = tmp_path / "tls"
    args = ["ca", "issue-service", "haproxy", "--dns", "cp.example.org", "--ip", "127.0.0.1", "--out", str(out)]
    result = runner.invoke(app, [*args, "--ca", str(tmp_path / "ca"), "--days", "30"])
    assert result.exit_code == 0, result.output
    key, cert = out / "haproxy.key", out / "haproxy.crt"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    certificate = load_certificate(cert.read_bytes())
    ca = CertificateAuthority.load(tmp_path / "ca")
    assert ca.verify_issued(certificate)
    assert certificate.subject.rfc4514_string() == "CN=haproxy,OU=service,O=fednested"
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["cp.example.org"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert (certificate.not_valid_after_utc - certificate.not_valid_before_utc).days == 30

    # Existing files are replaced only on request.
    refused = runner.invoke(app, [*args, "--ca", str(tmp_path / "ca")])
    assert refused.exit_code == 1
    assert "haproxy.key already exists; pass --force" in refused.stderr
    assert load_certificate(cert.read_bytes()).serial_number == certificate.serial_number
    forced = runner.invoke(app, [*args, "--ca", str(tmp_path / "ca"), "--force"])
    assert forced.exit_code == 0, forced.output
    assert load_certificate(cert.read_bytes()).serial_number != certificate.serial_number


def test_issue_service_refuses_what_would_make_a_useless_certificate(tmp_path: Path) -> None:
    assert runner.invoke(app, ["ca", "init", str(tmp_path / "ca")]).exit_code == 0
    base = ["ca", "issue-service", "--out", str(tmp_path / "tls"), "--ca", str(tmp_path / "ca")]
    cases = [
        (["kafka"], "a server certificate needs at least one --dns or --ip"),
        (["kafka", "--ip", "1.2.3"], "--ip: '1.2.3' does not appear to be an IPv4 or IPv6 address"),
        (["../etc", "--ip", "127.0.0.1"], "service name '../etc'"),
        (["worker", "--no-server", "--no-client"], "good for nothing"),
    ]
    for extra, problem in cases:
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 1, extra
        assert problem in result.stderr, result.stderr
    assert not (tmp_path / "tls").exists() or list((tmp_path / "tls").iterdir()) == []
    # A client-only certificate (a worker talking to Kafka) needs no names.
    client_only = runner.invoke(app, [*base, "worker", "--no-server"])
    assert client_only.exit_code == 0, client_only.output
    missing_ca = runner.invoke(
        app, ["ca", "issue-service", "x", "--ip", "127.0.0.1", "--out", str(tmp_path), "--ca", str(tmp_path / "none")]
    )
    assert missing_ca.exit_code == 1
    assert "run `fednested ca init" in missing_ca.stderr


def test_show_prints_subject_validity_fingerprint_and_key_mode(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    assert runner.invoke(app, ["ca", "init", str(directory), "--days", "365"]).exit_code == 0
    certificate = load_certificate((directory / "ca.crt").read_bytes())
    result = runner.invoke(app, ["ca", "show", str(directory)])
    assert result.exit_code == 0, result.output
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines())
    assert lines["subject"].strip() == "CN=fednested federation CA,O=fednested"
    assert lines["sha256"].strip() == certificate_fingerprint(certificate)
    assert lines["not after"].strip().endswith("(364 days left)")
    assert lines["is a CA"].strip() == "yes"
    assert lines["key"].strip() == f"{directory / 'ca.key'} (mode 0600, ok)"

    (directory / "ca.key").chmod(0o644)
    loose = runner.invoke(app, ["ca", "show", str(directory)])
    assert f"TOO OPEN: run chmod 600 {directory / 'ca.key'}" in loose.stdout
    missing = runner.invoke(app, ["ca", "show", str(tmp_path / "nothing")])
    assert missing.exit_code == 1
    assert "no CA at" in missing.stderr
    assert "fednested ca init" in missing.stderr
