"""Hugging Face MoE checkpoint directories (Mixtral, Qwen2-MoE) → fednested versions, read from a local path only.

Hub checkpoints store one tensor per expert and projection (`…experts.3.w1.weight`); fednested's models fuse each
layer's experts into one 3-D tensor (`…mlp.experts.gate_up_proj`). The importer checks every name, shape and dtype
against the config from the safetensors headers alone, before a single weight is read, then assembles the fused
tensors and writes the version with `save_version` (so the manifest, sha256s and partition map are the usual ones).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from fednested.checkpoints.errors import CheckpointError
from fednested.checkpoints.manifest import Manifest
from fednested.checkpoints.versions import CONFIG_NAME, build_empty_model, save_version
from fednested.models.presets import Family, UnknownPresetError, family_of
from fednested.partition import PartitionError, partition_model

SINGLE_FILE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# The model classes whose hub layout this module maps; anything else would load with silently missing weights.
SUPPORTED_ARCHITECTURES: dict[str, Family] = {"MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe"}
# config.json and the index are small JSON files; a bigger one is not a checkpoint (and must not fill memory).
MAX_CONFIG_BYTES = 1 << 20
MAX_INDEX_BYTES = 64 << 20
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# Per-expert tensor names of each family's hub layout, for (gate half, up half, down) of the fused tensors.
_EXPERT_NAMES: dict[Family, tuple[str, str, str]] = {
    "mixtral": ("block_sparse_moe.experts.{e}.w1.weight", "block_sparse_moe.experts.{e}.w3.weight",
                "block_sparse_moe.experts.{e}.w2.weight"),
    "qwen2_moe": ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight",
                  "mlp.experts.{e}.down_proj.weight"),
}  # fmt: skip
Half = Literal["gate", "up"]


@dataclass(frozen=True)
class _Piece:
    """Where one checkpoint tensor goes: a whole model tensor, or one expert's slice (and half) of a fused one."""

    target: str
    shape: tuple[int, ...]
    expert: int | None = None
    half: Half | None = None


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of the checkpoint: the file that holds it, its shape and dtype as the safetensors header says."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class HfCheckpoint:
    """A checked checkpoint directory: its config, family and every tensor mapped onto the fused model layout."""

    directory: Path
    config: PretrainedConfig
    family: Family
    architecture: str
    tensors: dict[str, SourceTensor]
    pieces: dict[str, _Piece]
    dtype: torch.dtype
    files: list[str] = field(default_factory=list)


def _read_json(path: Path, limit: int) -> Any:
    if not path.is_file():
        raise CheckpointError(path, "missing", "the checkpoint directory has no such file")
    size = path.stat().st_size
    if size > limit:
        raise CheckpointError(path, "invalid", f"{size} bytes; a {path.name} is at most {limit} bytes")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(path, "corrupt", f"not valid JSON: {error}") from error


def read_hf_config(directory: Path) -> tuple[PretrainedConfig, Family, str]:
    """(config, family, architecture class name) of a checkpoint; refuses architectures this module cannot map."""
    path = directory / CONFIG_NAME
    raw = _read_json(path, MAX_CONFIG_BYTES)
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise CheckpointError(path, "other architecture", "config.json names no model_type")
    architectures = raw.get("architectures") or []
    if not isinstance(architectures, list) or len(architectures) > 1:
        raise CheckpointError(path, "other architecture", f"'architectures' must name one class, got {architectures!r}")
    supported = sorted(SUPPORTED_ARCHITECTURES)
    architecture = architectures[0] if architectures else None
    if architecture is not None and architecture not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            path, "other architecture", f"architecture {architecture!r} is not supported; supported: {supported}"
        )
    model_type = raw.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **raw)
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(path, "other architecture", f"model_type {model_type!r}: {error}") from error
    try:
        family = family_of(config)
    except UnknownPresetError as error:
        raise CheckpointError(path, "other architecture", f"{error}; supported classes: {supported}") from error
    if architecture is None:
        architecture = next(name for name, owner in SUPPORTED_ARCHITECTURES.items() if owner == family)
    elif SUPPORTED_ARCHITECTURES[architecture] != family:
        raise CheckpointError(
            path, "other architecture", f"architecture {architecture!r} does not fit model_type {model_type!r}"
        )
    return config, family, architecture


