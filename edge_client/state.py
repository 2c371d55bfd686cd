"""The device's state directory: one client at a time (an exclusive lock), the enrolled credential (mode 0600), the
verified model versions and the current version id. Every file is written atomically (temp + fsync + rename)."""

from __future__ import annotations

import fcntl
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from edge_client.errors import EdgeClientError
from fednested.identity.keys import IdentityError, generate_private_key, load_private_key, private_key_pem


class StateError(EdgeClientError):
    """The state directory cannot be used as it is (locked by another client, unsafe permissions, corrupt file)."""


def fsync_dir(path: Path) -> None:
    """Make a rename or create inside `path` durable: without it a crash can forget the new directory entry."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write `data` to `path` so a reader sees either the old file or the whole new one, never a prefix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


@dataclass(frozen=True)
class DeviceCredential:
    """What enrollment gives the device: its id, its API token, and — when the control plane has a CA — its client
    certificate and the CA's certificate (PEM). The private key it signs with lives in its own file (`device.key`)."""

    client_id: str
    api_token: str
    control_plane_url: str
    enrolled_at: str
    certificate: str | None = None
    ca_certificate: str | None = None


class StateDir:
    """Paths under the state directory, and the lock that keeps a second client off them."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    @property
    def credential_file(self) -> Path:
        return self.root / "credential.json"

    @property
    def device_key_file(self) -> Path:
        return self.root / "device.key"

    @property
    def certificate_file(self) -> Path:
        """The client certificate as a file, for TLS libraries that take paths (HTTP mTLS, Kafka)."""
        return self.root / "device.crt"

    @property
    def ca_file(self) -> Path:
        return self.root / "ca.crt"

    def device_key(self) -> ec.EllipticCurvePrivateKey:
        """The device's private key, created (0600) on first use. It is made before enrollment and never leaves the
        device: a retried enrollment sends a CSR for the same key, so it gets the same identity back."""
        path = self.device_key_file
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            key = generate_private_key()
            atomic_write_bytes(path, private_key_pem(key), mode=0o600)
            return key
        if mode & 0o077:
            raise StateError(f"device key {path} has mode {mode:o}; it must be 0600 (run: chmod 600 {path})")
        try:
            return load_private_key(path.read_bytes(), where=str(path))
        except IdentityError as exc:
            raise StateError(f"{exc}; restore the key or enroll this device again with a new token") from None

    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    @property
    def current_version_file(self) -> Path:
        return self.root / "current_version"

    @property
    def lock_file(self) -> Path:
        return self.root / "client.lock"

    def version_dir(self, version_id: str) -> Path:
        if not version_id or "/" in version_id or version_id.startswith("."):
            raise StateError(f"version id {version_id!r} cannot name a directory under {self.versions_dir}")
        return self.versions_dir / version_id

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold an exclusive lock for the client's lifetime; the kernel drops it if the process dies."""
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self.lock_file.read_text().strip() or "unknown"
                raise StateError(
                    f"state directory {self.root} is in use by another edge client (pid {holder}); "
                    "run one client per state directory"
                ) from None
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            yield
        finally:
            os.close(fd)

    def load_credential(self) -> DeviceCredential | None:
        path = self.credential_file
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            return None
        if mode & 0o077:
            raise StateError(f"credential file {path} has mode {mode:o}; it must be 0600 (run: chmod 600 {path})")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return DeviceCredential(**data)
        except (json.JSONDecodeError, TypeError) as exc:
            raise StateError(
                f"credential file {path} is corrupt ({exc}); delete it and enroll with a new token"
            ) from exc

    def save_credential(self, credential: DeviceCredential) -> None:
        if credential.certificate:
            atomic_write_bytes(self.certificate_file, credential.certificate.encode(), mode=0o600)
        if credential.ca_certificate:
            atomic_write_bytes(self.ca_file, credential.ca_certificate.encode(), mode=0o600)
        atomic_write_bytes(self.credential_file, json.dumps(asdict(credential), indent=2).encode(), mode=0o600)

    def current_version(self) -> str | None:
        try:
            return self.current_version_file.read_text(encoding="utf-8").strip() or None
        except FileNotFoundError:
            return None

    def set_current_version(self, version_id: str) -> None:
        atomic_write_bytes(self.current_version_file, version_id.encode(), mode=0o600)
