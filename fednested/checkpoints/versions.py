"""Immutable model versions on disk: core / experts / gate safetensors, config, tokenizer, manifest.json."""

# A version is written into a temporary sibling directory and renamed into place, so a reader never sees half of one;
# loading verifies every sha256 before reading a tensor, then checks names and shapes against the config.

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from fednested.checkpoints.errors import CheckpointError
from fednested.checkpoints.manifest import (
    MANIFEST_NAME,
    FileEntry,
    FilePartition,
    Manifest,
    architecture_of,
    file_entry,
    read_manifest,
    utc_now,
    verify_files,
    write_manifest,
)
from fednested.models.presets import UnknownPresetError, family_of
from fednested.partition import PartitionKind, PartitionMap, partition_model

CONFIG_NAME = "config.json"
# One file per coarse partition; a fused expert tensor is stored whole (its slices all belong to experts).
PARTITION_FILES: dict[PartitionKind, str] = {
    "core": "core.safetensors",
    "expert": "experts.safetensors",
    "gate": "gate.safetensors",
}
_FILE_PARTITION: dict[PartitionKind, FilePartition] = {"core": "core", "expert": "experts", "gate": "gate"}


def _state_by_kind(model: PreTrainedModel, partition: PartitionMap) -> dict[PartitionKind, dict[str, torch.Tensor]]:
    params = dict(model.named_parameters())
    by_kind: dict[PartitionKind, dict[str, torch.Tensor]] = {kind: {} for kind in PARTITION_FILES}
    for name in partition:
        by_kind[partition.kind_of_file(name)][name] = params[name].detach().to("cpu").contiguous()
    # persistent buffers belong to the core; tied aliases of a parameter (a tied lm_head) are stored once
    param_storage = {p.data_ptr() for p in params.values()}
    for name, tensor in model.state_dict().items():
        if name not in params and tensor.data_ptr() not in param_storage:
            by_kind["core"][name] = tensor.detach().to("cpu").contiguous()
    return by_kind


def _save_tokenizer(tokenizer: Any, directory: Path) -> None:
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(directory))
    elif hasattr(tokenizer, "save"):
        # a bare `tokenizers.Tokenizer`
        tokenizer.save(str(directory / "tokenizer.json"))
    else:
        raise TypeError(f"cannot save a tokenizer of type {type(tokenizer).__name__} (needs save_pretrained or save)")