def _shard_path(directory: Path, index_path: Path, name: Any) -> Path:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise CheckpointError(index_path, "invalid", f"shard name {name!r} must be a plain file name in the directory")
    return directory / name


def _checkpoint_files(directory: Path) -> dict[str, list[str]]:
    """Shard file name -> the tensor names the index assigns to it (one entry for a single-file checkpoint)."""
    index_path = directory / INDEX_NAME
    if not index_path.exists():
        if not (directory / SINGLE_FILE_NAME).is_file():
            raise CheckpointError(
                directory, "missing", f"no weights: neither {INDEX_NAME} nor {SINGLE_FILE_NAME} (only safetensors)"
            )
        return {SINGLE_FILE_NAME: []}
    index = _read_json(index_path, MAX_INDEX_BYTES)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(index_path, "invalid", "'weight_map' must be a non-empty object of tensor -> shard")
    shards: dict[str, list[str]] = {}
    for tensor, shard in weight_map.items():
        _shard_path(directory, index_path, shard)
        shards.setdefault(shard, []).append(tensor)
    for shard in sorted(shards):
        if not (directory / shard).is_file():
            raise CheckpointError(
                directory / shard, "missing", f"shard listed in {INDEX_NAME} (for {len(shards[shard])} tensors)"
            )
    return shards


def _read_headers(directory: Path, shards: dict[str, list[str]]) -> dict[str, SourceTensor]:
    """Every tensor's file, shape and dtype from the safetensors headers; each must be where the index says."""
    tensors: dict[str, SourceTensor] = {}
    indexed = any(shards.values())
    for shard, names in sorted(shards.items()):
        path = directory / shard
        listed = set(names)
        try:
            with safe_open(str(path), framework="pt") as handle:
                present = set(handle.keys())
                for name in sorted(present):
                    if indexed and name not in listed:
                        raise CheckpointError(
                            path, "invalid", f"holds tensor {name!r}, which {INDEX_NAME} does not list here"
                        )
                    view = handle.get_slice(name)
                    dtype = _SAFETENSORS_DTYPES.get(view.get_dtype())
                    if dtype is None:
                        raise CheckpointError(
                            path, "other shapes", f"tensor {name!r} is {view.get_dtype()}; only F32, F16 and BF16 load"
                        )
                    tensors[name] = SourceTensor(path, tuple(int(size) for size in view.get_shape()), dtype)
        except SafetensorError as error:
            raise CheckpointError(path, "corrupt", f"unreadable safetensors file: {error}") from error
        absent = sorted(listed - present)
        if absent:
            raise CheckpointError(
                path, "missing", f"{INDEX_NAME} names tensor {absent[0]!r} in this shard, which lacks it"
            )
    return tensors


