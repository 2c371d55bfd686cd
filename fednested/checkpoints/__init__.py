"""Model versions and adapter updates on disk: split safetensors, manifest.json with sha256 per file, verification."""

from fednested.checkpoints.errors import CheckpointError, CheckpointProblem
from fednested.checkpoints.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    architecture_of,
    file_sha256,
    read_manifest,
    verify_files,
)
from fednested.checkpoints.updates import ADAPTERS_NAME, load_update, save_update
from fednested.checkpoints.versions import (
    CONFIG_NAME,
    PARTITION_FILES,
    load_version,
    save_version,
    verify_version,
    version_file_paths,
)

__all__ = [
    "ADAPTERS_NAME",
    "CONFIG_NAME",
    "MANIFEST_NAME",
    "PARTITION_FILES",
    "CheckpointError",
    "CheckpointProblem",
    "FileEntry",
    "Manifest",
    "architecture_of",
    "file_sha256",
    "load_update",
    "load_version",
    "read_manifest",
    "save_update",
    "save_version",
    "verify_files",
    "verify_version",
    "version_file_paths",
]
