"""The federation's private certificate authority: device certificates from CSRs, service certificates (HAProxy,
Kafka broker, control-plane clients), and certificate revocation lists.

The CA is a directory: `ca.key` (mode 0600, in a 0700 directory) and `ca.crt`. Device certificates are short-lived
and name the client id as their subject CN with `OU=device`; services get `OU=service`. The Kafka broker maps
principals from those subjects (docs/operations/identity.md).
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fednested.identity.keys import (
    IdentityError,
    csr_common_name,
    csr_public_key,
    generate_private_key,
    load_csr,
    load_private_key,
    private_key_pem,
)
from fednested.messaging.schemas import CLIENT_ID_REGEX

CA_KEY_FILE = "ca.key"
CA_CERT_FILE = "ca.crt"
DEVICE_UNIT = "device"
SERVICE_UNIT = "service"
DEFAULT_ORGANIZATION = "fednested"
DEFAULT_CA_VALIDITY = timedelta(days=3650)
DEFAULT_DEVICE_VALIDITY = timedelta(days=7)
DEFAULT_SERVICE_VALIDITY = timedelta(days=365)
# Certificates start a little in the past so a device whose clock runs slightly behind accepts them at once.
CLOCK_SKEW = timedelta(minutes=5)
MAX_DEVICE_VALIDITY = timedelta(days=90)


class CAError(IdentityError):
    """The CA directory cannot be created or used as it is; the message names the file and what to do."""


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def certificate_pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def load_certificate(pem: str | bytes, *, where: str = "certificate") -> x509.Certificate:
    raw = pem.encode() if isinstance(pem, str) else pem
    try:
        return x509.load_pem_x509_certificate(raw)
    except ValueError as exc:
        raise IdentityError(f"{where}: not a PEM certificate ({exc})") from None


def certificate_fingerprint(certificate: x509.Certificate) -> str:
    return certificate.fingerprint(hashes.SHA256()).hex()


def subject_common_name(certificate: x509.Certificate) -> str:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def _key_usage(*, signs_certificates: bool, agrees_keys: bool) -> x509.KeyUsage:
    """Digital signatures always (ECDSA); certificate and CRL signing for the CA; key agreement for TLS servers."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=agrees_keys,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True)
class Revoked:
    """One entry of the CRL: a certificate's serial and when it was revoked."""

    serial: int
    revoked_at: datetime


