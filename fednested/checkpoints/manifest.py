"""manifest.json of a model version or an adapter update: files with sha256, architecture, partition map, lineage."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from transformers import PretrainedConfig

from fednested.checkpoints.errors import CheckpointError
from fednested.models.presets import family_of
from fednested.partition import PartitionError, PartitionMap

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
ManifestKind = Literal["version", "update"]
# "safeguards": files a version ships for training on it rather than weights of it (its Fisher, a replay set).
FilePartition = Literal["core", "experts", "gate", "adapters", "config", "tokenizer", "safeguards"]
_FILE_PARTITIONS: tuple[FilePartition, ...] = (
    "core",
    "experts",
    "gate",
    "adapters",
    "config",
    "tokenizer",
    "safeguards",
)

# Config keys that describe how a model was last run or saved, not what it is; left out of the architecture id.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "transformers_version",
        "_name_or_path",
        "dtype",
        "torch_dtype",
        "use_cache",
        "output_router_logits",
        "_experts_implementation",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "architectures",
        "return_dict",
        "output_hidden_states",
        "output_attentions",
    }
)


@dataclass(frozen=True)
class FileEntry:
    """One file of a version or update: its sha256, size, and which partition it holds."""

    sha256: str
    bytes: int
    partition: FilePartition

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "bytes": self.bytes, "partition": self.partition}


@dataclass
class Manifest:
    """Everything needed to verify and rebuild a version (kind "version") or apply an update (kind "update")."""

    version_id: str
    kind: ManifestKind
    parent_version: str | None
    architecture: dict[str, Any]
    files: dict[str, FileEntry]
    partition: PartitionMap | None = None
    lineage: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    format_version: int = FORMAT_VERSION
    # updates only: the version the adapters were trained on, their config, and free-form client metadata
    base_version: str | None = None
    adapter_config: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def architecture_id(self) -> str:
        value = self.architecture.get("id", "")
        return value if isinstance(value, str) else ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "kind": self.kind,
            "version_id": self.version_id,
            "parent_version": self.parent_version,
            "base_version": self.base_version,
            "created_at": self.created_at,
            "architecture": self.architecture,
            "files": {name: entry.to_dict() for name, entry in sorted(self.files.items())},
            "partition": self.partition.to_dict() if self.partition is not None else None,
            "lineage": self.lineage,
            "adapter_config": self.adapter_config,
            "metadata": self.metadata,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, path: str | Path = MANIFEST_NAME) -> Manifest:
        """Parse and check a manifest object; problems raise CheckpointError naming `path` and the field."""
        try:
            format_version = int(data["format_version"])
            if format_version != FORMAT_VERSION:
                raise CheckpointError(
                    path, "invalid", f"format_version {format_version}, this code reads {FORMAT_VERSION}"
                )
            kind = data["kind"]
            if kind not in ("version", "update"):
                raise CheckpointError(path, "invalid", f"kind must be 'version' or 'update', got {kind!r}")
            files: dict[str, FileEntry] = {}
            for name, entry in dict(data["files"]).items():
                if "/" in name or "\\" in name or name in ("", ".", ".."):
                    raise CheckpointError(path, "invalid", f"file name {name!r} must be a plain name in the directory")
                if entry["partition"] not in _FILE_PARTITIONS:
                    raise CheckpointError(
                        path,
                        "invalid",
                        f"file {name!r}: partition must be one of {_FILE_PARTITIONS}, got {entry['partition']!r}",
                    )
                files[name] = FileEntry(str(entry["sha256"]), int(entry["bytes"]), entry["partition"])
            partition = PartitionMap.from_dict(data["partition"]) if data.get("partition") is not None else None
            return cls(
                version_id=str(data["version_id"]),
                kind=kind,
                parent_version=data.get("parent_version"),
                architecture=dict(data["architecture"]),
                files=files,
                partition=partition,
                lineage=dict(data.get("lineage") or {}),
                created_at=str(data.get("created_at", "")),
                format_version=format_version,
                base_version=data.get("base_version"),
                adapter_config=data.get("adapter_config"),
                metadata=dict(data.get("metadata") or {}),
            )
        except CheckpointError:
            raise
        except KeyError as error:
            raise CheckpointError(path, "corrupt", f"field {error.args[0]!r} is missing") from error
        except (TypeError, ValueError, PartitionError) as error:
            raise CheckpointError(path, "corrupt", f"malformed manifest: {error}") from error

    @classmethod
    def from_json(cls, text: str, *, path: str | Path = MANIFEST_NAME) -> Manifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise CheckpointError(path, "corrupt", f"not valid JSON (line {error.lineno}: {error.msg})") from error
        if not isinstance(data, dict):
            raise CheckpointError(path, "corrupt", "the manifest must be a JSON object")
        return cls.from_dict(data, path=path)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path, partition: FilePartition) -> FileEntry:
    return FileEntry(file_sha256(path), path.stat().st_size, partition)


def structural_config(config: PretrainedConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The config without run/save-time keys: what decides the architecture."""
    raw = config.to_dict() if isinstance(config, PretrainedConfig) else dict(config)
    return {key: value for key, value in sorted(raw.items()) if key not in _VOLATILE_CONFIG_KEYS}


def architecture_of(config: PretrainedConfig) -> dict[str, Any]:
    """{family, model_type, id, config}: `id` is a sha256 of the structural config, equal iff the shapes agree."""
    structure = structural_config(config)
    canonical = json.dumps(structure, sort_keys=True, default=str).encode()
    return {
        "family": family_of(config),
        "model_type": config.model_type,
        "id": hashlib.sha256(canonical).hexdigest(),
        "config": json.loads(json.dumps(config.to_dict(), default=str)),
    }


def read_manifest(directory: str | Path) -> Manifest:
    """manifest.json of `directory`, parsed (not yet checked against the files)."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(path, "missing", "no manifest.json in the directory")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise CheckpointError(path, "corrupt", f"not UTF-8 text ({error.reason})") from error
    return Manifest.from_json(text, path=path)


def verify_files(directory: str | Path, manifest: Manifest) -> None:
    """Every listed file exists with its recorded size and sha256 (sizes first: a cheap truncation check)."""
    root = Path(directory)
    for name, entry in sorted(manifest.files.items()):
        path = root / name
        if not path.is_file():
            raise CheckpointError(path, "missing", f"listed in manifest.json ({entry.partition}) but not present")
        size = path.stat().st_size
        if size < entry.bytes:
            raise CheckpointError(path, "truncated", f"{size} bytes, manifest.json records {entry.bytes}")
        if size > entry.bytes:
            raise CheckpointError(path, "corrupt", f"{size} bytes, manifest.json records {entry.bytes}")
        actual = file_sha256(path)
        if actual != entry.sha256:
            raise CheckpointError(path, "sha256 mismatch", f"file has {actual}, manifest.json records {entry.sha256}")


def write_manifest(directory: Path, manifest: Manifest) -> None:
    (directory / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
