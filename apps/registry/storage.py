"""The artifact store on disk (FEDNESTED_ARTIFACT_ROOT): resolving artifact URIs to files that stay inside it.

Version folders, staged update payloads and held-out sets all live under the root; every path the control plane or
a worker opens from a URI goes through `artifact_path`, so no URI (or symlink) reaches a file outside the store.
"""

from pathlib import Path
from urllib.parse import unquote, urlsplit

from django.conf import settings

ARTIFACTS_SCHEME = "artifacts"


def artifact_root() -> Path:
    """The store's root folder, from settings (FEDNESTED_ARTIFACT_ROOT)."""
    return Path(settings.FEDNESTED_ARTIFACT_ROOT)


def artifact_uri(relative: str) -> str:
    """The `artifacts://…` URI of a path relative to the store's root."""
    return f"{ARTIFACTS_SCHEME}://{relative.lstrip('/')}"


def artifact_path(uri: str, root: Path) -> Path:
    """The file an `artifacts://<path>` URI (relative to the store), a `file://` URI or a relative path names.

    Whatever the form, the file must lie inside the artifact root `root`: ValueError for other schemes and for paths
    that leave the root (through '..' or a symlink).
    """
    parts = urlsplit(uri)
    if parts.scheme == ARTIFACTS_SCHEME:
        candidate = root / unquote(parts.netloc) / unquote(parts.path).lstrip("/")
    elif parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"{uri!r}: file URIs on other hosts ({parts.netloc!r}) are not supported")
        candidate = Path(unquote(parts.path))
    elif parts.scheme == "":
        candidate = root / unquote(uri)
    else:
        raise ValueError(
            f"{uri!r}: only artifacts://, file:// and relative paths inside the artifact store are supported"
        )
    resolved = candidate.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise ValueError(f"{uri!r} points outside the artifact store {root}")
    return resolved


def file_inside(directory: Path, relative_name: str) -> Path:
    """`directory/relative_name`, resolved; ValueError when the name (or a symlink on the way) leaves `directory`."""
    if not relative_name or relative_name.startswith("/") or ".." in relative_name.split("/"):
        raise ValueError(f"{relative_name!r} is not a plain relative file name")
    resolved = (directory / relative_name).resolve()
    if not resolved.is_relative_to(directory.resolve()):
        raise ValueError(f"{relative_name!r} points outside {directory}")
    return resolved
