"""`fednested import hf` and `fednested export onnx`: checkpoints in from Hugging Face directories, versions out to
ONNX. Both import their machinery (torch, transformers, onnx) only when they run, so `fednested --help` stays fast."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from fednested.cli.errors import fail

import_app = typer.Typer(help="Bring models from other formats in as fednested versions.", no_args_is_help=True)
export_app = typer.Typer(help="Write fednested versions out in other formats.", no_args_is_help=True)

# The artifact store's layout (workers/aggregation.py writes versions there): <store>/versions/<version id>/.
VERSIONS_FOLDER = "versions"
STORE_ENV = "FEDNESTED_ARTIFACT_ROOT"


@import_app.callback()
def import_group() -> None:
    """Bring models from other formats in as fednested versions."""


@export_app.callback()
def export_group() -> None:
    """Write fednested versions out in other formats."""


@import_app.command("hf")
def import_hf(
    path: Annotated[Path, typer.Argument(help="Local Hugging Face checkpoint directory (config.json + safetensors).")],
    out: Annotated[Path, typer.Option("--out", help="Version directory to create (must not exist).")],
    version_id: Annotated[
        str | None, typer.Option("--version-id", help="Id of the new version; default hf-<directory name>.")
    ] = None,
) -> None:
    """Check a Mixtral or Qwen2-MoE checkpoint (single or sharded safetensors) and write it as a version."""
    from fednested.checkpoints.errors import CheckpointError
    from fednested.checkpoints.hf_import import import_hf_checkpoint

    try:
        manifest = import_hf_checkpoint(path, out, version_id=version_id)
    except (CheckpointError, OSError) as error:
        fail(str(error))
    total = manifest.partition.total_parameters() if manifest.partition is not None else 0
    typer.echo(f"wrote version {manifest.version_id} ({manifest.architecture['family']}, {total} parameters) to {out}")


def resolve_version_dir(version_dir: Path | None, version_id: str | None, store: Path | None) -> Path:
    """The directory of the version to export: given outright, or `<store>/versions/<id>` (store from
    --store or FEDNESTED_ARTIFACT_ROOT); the id may not lead outside that folder."""
    if (version_dir is None) == (version_id is None):
        fail("give exactly one of --version ID (a version in the artifact store) or --version-dir DIR")
    if version_dir is not None:
        return version_dir
    assert version_id is not None
    root = store if store is not None else Path(os.environ[STORE_ENV]) if os.environ.get(STORE_ENV) else None
    if root is None:
        fail(f"--version {version_id} needs the artifact store: pass --store DIR or set {STORE_ENV}")
    folder = root / VERSIONS_FOLDER
    candidate = folder / version_id
    if not version_id or candidate.resolve().parent != folder.resolve():
        fail(f"--version {version_id!r} is not a plain version id")
    if not candidate.is_dir():
        fail(f"the artifact store {root} holds no version {version_id!r} (looked in {candidate})")
    return candidate


@export_app.command("onnx")
def export_onnx(
    version: Annotated[
        str | None, typer.Option("--version", metavar="ID", help="Version id, looked up in the artifact store.")
    ] = None,
    version_dir: Annotated[
        Path | None, typer.Option("--version-dir", help="Version directory, instead of --version.")
    ] = None,
    store: Annotated[
        Path | None, typer.Option("--store", help=f"Artifact store root for --version; default ${STORE_ENV}.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="ONNX file to write; default <version id>.onnx here.")
    ] = None,
    update: Annotated[
        Path | None,
        typer.Option("--update", help="Update directory trained on this version: its adapters are merged first."),
    ] = None,
) -> None:
    """Export a version (fp32, dynamic batch and sequence) to ONNX and check its logits against PyTorch.

    The version's files are verified (sha256) first; the check's report goes beside the file as <name>.check.json.
    """
    directory = resolve_version_dir(version_dir, version, store)
    try:
        from fednested.interop.onnx import OnnxExportError, export_version_onnx, report_path
    except ModuleNotFoundError as error:
        fail(f"`fednested export onnx` needs {error.name}: pip install -r requirements/interop.txt")
    from fednested.checkpoints.errors import CheckpointError
    from fednested.deltas import DeltaError

    target = out if out is not None else Path(f"{version or directory.name}.onnx")
    try:
        report = export_version_onnx(directory, target, expected_version=version, update_dir=update)
    except (CheckpointError, DeltaError, OnnxExportError, OSError) as error:
        fail(str(error))
    for sample in report.samples:
        typer.echo(f"input [{sample.batch}, {sample.sequence}]: max abs error {sample.max_abs_error:.3g}")
    typer.echo(
        f"wrote {target} (version {report.version_id}, opset {report.opset}); max abs error "
        f"{report.max_abs_error:.3g} ≤ {report.tolerance:g}; report: {report_path(target)}"
    )
