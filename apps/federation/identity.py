"""Device identity services: the keys devices prove they hold (CSRs), the certificates the federation's CA issues for
them, their renewal and revocation, and the CRL that HAProxy checks.

The control plane keeps public keys only. Update envelopes are signed with the device's private key, which never
leaves the device; `device_public_keys` is what the update path verifies them with.
"""

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from apps.federation.choices import DeviceStatus
from apps.federation.models import DeviceKey, EdgeDevice
from apps.governance.actors import Actor
from apps.governance.audit import record_audit_event
from fednested.identity.ca import CAError, CertificateAuthority, Revoked, certificate_pem
from fednested.identity.keys import (
    IdentityError,
    csr_common_name,
    csr_public_key,
    load_csr,
    load_public_key,
    public_key_fingerprint,
    public_key_pem,
)
from fednested.infra.haproxy import InfraConfigError, push_crl

logger = logging.getLogger(__name__)

# HAProxy refuses every client certificate once the CRL's next-update time passes: re-signed at half of this.
CRL_VALIDITY = timedelta(days=7)


@dataclass(frozen=True)
class CheckedRequest:
    """A CSR that verified: its PEM, its public key and that key's fingerprint."""

    pem: str
    public_key: ec.EllipticCurvePublicKey
    fingerprint: str


def check_csr(csr: str, *, client_id: str) -> CheckedRequest:
    """The device's CSR, verified (self-signature, P-256 key, CN = client id); ValidationError on `csr` otherwise."""
    try:
        request = load_csr(csr)
        named = csr_common_name(request)
        key = csr_public_key(request)
    except IdentityError as exc:
        raise ValidationError({"csr": ValidationError(str(exc), code="bad_csr")}) from None
    if named != client_id:
        raise ValidationError(
            {"csr": ValidationError(f"the CSR names {named!r}, not the client id {client_id!r}", code="bad_csr")}
        )
    return CheckedRequest(pem=csr, public_key=key, fingerprint=public_key_fingerprint(key))


@cache
def _load_ca(directory: str) -> CertificateAuthority:
    try:
        return CertificateAuthority.load(Path(directory))
    except CAError as exc:
        raise ImproperlyConfigured(f"FEDNESTED_CA_DIR: {exc}") from exc


def federation_ca() -> CertificateAuthority | None:
    """The CA that issues device certificates, or None when the control plane runs without one (embedded demo)."""
    return _load_ca(settings.FEDNESTED_CA_DIR) if settings.FEDNESTED_CA_DIR else None


def ca_certificate_pem() -> str | None:
    ca = federation_ca()
    return certificate_pem(ca.certificate) if ca is not None else None


def register_device_key(device: EdgeDevice, request: CheckedRequest, *, now: datetime | None = None) -> DeviceKey:
    """Record the key of `request` for `device` and, when a CA is configured, issue its certificate. Caller holds the
    transaction (enrollment and renewal audit it)."""
    ca = federation_ca()
    key = DeviceKey(device=device, fingerprint=request.fingerprint, public_key_pem=public_key_pem(request.public_key))
    if ca is not None:
        validity = timedelta(seconds=settings.FEDNESTED_DEVICE_CERT_VALIDITY_S)
        try:
            certificate = ca.issue_device(request.pem, client_id=device.client_id, validity=validity, now=now)
        except IdentityError as exc:
            raise ValidationError({"csr": ValidationError(str(exc), code="bad_csr")}) from None
        key.certificate_pem = certificate_pem(certificate)
        key.serial = format(certificate.serial_number, "x")
        key.not_after = certificate.not_valid_after_utc
    key.save()
    return key


def live_keys(device: EdgeDevice, *, at: datetime | None = None) -> list[DeviceKey]:
    """The device's keys that are not revoked and whose certificate (if any) was valid at `at` (default now)."""
    at = at or timezone.now()
    # In the query: every renewal adds a row, so a long-lived device has many expired ones.
    valid = Q(not_after__isnull=True) | Q(not_after__gte=at)
    return list(DeviceKey.objects.filter(valid, device=device, revoked_at__isnull=True))


def device_public_keys(device: EdgeDevice, *, at: datetime | None = None) -> list[ec.EllipticCurvePublicKey]:
    """The keys an envelope the device made at `at` may be signed with."""
    return [load_public_key(key.public_key_pem, where=f"key {key.pk}") for key in live_keys(device, at=at)]


