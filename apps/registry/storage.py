"""The artifact store on disk (FEDNESTED_ARTIFACT_ROOT): store-relative URIs and the files they name inside it.

Rows record locations as `artifacts://<path relative to the store>`, so a restored backup or a store mounted at
another path serves the same files once FEDNESTED_ARTIFACT_ROOT names it. Every path the control plane or a worker
opens from a URI goes through `artifact_path`, so no URI (or symlink) reaches a file outside the store; messages name
files relative to the store, never by the server's absolute path.
"""

import re
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote, urlsplit

from django.conf import settings

ARTIFACTS_SCHEME = "artifacts"
ARTIFACTS_PREFIX = f"{ARTIFACTS_SCHEME}://"


class StoreProblem(StrEnum):
    """What can be wrong between a row and the store: the `code` of a refused registration or download and the kind
    of a `manage.py check_store` finding."""

    OUTSIDE_STORE = "outside_store"  # the URI (or a symlink on the way) leaves the store, or is not a store URI
    NOT_IN_STORE = "not_in_store"  # the row names a file the store does not hold
    SIZE_MISMATCH = "size_mismatch"
    SHA256_MISMATCH = "sha256_mismatch"
    NOT_STORE_RELATIVE = "not_store_relative"  # inside the store, but recorded by absolute path (check_store warns)
    ORPHAN = "orphan"  # a file in the store that no row names (check_store warns)


def artifact_root() -> Path:
    """The store's root folder, from settings (FEDNESTED_ARTIFACT_ROOT)."""
    return Path(settings.FEDNESTED_ARTIFACT_ROOT)


def artifact_uri(relative: str) -> str:
    """The `artifacts://…` URI of a path relative to the store's root."""
    return f"{ARTIFACTS_PREFIX}{relative.lstrip('/')}"


def artifact_path(uri: str, root: Path) -> Path:
    """The file an `artifacts://<path>` URI (relative to the store), a `file://` URI or a relative path names.

    Whatever the form, the file must lie inside the artifact root `root`: ValueError for other schemes and for paths
    that leave the root (through '..' or a symlink). The message quotes `uri`, never the root.
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
    if not resolved.is_relative_to(_resolved_root(root)):
        raise ValueError(f"{uri!r} points outside the artifact store")
    return resolved


@lru_cache(maxsize=16)
def _resolved_root(root: Path) -> Path:
    # The ingest worker resolves a URI per envelope: the root's own resolution is kept (a root whose symlink is
    # re-pointed while the process runs only refuses more, never less: files must lie under the old target too).
    return root.resolve()


def store_relative(path: Path, root: Path) -> str:
    """`path` relative to the store's root, POSIX-style ('.' for the root); ValueError when it lies outside."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise ValueError(f"{path.name!r} lies outside the artifact store")
    return resolved.relative_to(root.resolve()).as_posix()


def store_uri(uri: str, root: Path) -> str:
    """The `artifacts://` URI (what rows record) of a location inside the store given in any form `artifact_path`
    reads; ValueError, quoting `uri`, when it leaves the store."""
    return artifact_uri(store_relative(artifact_path(uri, root), root))


def public_location(value: str, root: Path) -> str:
    """A recorded location as API clients see it: absolute paths and `file://` URIs inside the store in their
    `artifacts://` form, those outside it (rows older than store-relative URIs, which `manage.py check_store` lists)
    as ''; anything else (artifacts:// URIs, dataset names) as recorded."""
    if not (value.startswith("/") or urlsplit(value).scheme == "file"):
        return value
    try:
        return store_uri(value, root)
    except ValueError:
        return ""


def redact_store_paths(text: str, root: Path) -> str:
    """`text` with the store's absolute location written as `artifacts://`, for messages that reach API clients from
    code that names files by absolute path (fednested's checkpoint errors, OS errors)."""
    for base in sorted({str(root.absolute()), str(root.resolve())}, key=len, reverse=True):
        if base == "/":
            continue
        # file:///<root>/x and /<root>/x alike; '/<root>-old' is another folder and stays as it is.
        pattern = rf"(?:file://)?{re.escape(base)}(?:/|(?![\w.-]))"
        text = re.sub(pattern, ARTIFACTS_PREFIX, text)
    return text


def file_inside(directory: Path, relative_name: str) -> Path:
    """`directory/relative_name`, resolved; ValueError when the name (or a symlink on the way) leaves `directory`."""
    if not relative_name or relative_name.startswith("/") or ".." in relative_name.split("/"):
        raise ValueError(f"{relative_name!r} is not a plain relative file name")
    resolved = (directory / relative_name).resolve()
    if not resolved.is_relative_to(directory.resolve()):
        raise ValueError(f"{relative_name!r} points outside its version's folder")
    return resolved
