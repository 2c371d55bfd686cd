"""`fednested ca ...`: create the federation's certificate authority, issue certificates for its services (HAProxy,
Kafka brokers, workers), and show what a CA directory holds. Device certificates come from enrollment instead."""

from __future__ import annotations

import re
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer
from cryptography import x509

from fednested.cli.errors import fail
from fednested.identity.ca import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    DEFAULT_CA_VALIDITY,
    DEFAULT_ORGANIZATION,
    DEFAULT_SERVICE_VALIDITY,
    CertificateAuthority,
    certificate_fingerprint,
    load_certificate,
)
from fednested.identity.keys import IdentityError

DEFAULT_CA_DIR = Path("var/ca")
# A service name is its certificate's CN and the stem of its files.
SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

ca_app = typer.Typer(
    help="The federation's certificate authority (devices get theirs at enrollment).", no_args_is_help=True
)


@ca_app.command("init")
def init_command(
    directory: Annotated[Path, typer.Argument(help="Where to create the CA (made mode 0700).")] = DEFAULT_CA_DIR,
    organization: Annotated[str, typer.Option(help="O= of every certificate the CA issues.")] = DEFAULT_ORGANIZATION,
    common_name: Annotated[str, typer.Option(help="CN of the CA certificate.")] = "fednested federation CA",
    days: Annotated[int, typer.Option(min=1, help="Validity of the CA certificate.")] = DEFAULT_CA_VALIDITY.days,
) -> None:
    """Create a new CA: a P-256 key (mode 0600) and its self-signed certificate. Refuses to overwrite one."""
    try:
        ca = CertificateAuthority.init(
            directory, common_name=common_name, organization=organization, validity=timedelta(days=days)
        )
    except IdentityError as error:
        fail(str(error))
    typer.echo(f"created the federation CA in {directory}")
    typer.echo(f"  key:         {directory / CA_KEY_FILE} (mode 0600; back it up offline, it signs every identity)")
    typer.echo(f"  certificate: {ca.certificate_path} (public: devices, HAProxy and Kafka trust it)")
    typer.echo(f"  sha256:      {certificate_fingerprint(ca.certificate)}")
    typer.echo(f"the control plane uses it with FEDNESTED_CA_DIR={directory.absolute()}")


@ca_app.command("issue-service")
def issue_service_command(
    name: Annotated[str, typer.Argument(help="The service's name: its certificate's CN and file names.")],
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="Directory for <name>.key and <name>.crt.")],
    dns: Annotated[list[str] | None, typer.Option("--dns", help="DNS name clients connect to (repeatable).")] = None,
    ip: Annotated[list[str] | None, typer.Option("--ip", help="IP address clients connect to (repeatable).")] = None,
    ca_dir: Annotated[Path, typer.Option("--ca", metavar="DIR", help="The CA directory.")] = DEFAULT_CA_DIR,
    server: Annotated[bool, typer.Option("--server/--no-server", help="Usable as a TLS server certificate.")] = True,
    client: Annotated[bool, typer.Option("--client/--no-client", help="Usable as a TLS client certificate.")] = True,
    days: Annotated[int, typer.Option(min=1, help="Validity.")] = DEFAULT_SERVICE_VALIDITY.days,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key and certificate of NAME.")] = False,
) -> None:
    """Issue a key and certificate for a service of the federation (HAProxy, a Kafka broker, a worker)."""
    dns_names, addresses = list(dns or ()), list(ip or ())
    if not SERVICE_NAME.match(name):
        fail(f"service name {name!r}: use 1 to 64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit")
    if not server and not client:
        fail("--no-server and --no-client together leave the certificate good for nothing; drop one")
    if server and not dns_names and not addresses:
        fail("a server certificate needs at least one --dns or --ip: clients check the name they dial against them")
    existing = [path for path in (out / f"{name}.key", out / f"{name}.crt") if path.exists()]
    if existing and not force:
        fail(f"{existing[0]} already exists; pass --force to replace {name}'s key and certificate")
    try:
        ca = CertificateAuthority.load(ca_dir)
        key_path, cert_path = ca.write_service(
            name,
            out,
            dns_names=dns_names,
            ip_addresses=addresses,
            server=server,
            client=client,
            validity=timedelta(days=days),
        )
    except IdentityError as error:
        fail(str(error))
    except ValueError as error:  # an --ip that is no IP address
        fail(f"--ip: {error}")
    certificate = load_certificate(cert_path.read_bytes(), where=str(cert_path))
    typer.echo(f"issued {certificate.subject.rfc4514_string()} by {ca_dir}")
    typer.echo(f"  key:         {key_path} (mode 0600)")
    typer.echo(f"  certificate: {cert_path}")
    typer.echo(f"  valid until: {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")


@ca_app.command("show")
def show_command(
    directory: Annotated[Path, typer.Argument(help="The CA directory.")] = DEFAULT_CA_DIR,
) -> None:
    """Show the CA certificate: subject, validity, SHA-256 fingerprint, and the key file's mode."""
    cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
    try:
        certificate = load_certificate(cert_path.read_bytes(), where=str(cert_path))
    except FileNotFoundError:
        fail(f"no CA at {directory}: {cert_path} is missing (create one with `fednested ca init {directory}`)")
    except OSError as error:
        fail(f"{cert_path}: cannot read it ({error.strerror})")
    except IdentityError as error:
        fail(str(error))
    now = datetime.now(UTC)
    not_after = certificate.not_valid_after_utc
    left = "expired" if not_after <= now else f"{(not_after - now).days} days left"
    typer.echo(f"subject:     {certificate.subject.rfc4514_string()}")
    typer.echo(f"serial:      {certificate.serial_number:x}")
    typer.echo(f"not before:  {certificate.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC")
    typer.echo(f"not after:   {not_after:%Y-%m-%d %H:%M:%S} UTC ({left})")
    typer.echo(f"sha256:      {certificate_fingerprint(certificate)}")
    typer.echo(f"is a CA:     {'yes' if _is_ca(certificate) else 'NO: this certificate cannot sign'}")
    if key_path.exists():
        mode = stat.S_IMODE(key_path.stat().st_mode)
        verdict = "ok" if not mode & 0o077 else f"TOO OPEN: run chmod 600 {key_path}"
        typer.echo(f"key:         {key_path} (mode {mode:04o}, {verdict})")
    else:
        typer.echo(f"key:         none at {key_path} (this copy can verify, not issue)")


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        return bool(certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False
