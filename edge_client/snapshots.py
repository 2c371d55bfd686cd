"""Pulling the champion: download the manifest and every file it lists, verify each sha256 against the manifest
(and the manifest's own sha256 against the API), keep verified versions under the state directory by version id,
then load (and quantize) the frozen base. A corrupt download is discarded and retried, never loaded."""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from torch import nn
from transformers import PreTrainedTokenizerBase

from edge_client.errors import EdgeClientError
from edge_client.state import StateDir, fsync_dir
from edge_client.transport.http import (
    MANIFEST_NAME,
    ChampionInfo,
    ControlPlaneClient,
    ControlPlaneUnavailable,
    DownloadCorrupt,
)
from edge_client.transport.retry import RetryPolicy, call_with_retries
from fednested.checkpoints import CheckpointError, Manifest, file_sha256, load_version, verify_version
from fednested.data.tokenizer import load_tokenizer
from fednested.quantization import load_quantized_version

QuantizeBits = Literal[0, 4, 8]


class SnapshotError(EdgeClientError):
    """The champion could not be pulled or does not verify; nothing from it was used."""


@dataclass(frozen=True)
class PulledVersion:
    """A verified version on disk: its id, directory, manifest, and the sha256 of the manifest's bytes."""

    version_id: str
    directory: Path
    manifest: Manifest
    manifest_sha256: str


def _safe_name(name: str, manifest_url: str) -> str:
    """A manifest's file names become paths on the device: refuse anything that could step outside the version."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts or name.startswith("."):
        raise SnapshotError(f"manifest {manifest_url} lists an unsafe file name {name!r}")
    return name


def manifest_files(raw: bytes, info: ChampionInfo) -> dict[str, tuple[str, int]]:
    """{file name: (sha256, bytes)} from the manifest bytes, after checking they describe the announced version
    and agree with the API's file list."""
    try:
        document = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"manifest {info.manifest_url} is not JSON ({exc})") from exc
    if not isinstance(document, dict) or document.get("version_id") != info.version_id:
        found = document.get("version_id") if isinstance(document, dict) else None
        raise SnapshotError(f"manifest {info.manifest_url} is for version {found!r}, not {info.version_id!r}")
    listed = document.get("files")
    if not isinstance(listed, dict) or not listed:
        raise SnapshotError(f"manifest {info.manifest_url} has no 'files' mapping")
    files: dict[str, tuple[str, int]] = {}
    for name, entry in listed.items():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not isinstance(entry.get("bytes"), int)
        ):
            raise SnapshotError(f"manifest {info.manifest_url}: files[{name!r}] needs sha256 and bytes")
        files[_safe_name(name, info.manifest_url)] = (entry["sha256"], entry["bytes"])
    announced = {ref.name: (ref.sha256, ref.bytes) for ref in info.files}
    if announced and announced != files:
        differing = sorted(set(announced) ^ set(files)) or sorted(n for n in files if files[n] != announced.get(n))
        raise SnapshotError(
            f"the API's file list for {info.version_id} disagrees with its manifest at {differing[:3]}; not using it"
        )
    return files


def _already_verified(directory: Path, info: ChampionInfo) -> Manifest | None:
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file() or file_sha256(manifest_path) != info.manifest_sha256:
        return None
    try:
        return verify_version(directory)
    except CheckpointError:
        return None


def pull_champion(
    api: ControlPlaneClient,
    state: StateDir,
    retry: RetryPolicy,
    *,
    info: ChampionInfo | None = None,
    rng: random.Random | None = None,
    deadline: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> PulledVersion:
    """Download and verify the champion into `<state>/versions/<version_id>/` (reusing it if already there)."""
    retry_on = (ControlPlaneUnavailable, DownloadCorrupt)
    generator = rng or random.Random()
    if info is None:
        info = call_with_retries(
            "ask for the champion",
            api.champion,
            retry,
            retry_on=retry_on,
            rng=generator,
            sleep=sleep,
            deadline=deadline,
        )
    target = state.version_dir(info.version_id)
    manifest = _already_verified(target, info)
    if manifest is not None:
        return PulledVersion(info.version_id, target, manifest, info.manifest_sha256)

    staging = state.versions_dir / f".partial-{info.version_id}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True, mode=0o700)
    try:

        def fetch(url: str, name: str, sha256: str, size: int | None) -> None:
            call_with_retries(
                f"download {name} of {info.version_id}",
                lambda: api.download(url, staging / name, expected_sha256=sha256, expected_bytes=size),
                retry,
                retry_on=retry_on,
                rng=generator,
                sleep=sleep,
                deadline=deadline,
                on_retry=lambda attempt, exc, delay: api.sidecar.record(
                    "snapshot.retry",
                    {"version_id": info.version_id, "file": name, "attempt": attempt, "error": str(exc)},
                ),
            )

        fetch(info.manifest_url, MANIFEST_NAME, info.manifest_sha256, None)
        files = manifest_files((staging / MANIFEST_NAME).read_bytes(), info)
        by_name = {ref.name: ref.url for ref in info.files}
        for name, (sha256, size) in files.items():
            fetch(by_name.get(name) or api.version_file_url(info.version_id, name), name, sha256, size)
        try:
            manifest = verify_version(staging)
        except CheckpointError as exc:
            raise SnapshotError(f"version {info.version_id} downloaded but does not verify: {exc}") from exc
        if target.exists():
            # A directory left by an earlier, interrupted or tampered copy: never mix files of two downloads.
            shutil.rmtree(target)
        os.rename(staging, target)
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    api.sidecar.record(
        "snapshot.verified",
        {"version_id": info.version_id, "manifest_sha256": info.manifest_sha256, "files": sorted(files)},
    )
    return PulledVersion(info.version_id, target, manifest, info.manifest_sha256)


@dataclass
class LoadedBase:
    """The frozen base ready for adapters: model (quantized if asked), tokenizer, and which version it is."""

    version: PulledVersion
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    quantize_bits: int


def load_base(version: PulledVersion, *, quantize_bits: QuantizeBits = 0, lean_allocator: bool = True) -> LoadedBase:
    """Load a pulled version (every sha256 is verified again first). A quantized base is loaded straight into
    int8/NF4 one expert tensor at a time, so the full-precision experts are never all resident on the device."""
    model: nn.Module
    try:
        if quantize_bits:
            model, _ = load_quantized_version(
                version.directory, quantize_bits, expected_version=version.version_id, lean_allocator=lean_allocator
            )
        else:
            model, _ = load_version(version.directory, expected_version=version.version_id)
    except CheckpointError as exc:
        raise SnapshotError(f"version {version.version_id} in {version.directory} does not load: {exc}") from exc
    tokenizer = load_tokenizer(version.directory)
    model.train(False)
    return LoadedBase(version=version, model=model, tokenizer=tokenizer, quantize_bits=quantize_bits)