def save_version(
    model: PreTrainedModel,
    directory: str | Path,
    *,
    version_id: str,
    parent_version: str | None,
    lineage: Mapping[str, Any] | None = None,
    tokenizer: Any = None,
    created_at: str | None = None,
    safeguard_files: Mapping[str, Path] | None = None,
) -> Manifest:
    """Write `model` as an immutable version into `directory` (which must not exist yet) and return its manifest.

    `safeguard_files` (name in the version → file to copy) are shipped with it under partition "safeguards": what a
    device needs to train on this version safely (its Fisher, a replay set), sha256-verified like the weights.
    """
    target = Path(directory)
    if not version_id:
        raise CheckpointError(target, "invalid", "version_id must be a non-empty string")
    extra = dict(safeguard_files or {})
    for name in extra:
        if "/" in name or "\\" in name or name.startswith(".") or name in (*PARTITION_FILES.values(), CONFIG_NAME):
            raise CheckpointError(target / name, "invalid", "a safeguard file needs a plain name of its own")
    if target.exists():
        raise CheckpointError(target, "exists", "a version directory is immutable; choose a new directory")
    if hasattr(model, "peft_config"):
        raise CheckpointError(target, "invalid", "save the plain base model; merge adapter deltas into it first")
    try:
        family_of(model.config)
    except UnknownPresetError as error:
        raise CheckpointError(target, "other architecture", str(error)) from error
    partition = partition_model(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        files: dict[str, FileEntry] = {}
        for kind, tensors in _state_by_kind(model, partition).items():
            if not tensors:
                continue
            name = PARTITION_FILES[kind]
            save_file(tensors, str(staging / name), metadata={"format": "pt", "fednested.partition": kind})
            files[name] = file_entry(staging / name, _FILE_PARTITION[kind])
        (staging / CONFIG_NAME).write_text(model.config.to_json_string(use_diff=False), encoding="utf-8")
        files[CONFIG_NAME] = file_entry(staging / CONFIG_NAME, "config")
        for name, source in sorted(extra.items()):
            shutil.copyfile(source, staging / name)
            files[name] = file_entry(staging / name, "safeguards")
        if tokenizer is not None:
            before = set(os.listdir(staging))
            _save_tokenizer(tokenizer, staging)
            for name in sorted(set(os.listdir(staging)) - before):
                if (staging / name).is_file():
                    files[name] = file_entry(staging / name, "tokenizer")
        manifest = Manifest(
            version_id=version_id,
            kind="version",
            parent_version=parent_version,
            architecture=architecture_of(model.config),
            files=files,
            partition=partition,
            lineage=dict(lineage or {}),
            created_at=created_at or utc_now(),
        )
        write_manifest(staging, manifest)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def verify_version(directory: str | Path) -> Manifest:
    """The manifest of a version directory, after checking that every listed file is present and intact."""
    manifest = read_manifest(directory)
    if manifest.kind != "version":
        raise CheckpointError(Path(directory) / MANIFEST_NAME, "invalid", f"this is an {manifest.kind}, not a version")
    for kind, name in PARTITION_FILES.items():
        if name not in manifest.files and manifest.partition is not None and manifest.partition.names_of_kind(kind):
            raise CheckpointError(Path(directory) / name, "missing", "not listed in manifest.json")
    if CONFIG_NAME not in manifest.files:
        # The config decides how the weights are used (and carries run-time keys the architecture id leaves out):
        # it is loaded only when the manifest vouches for its bytes.
        raise CheckpointError(Path(directory) / CONFIG_NAME, "missing", "not listed in manifest.json")
    verify_files(directory, manifest)
    return manifest


def _read_config(directory: Path, manifest: Manifest) -> PretrainedConfig:
    path = directory / CONFIG_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(path, "corrupt", f"not valid JSON: {error}") from error
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise CheckpointError(path, "other architecture", "config.json names no model_type")
    try:
        config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(path, "other architecture", f"not a supported model config: {error}") from error
    try:
        family_of(config)
    except UnknownPresetError as error:
        raise CheckpointError(path, "other architecture", str(error)) from error
    actual = architecture_of(config)
    if actual["id"] != manifest.architecture_id or actual["family"] != manifest.architecture.get("family"):
        raise CheckpointError(
            path,
            "other architecture",
            f"config.json describes {actual['family']} {actual['id'][:12]}, manifest.json records "
            f"{manifest.architecture.get('family')} {manifest.architecture_id[:12]}",
        )
    return config


def _expected_tensors(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    expected: dict[str, torch.Tensor] = dict(model.named_parameters())
    param_storage = {p.data_ptr() for p in expected.values()}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name not in expected and tensor.data_ptr() not in param_storage:
            expected[name] = tensor
    return expected


def open_version(directory: str | Path, *, expected_version: str | None = None) -> tuple[Manifest, PretrainedConfig]:
    """(manifest, config) of a version whose files all passed their sha256 check; the version id must match if given."""
    root = Path(directory)
    manifest = verify_version(root)
    if expected_version is not None and manifest.version_id != expected_version:
        raise CheckpointError(
            root / MANIFEST_NAME, "other version", f"holds {manifest.version_id!r}, expected {expected_version!r}"
        )
    return manifest, _read_config(root, manifest)


def load_partition_file(model: PreTrainedModel, directory: str | Path, kind: PartitionKind) -> set[str]:
    """Load core/experts/gate.safetensors into `model` (names and shapes checked); returns the names loaded."""
    path = Path(directory) / PARTITION_FILES[kind]
    expected = _expected_tensors(model)
    partition = partition_model(model)
    loaded: set[str] = set()
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                if key not in expected:
                    raise CheckpointError(path, "other architecture", f"tensor {key!r} does not exist in this model")
                if key in partition.params and partition.kind_of_file(key) != kind:
                    home = PARTITION_FILES[partition.kind_of_file(key)]
                    raise CheckpointError(path, "invalid", f"tensor {key!r} belongs in {home}")
                target = expected[key]
                shape = list(handle.get_slice(key).get_shape())
                if shape != list(target.shape):
                    raise CheckpointError(
                        path, "other shapes", f"tensor {key!r} has shape {shape}, the config needs {list(target.shape)}"
                    )
                # keep the stored dtype bit for bit: replace the storage instead of casting into it
                target.data = handle.get_tensor(key)
                loaded.add(key)
    except SafetensorError as error:
        raise CheckpointError(path, "corrupt", f"unreadable safetensors file: {error}") from error
    return loaded


def check_loaded(
    model: PreTrainedModel, directory: str | Path, loaded: set[str], *, skip_prefixes: tuple[str, ...] = ()
) -> None:
    """Every tensor of `model` (outside `skip_prefixes`) came from some file."""
    missing = sorted(name for name in set(_expected_tensors(model)) - loaded if not name.startswith(skip_prefixes))
    if missing:
        raise CheckpointError(directory, "missing", f"{len(missing)} tensor(s) are in no file, e.g. {missing[:3]}")


def build_empty_model(config: PretrainedConfig) -> PreTrainedModel:
    """A model of `config` with uninitialised weights, for loading into (skips seconds of random initialisation).

    Untouched storage is never paged in, so the weights cost no resident memory until they are written.
    """
    with no_init_weights():
        model = cast(Any, AutoModelForCausalLM).from_config(config)
    assert isinstance(model, PreTrainedModel)
    return model


def load_version(directory: str | Path, *, expected_version: str | None = None) -> tuple[PreTrainedModel, Manifest]:
    """(model in eval mode, manifest) of a version directory; every sha256 is verified before anything is read.

    Tensors are memory-mapped from the files (copy-on-write: writing to the model never touches them), so a version
    directory must stay as it is while a model loaded from it is in use; versions are immutable by design.
    """
    root = Path(directory)
    manifest, config = open_version(root, expected_version=expected_version)
    # weights are overwritten from the files below, so skip the (seconds-long) random initialisation
    model = build_empty_model(config)
    loaded: set[str] = set()
    for kind, name in PARTITION_FILES.items():
        if name in manifest.files:
            loaded |= load_partition_file(model, root, kind)
    check_loaded(model, root, loaded)
    nn.Module.eval(model)
    return model, manifest


def version_file_paths(directory: str | Path, manifest: Manifest) -> dict[str, Path]:
    """Absolute paths of the files of a version (e.g. to hand the tokenizer files to a loader)."""
    root = Path(directory)
    return {name: root / name for name in manifest.files}
