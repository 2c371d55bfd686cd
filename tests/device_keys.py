"""The private keys test devices enrolled with, by client id: a device makes its key and CSR before enrolling and
signs its envelopes with that key (the control plane keeps the public key only)."""

from cryptography.hazmat.primitives.asymmetric import ec

from fednested.identity.keys import generate_private_key, make_csr

# The latest enrollment of a client id wins (each test database starts empty).
DEVICE_KEYS: dict[str, ec.EllipticCurvePrivateKey] = {}


def device_csr(client_id: str) -> str:
    """A fresh key for `client_id` (kept in DEVICE_KEYS) and its CSR (PEM)."""
    key = generate_private_key()
    DEVICE_KEYS[client_id] = key
    return make_csr(key, client_id).decode()
