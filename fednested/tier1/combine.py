"""The arithmetic of a core update: the trained delta and the edge aggregates' expert delta, folded into new weights.

W_core <- W_core + eta_core * dW_core and W_experts <- W_experts + eta_t1 * dW_T1 + eta_t2 * dW_edges, per tensor, in
that order of operations (a test recomputes it bit for bit). Gates, when trained, move with the experts' eta_t1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from fednested.checkpoints.errors import CheckpointError
from fednested.checkpoints.versions import PARTITION_FILES, verify_version
from fednested.partition import PartitionKind


@dataclass(frozen=True)
class CoreUpdateEtas:
    """Step sizes of the three deltas (the tier1 config's core_update.eta_*)."""

    core: float = 1.0
    t1: float = 1.0
    t2: float = 1.0


def combine_core_update(
    champion: Mapping[str, torch.Tensor],
    trained: Mapping[str, torch.Tensor],
    kinds: Mapping[str, PartitionKind],
    edge_delta: Mapping[str, torch.Tensor],
    etas: CoreUpdateEtas,
) -> dict[str, torch.Tensor]:
    """New weights from the champion's, the trained ones (same names) and dW_edges (expert tensors only).

    dW = trained - champion is taken in the champion's dtype; a tensor that did not train has dW = 0 and so keeps its
    champion value exactly (w + eta * 0 == w), whatever eta is.
    """
    if set(champion) != set(trained):
        missing = sorted(set(champion) ^ set(trained))
        raise ValueError(f"trained weights and champion name different tensors, e.g. {missing[:3]}")
    unknown = sorted(name for name in edge_delta if kinds.get(name) != "expert")
    if unknown:
        raise ValueError(f"dW_edges may only hold expert tensors; {unknown[:3]} are not experts of this model")
    combined: dict[str, torch.Tensor] = {}
    for name, weight in champion.items():
        delta = trained[name].to(weight.dtype) - weight
        kind = kinds[name]
        if kind == "core":
            combined[name] = weight + etas.core * delta
        else:
            new = weight + etas.t1 * delta
            if name in edge_delta:
                new = new + etas.t2 * edge_delta[name].to(weight.dtype)
            combined[name] = new
    return combined


def _expert_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / PARTITION_FILES["expert"]
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not iterable)
    except SafetensorError as error:
        raise CheckpointError(path, "corrupt", f"unreadable safetensors file: {error}") from error


def check_edge_chain(
    base: Path, aggregates: Sequence[Path], *, architecture_id: str
) -> tuple[str, list[dict[str, Any]]]:
    """Verify the base (last core update) and the aggregates applied since, in order; returns lineage records.

    Each aggregate must be a version whose parent is the one before it (the base for the first): dW_edges is the sum
    of their successive expert deltas, so a gap or a reordering would fold in a change twice or not at all.
    """
    base_manifest = verify_version(base)
    if base_manifest.architecture_id != architecture_id:
        raise CheckpointError(base, "other architecture", "the edge base is not the champion's architecture")
    previous = base_manifest.version_id
    records: list[dict[str, Any]] = []
    for directory in aggregates:
        manifest = verify_version(directory)
        if manifest.architecture_id != architecture_id:
            raise CheckpointError(directory, "other architecture", "an edge aggregate must share the champion's")
        if manifest.parent_version != previous:
            raise CheckpointError(
                directory,
                "other version",
                f"edge aggregate {manifest.version_id!r} has parent {manifest.parent_version!r}, expected "
                f"{previous!r}: list the aggregates applied since the last core update, oldest first",
            )
        records.append(
            {"version_id": manifest.version_id, "parent_version": manifest.parent_version, "path": str(directory)}
        )
        previous = manifest.version_id
    return base_manifest.version_id, records


def edge_expert_delta(base: Path, aggregates: Sequence[Path]) -> dict[str, torch.Tensor]:
    """dW_edges: the sum over the chain base -> aggregate 1 -> ... of each aggregate's expert weights minus its
    parent's (check the chain with `check_edge_chain` first). Empty when no aggregate is given."""
    if not aggregates:
        return {}
    previous = _expert_tensors(base)
    total = {name: torch.zeros_like(tensor) for name, tensor in previous.items()}
    for directory in aggregates:
        current = _expert_tensors(directory)
        if set(current) != set(previous):
            raise CheckpointError(directory, "other architecture", "its expert tensors differ from its parent's")
        for name, tensor in current.items():
            total[name] += tensor - previous[name]
        previous = current
    return total
