"""Adapter updates on disk: adapters.safetensors (per-expert LoRA factors) + manifest.json naming the base version."""

# This is what an edge device uploads; the server checks it against the base version before computing deltas.

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fednested.adapters.lora import LORA_FACTORS, AdapterError, ExpertLoraConfig, adapter_key, parse_adapter_key
from fednested.checkpoints.errors import CheckpointError
from fednested.checkpoints.manifest import (
    MANIFEST_NAME,
    Manifest,
    file_entry,
    read_manifest,
    utc_now,
    verify_files,
    write_manifest,
)
from fednested.partition import PartitionMap

ADAPTERS_NAME = "adapters.safetensors"


def _check_adapters(
    adapters: Mapping[str, torch.Tensor],
    config: ExpertLoraConfig,
    partition: PartitionMap | None,
    path: Path,
) -> None:
    """Names parse, tensors are finite 2-D fp, both factors exist per expert, and (given a base) shapes fit it."""
    if not adapters:
        raise CheckpointError(path, "invalid", "an update must carry at least one adapter tensor")
    experts: dict[tuple[str, int], set[str]] = {}
    for key, tensor in sorted(adapters.items()):
        try:
            param_name, expert, factor = parse_adapter_key(key)
        except AdapterError as error:
            raise CheckpointError(path, "invalid", str(error)) from error
        if tensor.dim() != 2 or not tensor.is_floating_point():
            raise CheckpointError(
                path, "invalid", f"tensor {key!r} must be a 2-D float tensor, got {tensor.dtype} {list(tensor.shape)}"
            )
        if not torch.isfinite(tensor).all():
            raise CheckpointError(path, "invalid", f"tensor {key!r} holds NaN or infinite values")
        experts.setdefault((param_name, expert), set()).add(factor)
        if partition is None:
            continue
        if param_name not in partition.params or not partition.params[param_name].is_fused_experts:
            raise CheckpointError(
                path, "other architecture", f"tensor {key!r}: the base has no fused expert tensor {param_name!r}"
            )
        num, out_features, in_features = partition.params[param_name].shape
        if expert >= num:
            raise CheckpointError(
                path, "other architecture", f"tensor {key!r}: the base has {num} experts in {param_name}"
            )
        wanted = (config.rank, in_features) if factor == "lora_A" else (out_features, config.rank)
        if tuple(tensor.shape) != wanted:
            raise CheckpointError(
                path, "other shapes", f"tensor {key!r} has shape {list(tensor.shape)}, the base needs {list(wanted)}"
            )
    for (param_name, expert), factors in sorted(experts.items()):
        for factor in LORA_FACTORS:
            if factor not in factors:
                raise CheckpointError(path, "invalid", f"tensor {adapter_key(param_name, expert, factor)!r} is missing")


def save_update(
    adapters: Mapping[str, torch.Tensor],
    directory: str | Path,
    *,
    base_version: str,
    adapter_config: ExpertLoraConfig,
    metadata: Mapping[str, Any],
    base_manifest: Manifest | None = None,
    update_id: str | None = None,
    created_at: str | None = None,
) -> Manifest:
    """Write an adapter update into `directory` (must not exist). With `base_manifest`, names/shapes are checked first.

    The update id defaults to "update-" + the first 16 hex digits of the adapters file's sha256 (content-addressed).
    """
    target = Path(directory)
    if target.exists():
        raise CheckpointError(target, "exists", "an update directory is written once; choose a new directory")
    if base_manifest is not None and base_manifest.version_id != base_version:
        raise CheckpointError(
            target,
            "other base version",
            f"base_version {base_version!r} but base_manifest is {base_manifest.version_id!r}",
        )
    _check_adapters(
        adapters, adapter_config, base_manifest.partition if base_manifest else None, target / ADAPTERS_NAME
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tensors = {key: tensor.detach().to("cpu").contiguous() for key, tensor in sorted(adapters.items())}
        save_file(tensors, str(staging / ADAPTERS_NAME), metadata={"format": "pt", "fednested.partition": "adapters"})
        entry = file_entry(staging / ADAPTERS_NAME, "adapters")
        manifest = Manifest(
            version_id=update_id or f"update-{entry.sha256[:16]}",
            kind="update",
            parent_version=base_version,
            base_version=base_version,
            architecture=dict(base_manifest.architecture) if base_manifest is not None else {},
            files={ADAPTERS_NAME: entry},
            adapter_config=adapter_config.to_dict(),
            metadata=dict(metadata),
            created_at=created_at or utc_now(),
        )
        write_manifest(staging, manifest)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def load_update(
    directory: str | Path, *, base_manifest: Manifest | None = None
) -> tuple[dict[str, torch.Tensor], ExpertLoraConfig, Manifest]:
    """(adapter tensors, adapter config, manifest) of an update, verified (sha256, names, shapes, base version).

    With `base_manifest`, the update must name that version as its base, match its architecture, and fit its
    fused expert tensors; without it only the update's own integrity is checked.
    """
    root = Path(directory)
    manifest_path = root / MANIFEST_NAME
    manifest = read_manifest(root)
    if manifest.kind != "update":
        raise CheckpointError(manifest_path, "invalid", f"this is a {manifest.kind}, not an update")
    if ADAPTERS_NAME not in manifest.files:
        raise CheckpointError(root / ADAPTERS_NAME, "missing", "not listed in manifest.json")
    verify_files(root, manifest)
    if manifest.adapter_config is None:
        raise CheckpointError(manifest_path, "corrupt", "field 'adapter_config' is missing")
    try:
        config = ExpertLoraConfig.from_dict(manifest.adapter_config)
    except AdapterError as error:
        raise CheckpointError(manifest_path, "invalid", f"adapter_config: {error}") from error
    if base_manifest is not None:
        if manifest.base_version != base_manifest.version_id:
            raise CheckpointError(
                manifest_path,
                "other base version",
                f"update was trained on {manifest.base_version!r}, the base here is {base_manifest.version_id!r}",
            )
        if manifest.architecture_id and manifest.architecture_id != base_manifest.architecture_id:
            raise CheckpointError(
                manifest_path,
                "other architecture",
                f"update records architecture {manifest.architecture_id[:12]}, "
                f"base is {base_manifest.architecture_id[:12]}",
            )
    path = root / ADAPTERS_NAME
    try:
        adapters = load_file(str(path))
    except SafetensorError as error:
        raise CheckpointError(path, "corrupt", f"unreadable safetensors file: {error}") from error
    _check_adapters(adapters, config, base_manifest.partition if base_manifest is not None else None, path)
    return adapters, config, manifest
