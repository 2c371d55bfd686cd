"""The device's state directory: one client at a time (an exclusive lock), the enrolled credential (mode 0600), the
verified model versions and the current version id. Every file is written atomically (temp + fsync + rename)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_client.errors import EdgeClientError


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
    """What enrollment gives the device: its id and the API credential it authenticates and signs with."""

    client_id: str
    api_token: str
    control_plane_url: str
    enrolled_at: str

    @property
    def signing_key(self) -> bytes:
        """The HMAC key of update envelopes: the sha256 (hex, ASCII) of the API token. The control plane stores
        only token hashes, so this is the secret both sides hold (workers/ingest verifies with it)."""
        return hashlib.sha256(self.api_token.encode()).hexdigest().encode("ascii")


class StateDir:
    """Paths under the state directory, and the lock that keeps a second client off them."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    @property
    def credential_file(self) -> Path:
        return self.root / "credential.json"

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
        atomic_write_bytes(self.credential_file, json.dumps(asdict(credential), indent=2).encode(), mode=0o600)

    def current_version(self) -> str | None:
        try:
            return self.current_version_file.read_text(encoding="utf-8").strip() or None
        except FileNotFoundError:
            return None

    def set_current_version(self, version_id: str) -> None:
        atomic_write_bytes(self.current_version_file, version_id.encode(), mode=0o600)