def _model_tensors(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers, each storage once (a tied lm_head is the embedding, stored once)."""
    tensors: dict[str, torch.Tensor] = dict(model.named_parameters())
    seen = {tensor.data_ptr() for tensor in tensors.values()}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name not in tensors and tensor.data_ptr() not in seen:
            tensors[name] = tensor
    return tensors


def _hub_pieces(directory: Path, model: PreTrainedModel, family: Family) -> tuple[dict[str, _Piece], dict[str, _Piece]]:
    """(hub name -> piece, fused name -> piece): the two layouts a checkpoint may use for each model tensor."""
    try:
        fused = partition_model(model).fused_expert_params()
    except PartitionError as error:
        raise CheckpointError(
            directory / CONFIG_NAME, "other architecture", f"cannot partition this model: {error}"
        ) from error
    gate_name, up_name, down_name = _EXPERT_NAMES[family]
    hub: dict[str, _Piece] = {}
    whole: dict[str, _Piece] = {}
    for name, tensor in _model_tensors(model).items():
        shape = tuple(tensor.shape)
        whole[name] = _Piece(name, shape)
        layer_prefix, _, leaf = name.partition(".mlp.")
        if name in fused and leaf in ("experts.gate_up_proj", "experts.down_proj"):
            num_experts, rows, columns = shape
            for expert in range(num_experts):
                if leaf == "experts.down_proj":
                    hub[f"{layer_prefix}.{down_name.format(e=expert)}"] = _Piece(name, (rows, columns), expert)
                    continue
                # gate_up_proj is [gate; up] along its rows: transformers concatenates w1/gate_proj then w3/up_proj
                halves: tuple[tuple[Half, str], ...] = (("gate", gate_name), ("up", up_name))
                for half, template in halves:
                    hub[f"{layer_prefix}.{template.format(e=expert)}"] = _Piece(
                        name, (rows // 2, columns), expert, half
                    )
        elif family == "mixtral" and leaf == "gate.weight":
            # Mixtral's router lives under block_sparse_moe on the hub, under mlp in transformers' modules
            hub[f"{layer_prefix}.block_sparse_moe.gate.weight"] = _Piece(name, shape)
        else:
            hub[name] = _Piece(name, shape)
    return hub, whole


def _config_dtype(config: PretrainedConfig) -> torch.dtype | None:
    value = getattr(config, "dtype", None)
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        dtype: torch.dtype = getattr(torch, value)
        return dtype
    return None


def _map_tensors(
    directory: Path, model: PreTrainedModel, family: Family, tensors: dict[str, SourceTensor], config: PretrainedConfig
) -> tuple[dict[str, _Piece], torch.dtype]:
    """Checkpoint name -> piece, after checking names, shapes, one dtype, and that every model tensor is covered."""
    hub, whole = _hub_pieces(directory, model, family)
    wanted_dtype = _config_dtype(config)
    pieces: dict[str, _Piece] = {}
    dtypes: set[torch.dtype] = set()
    for name, source in sorted(tensors.items()):
        piece = hub.get(name) or whole.get(name)
        if piece is None:
            raise CheckpointError(
                source.file, "other architecture", f"tensor {name!r} is not part of a {family} model with this config"
            )
        if source.shape != piece.shape:
            raise CheckpointError(
                source.file,
                "other shapes",
                f"tensor {name!r} has shape {list(source.shape)}, config.json needs {list(piece.shape)}",
            )
        if wanted_dtype is not None and source.dtype != wanted_dtype:
            raise CheckpointError(
                source.file, "other shapes", f"tensor {name!r} is {source.dtype}, config.json declares {wanted_dtype}"
            )
        dtypes.add(source.dtype)
        pieces[name] = piece
    if len(dtypes) > 1:
        raise CheckpointError(directory, "other shapes", f"tensors mix dtypes {sorted(map(str, dtypes))}; use one")
    # each model tensor comes from exactly one place: its fused/transformers name, or its hub name(s)
    owner: dict[str, str] = {}
    for name, piece in sorted(pieces.items()):
        if piece.expert is not None:
            continue
        if piece.target in owner:
            raise CheckpointError(
                tensors[name].file, "invalid", f"tensor {name!r} duplicates {owner[piece.target]!r} ({piece.target})"
            )
        owner[piece.target] = name
    for name, piece in sorted(pieces.items()):
        if piece.expert is not None and piece.target in owner:
            raise CheckpointError(
                tensors[name].file, "invalid", f"tensor {name!r} duplicates fused {owner[piece.target]!r}"
            )
    for name in sorted(set(hub) - set(pieces)):
        if hub[name].target not in owner:
            raise CheckpointError(directory, "missing", f"no shard holds tensor {name!r}")
    return pieces, dtypes.pop() if dtypes else torch.float32


def inspect_hf_checkpoint(path: str | Path) -> tuple[HfCheckpoint, PreTrainedModel]:
    """The checked checkpoint and an empty model of its config, before any weight is read.

    Checks: a supported architecture, every shard the index names present, every tensor where the index says, every
    name/shape/dtype matching the config, and every model tensor covered.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(directory, "missing", "not a checkpoint directory (config.json + safetensors)")
    config, family, architecture = read_hf_config(directory)
    shards = _checkpoint_files(directory)
    tensors = _read_headers(directory, shards)
    model = build_empty_model(config)
    pieces, dtype = _map_tensors(directory, model, family, tensors, config)
    checkpoint = HfCheckpoint(directory, config, family, architecture, tensors, pieces, dtype, sorted(shards))
    return checkpoint, model


def _by_file(checkpoint: HfCheckpoint) -> Iterator[tuple[Path, list[str]]]:
    files: dict[Path, list[str]] = {}
    for name in sorted(checkpoint.pieces):
        files.setdefault(checkpoint.tensors[name].file, []).append(name)
    yield from sorted(files.items())


def load_hf_checkpoint(path: str | Path) -> tuple[PreTrainedModel, HfCheckpoint]:
    """(model in eval mode, checked checkpoint): every weight read from the shards, experts fused, bit for bit."""
    checkpoint, model = inspect_hf_checkpoint(path)
    targets = _model_tensors(model)
    # fused tensors are assembled in the checkpoint's dtype, one slice per hub tensor; the rest replace the storage
    fused = {
        piece.target: torch.empty(targets[piece.target].shape, dtype=checkpoint.dtype)
        for piece in checkpoint.pieces.values()
        if piece.expert is not None
    }
    with torch.no_grad():
        for file, names in _by_file(checkpoint):
            try:
                with safe_open(str(file), framework="pt") as handle:
                    for name in names:
                        piece = checkpoint.pieces[name]
                        tensor = handle.get_tensor(name)
                        if piece.expert is None:
                            targets[piece.target].data = tensor
                            continue
                        slot = fused[piece.target][piece.expert]
                        rows = slot.shape[0] // 2
                        if piece.half == "gate":
                            slot[:rows].copy_(tensor)
                        elif piece.half == "up":
                            slot[rows:].copy_(tensor)
                        else:
                            slot.copy_(tensor)
            except SafetensorError as error:
                raise CheckpointError(file, "corrupt", f"unreadable safetensors file: {error}") from error
        for name, tensor in fused.items():
            targets[name].data = tensor
    nn.Module.eval(model)
    return model, checkpoint


def _tokenizer_of(directory: Path) -> Any:
    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from fednested.data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(directory)
    except (OSError, ValueError) as error:
        raise CheckpointError(directory / "tokenizer.json", "invalid", f"cannot load the tokenizer: {error}") from error


def import_hf_checkpoint(
    path: str | Path, out: str | Path, *, version_id: str | None = None, created_at: str | None = None
) -> Manifest:
    """Turn the checkpoint directory `path` into a version in `out` (must not exist); returns its manifest.

    The version id defaults to `hf-<directory name>`. The tokenizer, when the directory has one, goes with it.
    """
    source = Path(path)
    model, checkpoint = load_hf_checkpoint(source)
    lineage = {
        "imported_from": {
            "format": "huggingface-safetensors",
            "directory": source.resolve().name,
            "architecture": checkpoint.architecture,
            "files": checkpoint.files,
            "dtype": str(checkpoint.dtype).removeprefix("torch."),
        }
    }
    return save_version(
        model,
        out,
        version_id=version_id or f"hf-{source.resolve().name}",
        parent_version=None,
        lineage=lineage,
        tokenizer=_tokenizer_of(source),
        created_at=created_at,
    )