def live_certificate(device: EdgeDevice, serial_hex: str) -> bool:
    """True when `serial_hex` (HAProxy's `ssl_c_serial,hex`) is a live, unexpired certificate of `device`."""
    serial = serial_hex.strip().lower().lstrip("0") or "0"
    now = timezone.now()
    return DeviceKey.objects.filter(
        device=device, serial=serial, revoked_at__isnull=True, not_after__gte=now, device__status=DeviceStatus.ACTIVE
    ).exists()


@transaction.atomic
def renew_certificate(device: EdgeDevice, csr: str, *, actor: Actor) -> DeviceKey:
    """A new certificate for an active device, for the key of `csr` (the same key, or a new one: key rotation).

    Earlier certificates stay valid until they expire, so envelopes signed and spooled before renewal still verify.
    """
    device = EdgeDevice.objects.select_for_update().get(pk=device.pk)
    if device.status != DeviceStatus.ACTIVE:
        raise ValidationError({"status": f"device {device.client_id!r} is {device.status}; it cannot renew"})
    if federation_ca() is None:
        raise ValidationError(
            {"csr": ValidationError("this control plane has no CA (FEDNESTED_CA_DIR)", code="no_certificate_authority")}
        )
    request = check_csr(csr, client_id=device.client_id)
    if DeviceKey.objects.filter(fingerprint=request.fingerprint).exclude(device=device).exists():
        raise ValidationError({"csr": ValidationError("this key belongs to another device", code="key_in_use")})
    key = register_device_key(device, request)
    record_audit_event(
        actor=actor,
        verb="federation.device.certificate_renewed",
        target=device,
        data={"client_id": device.client_id, "serial": key.serial, "fingerprint": key.fingerprint},
    )
    return key


def revoke_device_keys(device: EdgeDevice, *, at: datetime) -> int:
    """Revoke every key of `device` (inside the caller's transaction) and publish the CRL once it commits."""
    revoked = DeviceKey.objects.filter(device=device, revoked_at__isnull=True).update(revoked_at=at)
    if revoked and settings.FEDNESTED_CRL_PATH:
        transaction.on_commit(publish_crl)
    return revoked


def publish_crl() -> Path | None:
    """Write the CRL of every revoked, not yet expired certificate to FEDNESTED_CRL_PATH (HAProxy's crl-file), and
    load it into a running HAProxy when FEDNESTED_HAPROXY_ADMIN_SOCKET names its admin socket."""
    ca = federation_ca()
    if ca is None or not settings.FEDNESTED_CRL_PATH:
        return None
    now = timezone.now()
    rows = DeviceKey.objects.filter(revoked_at__isnull=False, not_after__gte=now).exclude(serial="")
    revoked = [Revoked(serial=int(row.serial, 16), revoked_at=row.revoked_at or now) for row in rows]
    path = ca.write_crl(revoked, Path(settings.FEDNESTED_CRL_PATH), validity=CRL_VALIDITY)
    logger.info("wrote the CRL (%d revoked certificates) to %s", len(revoked), path)
    if settings.FEDNESTED_HAPROXY_ADMIN_SOCKET:
        try:
            push_crl(Path(settings.FEDNESTED_HAPROXY_ADMIN_SOCKET), path)
        except InfraConfigError as exc:
            # The file is written: HAProxy reads it at its next reload. Say loudly that it has not yet.
            logger.error("the CRL in %s could not be loaded into HAProxy: %s", path, exc)
    return path


def refresh_crl_if_due(*, now: datetime | None = None) -> Path | None:
    """Publish the CRL when it is missing or past half its lifetime: HAProxy refuses every client certificate once
    the CRL's next-update time has passed, so it is re-signed long before (the ingest worker calls this)."""
    if federation_ca() is None or not settings.FEDNESTED_CRL_PATH:
        return None
    now = now or timezone.now()
    try:
        crl = x509.load_pem_x509_crl(Path(settings.FEDNESTED_CRL_PATH).read_bytes())
        next_update = crl.next_update_utc
    except (OSError, ValueError):
        next_update = None
    if next_update is not None and next_update - now > CRL_VALIDITY / 2:
        return None
    return publish_crl()