class CertificateAuthority:
    """A loaded CA: its key and certificate. `init` makes one, `load` opens an existing directory."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate, directory: Path) -> None:
        self.key = key
        self.certificate = certificate
        self.directory = directory

    @property
    def organization(self) -> str:
        values = self.certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        return str(values[0].value) if values else DEFAULT_ORGANIZATION

    @property
    def certificate_path(self) -> Path:
        return self.directory / CA_CERT_FILE

    @classmethod
    def init(
        cls,
        directory: Path,
        *,
        common_name: str = "fednested federation CA",
        organization: str = DEFAULT_ORGANIZATION,
        validity: timedelta = DEFAULT_CA_VALIDITY,
        now: datetime | None = None,
    ) -> CertificateAuthority:
        """Create a new CA in `directory` (made 0700); refuses to overwrite an existing one."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)
        for name in (CA_KEY_FILE, CA_CERT_FILE):
            if (directory / name).exists():
                raise CAError(
                    f"{directory / name} already exists: a CA is there already (use it, or pick another path)"
                )
        key = generate_private_key()
        now = now or datetime.now(UTC)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(signs_certificates=True, agrees_keys=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_private(directory / CA_KEY_FILE, private_key_pem(key))
        _write_public(directory / CA_CERT_FILE, certificate.public_bytes(serialization.Encoding.PEM))
        return cls(key, certificate, directory)

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        """Open the CA in `directory`; its key file must not be readable by group or others."""
        key_path, cert_path = directory / CA_KEY_FILE, directory / CA_CERT_FILE
        try:
            mode = stat.S_IMODE(key_path.stat().st_mode)
            key_pem = key_path.read_bytes()
            cert_pem = cert_path.read_bytes()
        except FileNotFoundError as exc:
            raise CAError(
                f"no CA at {directory}: {exc.filename} is missing (run `fednested ca init {directory}`)"
            ) from None
        except OSError as exc:
            raise CAError(f"CA at {directory}: cannot read {exc.filename} ({exc.strerror})") from None
        if mode & 0o077:
            raise CAError(f"CA key {key_path} has mode {mode:o}; it must be 0600 (run: chmod 600 {key_path})")
        key = load_private_key(key_pem, where=str(key_path))
        certificate = load_certificate(cert_pem, where=str(cert_path))
        if certificate.public_key() != key.public_key():
            raise CAError(f"{cert_path} is not the certificate of the key in {key_path}")
        return cls(key, certificate, directory)

    # --- issuing ---------------------------------------------------------------------------------------------------

    def _leaf(
        self,
        *,
        common_name: str,
        unit: str,
        public_key: ec.EllipticCurvePublicKey,
        validity: timedelta,
        client: bool,
        server: bool,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
        now: datetime | None = None,
    ) -> x509.Certificate:
        now = now or datetime.now(UTC)
        not_after = min(now + validity, self.certificate.not_valid_after_utc)
        usages = ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else []) + (
            [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.organization),
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
                        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                    ]
                )
            )
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(signs_certificates=False, agrees_keys=server), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        alt_names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
        alt_names += [x509.IPAddress(ipaddress.ip_address(address)) for address in ip_addresses]
        if alt_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def issue_device(
        self,
        csr_pem: str | bytes,
        *,
        client_id: str,
        validity: timedelta = DEFAULT_DEVICE_VALIDITY,
        now: datetime | None = None,
    ) -> x509.Certificate:
        """A client certificate for `client_id` from the device's own CSR (its key never leaves the device).

        The CSR must verify, hold a P-256 key, and name exactly `client_id` as its CN.
        """
        if not re.match(CLIENT_ID_REGEX, client_id):
            raise IdentityError(f"client id {client_id!r} cannot name a certificate (pattern {CLIENT_ID_REGEX})")
        if not timedelta(0) < validity <= MAX_DEVICE_VALIDITY:
            raise IdentityError(f"device certificate validity must be between 1 s and {MAX_DEVICE_VALIDITY.days} days")
        csr = load_csr(csr_pem)
        named = csr_common_name(csr)
        if named != client_id:
            raise IdentityError(f"csr: its subject CN is {named!r}, not the client id {client_id!r}")
        return self._leaf(
            common_name=client_id,
            unit=DEVICE_UNIT,
            public_key=csr_public_key(csr),
            validity=validity,
            client=True,
            server=False,
            now=now,
        )

    def issue_service(
        self,
        name: str,
        *,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
        server: bool = True,
        client: bool = True,
        validity: timedelta = DEFAULT_SERVICE_VALIDITY,
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """A key pair and certificate for a service of the federation (HAProxy, a Kafka broker, a worker's client)."""
        key = generate_private_key()
        certificate = self._leaf(
            common_name=name,
            unit=SERVICE_UNIT,
            public_key=key.public_key(),
            validity=validity,
            client=client,
            server=server,
            dns_names=dns_names,
            ip_addresses=ip_addresses,
        )
        return key, certificate

    def write_service(self, name: str, directory: Path, **options: object) -> tuple[Path, Path]:
        """`issue_service` written as `<name>.key` (0600) and `<name>.crt` under `directory`; returns both paths."""
        key, certificate = self.issue_service(name, **options)  # type: ignore[arg-type]
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_path, cert_path = directory / f"{name}.key", directory / f"{name}.crt"
        key_path.unlink(missing_ok=True)
        _write_private(key_path, private_key_pem(key))
        _write_public(cert_path, certificate.public_bytes(serialization.Encoding.PEM))
        return key_path, cert_path

    def verify_issued(self, certificate: x509.Certificate) -> bool:
        """True when this CA signed `certificate` (signature and issuer name)."""
        try:
            certificate.verify_directly_issued_by(self.certificate)
        except (InvalidSignature, ValueError, TypeError):  # a bad signature, or another issuer or algorithm
            return False
        return True

    # --- revocation ------------------------------------------------------------------------------------------------

    def crl(
        self,
        revoked: Iterable[Revoked],
        *,
        validity: timedelta = timedelta(days=7),
        now: datetime | None = None,
    ) -> bytes:
        """A signed CRL (PEM) listing `revoked`; readers (HAProxy) refuse those certificates."""
        now = now or datetime.now(UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(now - CLOCK_SKEW)
            .next_update(now + validity)
        )
        for entry in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(entry.serial).revocation_date(entry.revoked_at).build()
            )
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def write_crl(self, revoked: Iterable[Revoked], path: Path, **options: object) -> Path:
        _write_public(path, self.crl(revoked, **options))  # type: ignore[arg-type]
        return path
