"""Where the server optimiser's state lives: one file per version, `artifacts://server-state/<version_id>.safetensors`,
named with its sha256 in that version's manifest lineage (`aggregation.server_optimizer.state`).

State follows the line of champions: aggregating onto champion C resumes C's state and leaves the candidate its own
file, so a restart (the file is on disk, named by an immutable manifest) or a promotion (the new champion names its
file) loses nothing, and a candidate that is never promoted never leaks its moments into the line. The files are not
in the version's file list, so devices never download them (they are twice the size of the experts for FedAdam).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apps.registry.models import ModelVersion
from apps.registry.storage import artifact_path, artifact_uri
from fednested.aggregation.server_optimizers import (
    ServerOptimizer,
    ServerOptimizerState,
    ServerOptimizerStateError,
    load_server_state,
    save_server_state,
)

logger = logging.getLogger(__name__)

STATE_FOLDER = "server-state"


@dataclass(frozen=True)
class StateReference:
    """A version's optimiser state file as its lineage names it."""

    uri: str
    sha256: str
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self.uri, "sha256": self.sha256, "bytes": self.bytes}


def state_reference(manifest: Any) -> StateReference | None:
    """The state file a version's manifest names, or None (no optimiser state: an uploaded or older version).

    Raises ServerOptimizerStateError when the manifest names one badly (a registered manifest is immutable, so this
    is a bug or tampering: say so rather than start afresh silently)."""
    lineage = manifest.get("lineage") if isinstance(manifest, dict) else None
    aggregation = lineage.get("aggregation") if isinstance(lineage, dict) else None
    optimizer = aggregation.get("server_optimizer") if isinstance(aggregation, dict) else None
    state = optimizer.get("state") if isinstance(optimizer, dict) else None
    if state is None:
        return None
    if not (
        isinstance(state, dict)
        and isinstance(state.get("uri"), str)
        and isinstance(state.get("sha256"), str)
        and isinstance(state.get("bytes"), int)
        and not isinstance(state.get("bytes"), bool)
    ):
        raise ServerOptimizerStateError(f"lineage.aggregation.server_optimizer.state is malformed: {state!r}")
    return StateReference(uri=state["uri"], sha256=state["sha256"], bytes=state["bytes"])


def load_version_state(version: ModelVersion, store: Path) -> ServerOptimizerState | None:
    """The optimiser state `version` left, checked (sha256, size, and that the file says it belongs to `version`);
    None when the version has none. Raises ServerOptimizerStateError saying which file and what is wrong."""
    reference = state_reference(version.manifest)
    if reference is None:
        return None
    try:
        path = artifact_path(reference.uri, store)
    except ValueError as error:
        raise ServerOptimizerStateError(f"version {version.version_id}: state {reference.uri}: {error}") from None
    if path.is_file() and path.stat().st_size != reference.bytes:
        raise ServerOptimizerStateError(
            f"{reference.uri}: {path.stat().st_size} bytes, the lineage of {version.version_id} says {reference.bytes}"
        )
    return load_server_state(path, expected_version=version.version_id, sha256=reference.sha256)


def stage_state(optimizer: ServerOptimizer, *, version_id: str, staging_name: str, store: Path) -> StateReference:
    """Write the state the candidate `version_id` leaves under a staging name of the task's own; returns the
    reference its lineage records (the final location: `install_state` moves it there when registering)."""
    folder = store / STATE_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / staging_name
    sha256 = save_server_state(optimizer, staging, version_id=version_id)
    return StateReference(
        uri=artifact_uri(f"{STATE_FOLDER}/{version_id}.safetensors"), sha256=sha256, bytes=staging.stat().st_size
    )


def staged_path(store: Path, staging_name: str) -> Path:
    return store / STATE_FOLDER / staging_name


def install_state(store: Path, staging_name: str, version_id: str) -> None:
    """Move the staged state into its final place (inside the registering transaction, like the version's files)."""
    os.replace(staged_path(store, staging_name), store / STATE_FOLDER / f"{version_id}.safetensors")


def discard_stale_staging(store: Path, version_id: str) -> None:
    """Staged state files of earlier attempts at this candidate: the task that holds the window now replaces them."""
    for stale in (store / STATE_FOLDER).glob(f".{version_id}.task-*.safetensors"):
        stale.unlink(missing_ok=True)
