"""Enrollment: trade the one-time token (read from a file) and a CSR for the device's key (made here, never sent)
for the device's credential — its API token and, when the control plane has a CA, its client certificate — once;
later runs reuse the stored credential and never send the token again. Certificates are renewed before expiry."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from edge_client.errors import EdgeClientError
from edge_client.sidecar import Sidecar
from edge_client.state import DeviceCredential, StateDir
from edge_client.transport.http import ControlPlaneClient, ControlPlaneRejected
from fednested.identity.keys import make_csr

# What the control plane answers for a token it will not take (docs/api/device-protocol.md, section 1).
_TOKEN_PROBLEMS = {
    "token_used": "was already used (enrollment tokens work once)",
    "token_expired": "has expired",
    "token_invalid": "is not a valid enrollment token",
}


class EnrollmentError(EdgeClientError):
    """Enrollment could not happen or was refused; the message says why and what to do."""


def read_token(token_file: Path) -> str:
    try:
        token = token_file.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise EnrollmentError(f"enrollment token file {token_file} not found; ask an engineer for a token") from None
    except OSError as exc:
        raise EnrollmentError(f"enrollment token file {token_file}: cannot read ({exc.strerror})") from exc
    if not token or len(token.split()) != 1:
        raise EnrollmentError(f"enrollment token file {token_file} must hold exactly one token on one line")
    return token


def ensure_enrolled(
    state: StateDir,
    api: ControlPlaneClient,
    sidecar: Sidecar,
    *,
    client_id: str,
    token_file: Path,
    display_name: str | None = None,
) -> DeviceCredential:
    """The stored credential if this state directory is enrolled (as `client_id`), else enroll now and store it."""
    existing = state.load_credential()
    if existing is not None:
        if existing.client_id != client_id:
            raise EnrollmentError(
                f"state directory {state.root} is enrolled as {existing.client_id!r}, not {client_id!r}; "
                "use the matching client_id or another state directory"
            )
        return existing
    token = read_token(token_file)
    # The key exists before the request, so a retry after a lost answer proves the same key: same identity back.
    csr = make_csr(state.device_key(), client_id).decode()
    try:
        grant = api.enroll(token, client_id, csr=csr, display_name=display_name)
    except ControlPlaneRejected as exc:
        problem = _TOKEN_PROBLEMS.get(exc.code or "")
        reason = f"the token {problem}" if problem else exc.detail
        sidecar.record("device.enroll_refused", {"client_id": client_id, "status": exc.status, "code": exc.code})
        raise EnrollmentError(
            f"enrollment of {client_id!r} with the token in {token_file} was refused (HTTP {exc.status}): {reason}; "
            "ask an engineer for a new one-time token"
        ) from exc
    if grant.client_id != client_id:
        raise EnrollmentError(f"control plane enrolled {grant.client_id!r} but {client_id!r} was asked for")
    credential = DeviceCredential(
        client_id=client_id,
        api_token=grant.api_token,
        control_plane_url=api.base_url,
        enrolled_at=datetime.now(UTC).isoformat(),
        certificate=grant.certificate,
        ca_certificate=grant.ca_certificate,
    )
    state.save_credential(credential)
    sidecar.record(
        "device.enrolled",
        {"client_id": client_id, "control_plane_url": api.base_url, "certificate": grant.certificate is not None},
    )
    return credential


def certificate_due(credential: DeviceCredential, *, now: datetime | None = None) -> bool:
    """True when the client certificate has less than a third of its lifetime left (or is expired)."""
    if not credential.certificate:
        return False
    certificate = x509.load_pem_x509_certificate(credential.certificate.encode())
    start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    now = now or datetime.now(UTC)
    return now >= end - (end - start) / 3


def renew_if_due(
    state: StateDir, api: ControlPlaneClient, sidecar: Sidecar, credential: DeviceCredential
) -> DeviceCredential:
    """Renew the client certificate (same key) when `certificate_due`; the credential to use from now on."""
    if not certificate_due(credential):
        return credential
    csr = make_csr(state.device_key(), credential.client_id).decode()
    grant = api.renew_certificate(credential.client_id, csr=csr)
    renewed = replace(credential, certificate=grant.certificate, ca_certificate=grant.ca_certificate)
    state.save_credential(renewed)
    sidecar.record("device.certificate_renewed", {"client_id": credential.client_id})
    return renewed
