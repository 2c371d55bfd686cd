"""`manage.py check_store`: does the artifact store hold what the registry says? Exit status 1 when it does not.

Every file of every version, the server optimiser state its lineage names, and every stored update payload must lie
inside the store with its registered size and sha256. Files of the store that no row names are warnings (orphans:
what an aggregation that died before registering left behind, a file copied in by hand); `heldout/` holds
evaluation sets, which task parameters name, and is skipped.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from apps.federation.choices import UpdateStatus
from apps.federation.models import StagedPayload, Update
from apps.federation.server_state import state_reference
from apps.registry.models import ModelVersion
from apps.registry.services import MANIFEST_FILE_NAME
from apps.registry.storage import (
    ARTIFACTS_PREFIX,
    StoreProblem,
    artifact_path,
    artifact_root,
    file_inside,
    store_relative,
)
from fednested.aggregation.server_optimizers import ServerOptimizerStateError
from fednested.checkpoints import file_sha256

WARNINGS = frozenset({StoreProblem.ORPHAN, StoreProblem.NOT_STORE_RELATIVE})
# Top-level folders of the store that rows do not name, so their files are never orphans.
UNREFERENCED_FOLDERS = frozenset({"heldout"})


@dataclass(frozen=True)
class Finding:
    """One thing wrong between a row and the store; `location` is relative to the store, or the URI as recorded
    when that leaves the store."""

    problem: StoreProblem
    owner: str
    location: str
    detail: str = ""

    @property
    def is_error(self) -> bool:
        return self.problem not in WARNINGS

    def line(self) -> str:
        severity = "error" if self.is_error else "warning"
        subject = f"{self.owner}: {self.location}" if self.owner else self.location
        return f"{severity:<7} {self.problem.value:<18} {subject}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class StoreReport:
    """What `check_store` looked at and found."""

    versions: int = 0
    files: int = 0
    payloads: int = 0
    findings: list[Finding] = field(default_factory=list)
    # Store-relative paths some row names: everything else in the store is an orphan.
    referenced: set[str] = field(default_factory=set)

    @property
    def errors(self) -> list[Finding]:
        return [finding for finding in self.findings if finding.is_error]


def _check_file(report: StoreReport, path: Path, root: Path, *, owner: str, sha256: str, size_bytes: int) -> None:
    """`path` (resolved, inside the store) must be a regular file of `size_bytes` bytes with that sha256."""
    relative = store_relative(path, root)
    report.referenced.add(relative)
    if not path.is_file():
        report.findings.append(Finding(StoreProblem.NOT_IN_STORE, owner, relative))
        return
    size = path.stat().st_size
    if size != size_bytes:
        detail = f"{size} bytes, the registry says {size_bytes}"
        report.findings.append(Finding(StoreProblem.SIZE_MISMATCH, owner, relative, detail))
        return
    actual = file_sha256(path)
    if actual != sha256:
        detail = f"sha256 {actual}, the registry says {sha256}"
        report.findings.append(Finding(StoreProblem.SHA256_MISMATCH, owner, relative, detail))


def _located(report: StoreReport, uri: str, root: Path, *, owner: str) -> Path | None:
    """Where `uri` points in the store; None (and a finding) when it leaves it."""
    try:
        path = artifact_path(uri, root)
    except ValueError as error:
        report.findings.append(Finding(StoreProblem.OUTSIDE_STORE, owner, uri, str(error)))
        return None
    if not uri.startswith(ARTIFACTS_PREFIX):
        detail = "recorded by absolute or relative path: `manage.py migrate` rewrites it as artifacts://"
        report.findings.append(Finding(StoreProblem.NOT_STORE_RELATIVE, owner, uri, detail))
    return path


def _check_versions(report: StoreReport, root: Path) -> None:
    for version in ModelVersion.objects.prefetch_related("artifacts").order_by("version_id").iterator(chunk_size=200):
        report.versions += 1
        owner = f"version {version.version_id}"
        folder = _located(report, version.artifact_uri, root, owner=owner)
        artifacts = list(version.artifacts.all())
        report.files += len(artifacts)
        if folder is None:
            continue
        folder_relative = store_relative(folder, root)
        # A manifest.json the version does not list is its own still (the registry serves the canonical JSON).
        report.referenced.add(f"{folder_relative}/{MANIFEST_FILE_NAME}")
        for artifact in artifacts:
            # The name as it lies in the folder, besides where a symlink leads: neither is an orphan.
            report.referenced.add(f"{folder_relative}/{artifact.file_name}")
            try:
                path = file_inside(folder, artifact.file_name)
            except ValueError as error:
                location = f"{folder_relative}/{artifact.file_name}"
                report.findings.append(Finding(StoreProblem.OUTSIDE_STORE, owner, location, str(error)))
                continue
            _check_file(report, path, root, owner=owner, sha256=artifact.sha256, size_bytes=artifact.size_bytes)
        _check_server_state(report, version, root, owner=owner)


def _check_server_state(report: StoreReport, version: ModelVersion, root: Path, *, owner: str) -> None:
    """The server optimiser's state file the version's lineage names (aggregated candidates only)."""
    try:
        reference = state_reference(version.manifest)
    except ServerOptimizerStateError as error:
        report.findings.append(Finding(StoreProblem.NOT_IN_STORE, owner, "lineage.aggregation", str(error)))
        return
    if reference is None:
        return
    path = _located(report, reference.uri, root, owner=f"{owner} server optimiser state")
    if path is not None:
        _check_file(
            report,
            path,
            root,
            owner=f"{owner} server optimiser state",
            sha256=reference.sha256,
            size_bytes=reference.bytes,
        )


def _check_payloads(report: StoreReport, root: Path) -> None:
    staged = StagedPayload.objects.order_by("stored_at", "id")
    payloads = [(f"payload of update {row.update_id}", row.uri, row.sha256, row.size_bytes) for row in staged]
    # Updates always point at their staged upload; older ones without one name their payload themselves. A rejected
    # one may name a payload that never was stored (that is why it was rejected).
    legacy = (
        Update.objects.exclude(update_id__in=staged.values("update_id"))
        .exclude(status=UpdateStatus.REJECTED)
        .order_by("received_at", "id")
    )
    payloads += [
        (f"payload of update {row.update_id}", row.payload_uri, row.payload_sha256, row.payload_bytes) for row in legacy
    ]
    for owner, uri, sha256, size_bytes in payloads:
        report.payloads += 1
        path = _located(report, uri, root, owner=owner)
        if path is not None:
            _check_file(report, path, root, owner=owner, sha256=sha256, size_bytes=size_bytes)


def _find_orphans(report: StoreReport, root: Path) -> None:
    base = root.resolve()
    for directory, folders, files in os.walk(base):
        here = Path(directory)
        if here == base:
            folders[:] = [name for name in folders if name not in UNREFERENCED_FOLDERS]
        folders.sort()
        for name in sorted(files):
            relative = (here / name).relative_to(base).as_posix()
            if relative not in report.referenced:
                report.findings.append(Finding(StoreProblem.ORPHAN, "", relative, "no row names this file"))


def check_store(root: Path) -> StoreReport:
    """Every version file and stored payload checked against the store at `root`, then the store's orphans."""
    report = StoreReport()
    _check_versions(report, root)
    _check_payloads(report, root)
    _find_orphans(report, root)
    return report


class Command(BaseCommand):
    help = (
        "Check the artifact store (FEDNESTED_ARTIFACT_ROOT) against the registry: every version file and update "
        "payload present, inside the store, with its size and sha256; lists files no row names. Exit status 1 on "
        "any error."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--root", type=Path, help="check this store instead of FEDNESTED_ARTIFACT_ROOT (e.g. a copy, before a move)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        root: Path = options["root"] or artifact_root()
        report = check_store(root)
        for finding in report.findings:
            self.stdout.write(finding.line())
        errors, warnings = len(report.errors), len(report.findings) - len(report.errors)
        self.stdout.write(
            f"checked {report.versions} versions ({report.files} files) and {report.payloads} payloads in {root}: "
            f"{errors} errors, {warnings} warnings"
        )
        if errors:
            raise CommandError(
                f"the artifact store {root} does not hold what the registry says ({errors} errors, listed above)",
                returncode=1,
            )
