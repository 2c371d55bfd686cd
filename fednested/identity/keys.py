"""Device keys: ECDSA P-256 key pairs generated on the device, the CSR that asks the CA for a certificate, and the
signatures on update envelopes.

P-256 rather than Ed25519 because every party that must check these certificates can: HAProxy (OpenSSL), the Kafka
broker (Java's JSSE) and the edge client (OpenSSL through `cryptography`). The private key never leaves the device;
the control plane keeps only public keys, so nothing it holds can forge a device's signature.
"""

from __future__ import annotations

import base64
import hashlib

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SIGNATURE_SCHEME = "ecdsa-p256-sha256"
# A DER-encoded P-256 ECDSA signature is at most 72 bytes; anything longer is not one.
MAX_SIGNATURE_BYTES = 72
# Largest PEM document (CSR, certificate, public key) accepted from a device: real ones are well under 2 KiB.
MAX_PEM_BYTES = 16 * 1024


class IdentityError(ValueError):
    """A key, CSR, certificate or signature that cannot be used; the message says what was wrong."""


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 PEM without encryption: the file holding it is mode 0600 in a 0700 directory."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_private_key(pem: bytes, *, where: str = "private key") -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"{where}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise IdentityError(f"{where}: must be an ECDSA P-256 key, got {type(key).__name__}")
    return key


def public_key_pem(key: ec.EllipticCurvePublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def load_public_key(pem: str | bytes, *, where: str = "public key") -> ec.EllipticCurvePublicKey:
    raw = pem.encode() if isinstance(pem, str) else pem
    if len(raw) > MAX_PEM_BYTES:
        raise IdentityError(f"{where}: {len(raw)} bytes, more than the {MAX_PEM_BYTES} a public key can need")
    try:
        key = serialization.load_pem_public_key(raw)
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"{where}: not a PEM public key ({exc})") from None
    return _checked_public_key(key, where)


def _checked_public_key(key: object, where: str) -> ec.EllipticCurvePublicKey:
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise IdentityError(f"{where}: must be an ECDSA P-256 public key, got {type(key).__name__}")
    return key


def public_key_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 (hex) of the DER SubjectPublicKeyInfo: what the registry looks keys up by."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def make_csr(key: ec.EllipticCurvePrivateKey, client_id: str) -> bytes:
    """A PEM certificate signing request for `client_id` (the subject CN), signed by `key` (proof of possession)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, client_id)])
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )


def load_csr(pem: str | bytes, *, where: str = "csr") -> x509.CertificateSigningRequest:
    """A CSR whose self-signature verifies and whose key is P-256; IdentityError otherwise."""
    raw = pem.encode() if isinstance(pem, str) else pem
    if len(raw) > MAX_PEM_BYTES:
        raise IdentityError(f"{where}: {len(raw)} bytes, more than the {MAX_PEM_BYTES} a CSR can need")
    try:
        csr = x509.load_pem_x509_csr(raw)
        valid = csr.is_signature_valid
        public_key = csr.public_key()
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"{where}: not a PEM certificate signing request ({exc})") from None
    if not valid:
        raise IdentityError(f"{where}: its signature does not verify (the CSR must be signed by its own key)")
    _checked_public_key(public_key, where)
    return csr


def csr_common_name(csr: x509.CertificateSigningRequest, *, where: str = "csr") -> str:
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str):
        raise IdentityError(f"{where}: the subject must hold exactly one common name (the client id)")
    return names[0].value


def csr_public_key(csr: x509.CertificateSigningRequest) -> ec.EllipticCurvePublicKey:
    return _checked_public_key(csr.public_key(), "csr")


def sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> str:
    """`ecdsa-p256-sha256:<base64url DER signature>` over `data`.

    Deterministic (RFC 6979): the same key and data give the same signature, so an envelope re-sent after a crash is
    byte for byte the one sent before, and the control plane answers it as a duplicate, not a conflict.
    """
    raw = key.sign(data, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    return f"{SIGNATURE_SCHEME}:{base64.urlsafe_b64encode(raw).decode().rstrip('=')}"


def verify(key: ec.EllipticCurvePublicKey, data: bytes, signature: str) -> bool:
    """True when `signature` (as made by `sign`) is `key`'s signature over `data`; False for anything else."""
    scheme, _, value = signature.partition(":")
    if scheme != SIGNATURE_SCHEME or not value or len(value) > 2 * MAX_SIGNATURE_BYTES:
        return False
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except ValueError:
        return False
    if len(raw) > MAX_SIGNATURE_BYTES:
        return False
    try:
        key.verify(raw, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True
