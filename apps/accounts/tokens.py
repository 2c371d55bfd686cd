"""Bearer secrets: generation and hashing shared by API tokens and enrollment tokens."""

import hashlib
import secrets


def new_secret(prefix: str) -> str:
    """A fresh high-entropy secret like `fna_…`; 32 random bytes make brute force and salting moot."""
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def secret_sha256(plaintext: str) -> str:
    """What the database stores and looks up instead of the secret itself."""
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()
