"""Update payloads in the artifact store (claim checks): resolve the URI, check size and sha256, decode the tensors.

Shared by the update service (first check) and the aggregation task (which re-checks size and sha256 before it
reads the factors, since the store may have changed in between). Problems with the payload itself (missing, not a
regular file, not readable, wrong size or sha256) are `UpdateRejected`; a store that cannot be read at all is an
OSError, so the caller retries instead of rejecting a valid update.
"""

import hashlib
from pathlib import Path

from torch import Tensor

from apps.registry.storage import artifact_path
from fednested.adapters.lora import AdapterError, ExpertLoraConfig
from fednested.aggregation import RejectionCode, UpdateRejected
from fednested.aggregation.factors import FactorFileError, read_safetensors_bytes
from fednested.messaging import AdapterSummary

HASH_CHUNK_BYTES = 1 << 20


def checked_payload_path(uri: str, *, sha256: str, size_bytes: int, max_bytes: int, root: Path, client_id: str) -> Path:
    """Where the payload lies, after checking that it is there, as large and with that sha256 (hashed in chunks, so
    checking never holds the file in memory)."""
    path = _located(uri, size_bytes=size_bytes, max_bytes=max_bytes, root=root, client_id=client_id)
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
    except (PermissionError, IsADirectoryError) as error:
        raise UpdateRejected(
            RejectionCode.MALFORMED, f"payload at {uri} cannot be read: {error.strerror}", client_id=client_id
        ) from None
    if digest.hexdigest() != sha256:
        raise UpdateRejected(
            RejectionCode.SHA256_MISMATCH,
            f"payload at {uri} has sha256 {digest.hexdigest()}, the envelope says {sha256}",
            client_id=client_id,
        )
    return path


def _located(uri: str, *, size_bytes: int, max_bytes: int, root: Path, client_id: str) -> Path:
    try:
        path = artifact_path(uri, root)
    except ValueError as error:
        raise UpdateRejected(RejectionCode.MALFORMED, f"payload uri: {error}", client_id=client_id) from None
    if size_bytes > max_bytes:
        raise UpdateRejected(
            RejectionCode.OVERSIZED, f"payload is {size_bytes} bytes, the limit is {max_bytes}", client_id=client_id
        )
    try:
        actual_size = path.stat().st_size
    except FileNotFoundError:
        raise UpdateRejected(
            RejectionCode.MALFORMED,
            f"no payload at {uri} (upload it before publishing the envelope)",
            client_id=client_id,
        ) from None
    if not path.is_file():
        raise UpdateRejected(RejectionCode.MALFORMED, f"payload at {uri} is not a regular file", client_id=client_id)
    if actual_size != size_bytes:
        raise UpdateRejected(
            RejectionCode.SHA256_MISMATCH,
            f"payload at {uri} has {actual_size} bytes, the envelope says {size_bytes}",
            client_id=client_id,
        )
    return path


def fetch_payload(uri: str, *, sha256: str, size_bytes: int, max_bytes: int, root: Path, client_id: str) -> bytes:
    """The payload's bytes, after checking that they are where the envelope says, as large, with that sha256.

    Sizes are checked before reading, so an oversized payload is refused without loading it.
    """
    path = _located(uri, size_bytes=size_bytes, max_bytes=max_bytes, root=root, client_id=client_id)
    try:
        raw = path.read_bytes()
    except (PermissionError, IsADirectoryError) as error:
        raise UpdateRejected(
            RejectionCode.MALFORMED, f"payload at {uri} cannot be read: {error.strerror}", client_id=client_id
        ) from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != sha256:
        raise UpdateRejected(
            RejectionCode.SHA256_MISMATCH,
            f"payload at {uri} has sha256 {digest}, the envelope says {sha256}",
            client_id=client_id,
        )
    return raw


def decode_adapters(raw: bytes, *, client_id: str) -> dict[str, Tensor]:
    """The tensors of a safetensors payload; anything unreadable (a bad header, a dtype adapters do not use, offsets
    that do not fit) is `malformed` or `bad_dtype`, with what was wrong."""
    try:
        return read_safetensors_bytes(raw, where="payload")
    except FactorFileError as error:
        code = RejectionCode.BAD_DTYPE if "dtype" in str(error) else RejectionCode.MALFORMED
        raise UpdateRejected(code, f"not a readable adapter file: {error}", client_id=client_id) from None


def adapter_config_of(summary: AdapterSummary, *, client_id: str) -> ExpertLoraConfig:
    """The LoRA config an envelope says its adapters were trained with (rank, alpha, targets)."""
    try:
        return ExpertLoraConfig(rank=summary.rank, alpha=summary.alpha, targets=tuple(summary.target_modules))
    except AdapterError as error:
        raise UpdateRejected(
            RejectionCode.MALFORMED, f"envelope field 'adapter': {error}", client_id=client_id
        ) from None
