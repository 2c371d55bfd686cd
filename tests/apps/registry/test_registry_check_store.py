"""`manage.py check_store`: each kind of finding between the registry and the artifact store, and its exit status."""

import hashlib
import io
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from apps.federation.models import EdgeDevice
from apps.federation.services import store_update_payload
from apps.registry.models import ModelFamily, ModelVersion
from tests.conftest import artifact_bytes

pytestmark = pytest.mark.django_db

PAYLOAD = b"adapter factors " * 64


def run_check(root: Path | None = None) -> tuple[int, list[str]]:
    """(exit status, output lines) of `manage.py check_store`."""
    out = io.StringIO()
    arguments = ["--root", str(root)] if root is not None else []
    try:
        call_command("check_store", *arguments, stdout=out)
    except CommandError as error:
        return error.returncode, out.getvalue().splitlines()
    return 0, out.getvalue().splitlines()


def upload(device: EdgeDevice, root: Path) -> str:
    """A payload stored as a device uploads it; returns its update id."""
    update_id = str(uuid.uuid4())
    store_update_payload(
        device,
        update_id,
        io.BytesIO(PAYLOAD),
        declared_sha256=hashlib.sha256(PAYLOAD).hexdigest(),
        content_length=len(PAYLOAD),
        max_bytes=len(PAYLOAD),
        root=root,
    )
    return update_id


@pytest.fixture
def registry(
    artifact_store: Path,
    cast: dict[str, Any],
    family_factory: Callable[..., ModelFamily],
    version_factory: Callable[..., ModelVersion],
) -> str:
    """Two versions and one stored payload, all as registered; evaluation sets in heldout/. Returns the update id."""
    family = family_factory()
    version_factory(family, "v2", parent=version_factory(family, "v1"))
    (artifact_store / "heldout").mkdir()
    (artifact_store / "heldout" / "medical.jsonl").write_text('{"text": "x"}\n')
    device = cast["device"].device
    assert device is not None
    return upload(device, artifact_store)


def test_a_store_that_holds_what_the_registry_says_passes(registry: str, artifact_store: Path) -> None:
    status, lines = run_check()
    assert status == 0
    assert lines == [f"checked 2 versions (10 files) and 1 payloads in {artifact_store}: 0 errors, 0 warnings"]


def test_a_missing_file_is_an_error(registry: str, artifact_store: Path) -> None:
    (artifact_store / "versions" / "v2" / "gate.safetensors").unlink()
    status, lines = run_check()
    assert status == 1
    assert lines[0] == "error   not_in_store       version v2: versions/v2/gate.safetensors"
    assert lines[-1].endswith(": 1 errors, 0 warnings")


def test_size_and_sha256_mismatches_are_errors(registry: str, artifact_store: Path) -> None:
    core = artifact_store / "versions" / "v1" / "core.safetensors"
    core.write_bytes(core.read_bytes() + b"!")
    config = artifact_store / "versions" / "v1" / "config.json"
    config.write_bytes(b"X" * config.stat().st_size)
    expected = hashlib.sha256(artifact_bytes("v1", "config.json")).hexdigest()
    status, lines = run_check()
    assert status == 1
    assert lines[:2] == [
        f"error   sha256_mismatch    version v1: versions/v1/config.json (sha256 "
        f"{hashlib.sha256(config.read_bytes()).hexdigest()}, the registry says {expected})",
        f"error   size_mismatch      version v1: versions/v1/core.safetensors ({core.stat().st_size} bytes, the "
        f"registry says {core.stat().st_size - 1})",
    ]


def test_a_payload_missing_or_changed_is_an_error(registry: str, artifact_store: Path) -> None:
    [payload] = (artifact_store / "updates").rglob("*.safetensors")
    relative = payload.relative_to(artifact_store).as_posix()
    payload.write_bytes(PAYLOAD[::-1])
    status, lines = run_check()
    assert status == 1
    assert lines[0].startswith(f"error   sha256_mismatch    payload of update {registry}: {relative} (sha256 ")
    payload.unlink()
    status, lines = run_check()
    assert (status, lines[0]) == (1, f"error   not_in_store       payload of update {registry}: {relative}")


def test_a_uri_outside_the_store_is_an_error_and_an_absolute_one_inside_a_warning(
    registry: str, artifact_store: Path
) -> None:
    ModelVersion.objects.filter(version_id="v1").update(artifact_uri="file:///srv/old-store/versions/v1")
    inside = (artifact_store / "versions" / "v2").as_uri()
    ModelVersion.objects.filter(version_id="v2").update(artifact_uri=inside)
    status, lines = run_check()
    assert status == 1
    assert lines[:2] == [
        "error   outside_store      version v1: file:///srv/old-store/versions/v1 ('file:///srv/old-store/versions/v1' "
        "points outside the artifact store)",
        f"warning not_store_relative version v2: {inside} (recorded by absolute or relative path: `manage.py migrate` "
        "rewrites it as artifacts://)",
    ]
    # v1's files are no row's now: orphans.
    assert sum(line.startswith("warning orphan             versions/v1/") for line in lines) == 5


def test_files_no_row_names_are_orphan_warnings_and_evaluation_sets_are_not(
    registry: str, artifact_store: Path
) -> None:
    (artifact_store / "versions" / "v1" / "notes.txt").write_text("copied in by hand")
    leftover = artifact_store / "versions" / ".v3.task-7"
    leftover.mkdir()
    (leftover / "core.safetensors").write_bytes(b"half-written")
    status, lines = run_check()
    assert status == 0
    assert lines == [
        "warning orphan             versions/.v3.task-7/core.safetensors (no row names this file)",
        "warning orphan             versions/v1/notes.txt (no row names this file)",
        f"checked 2 versions (10 files) and 1 payloads in {artifact_store}: 0 errors, 2 warnings",
    ]


def test_a_store_moved_without_the_database_reports_every_file_missing(
    registry: str, artifact_store: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "mounted-elsewhere"
    empty.mkdir()
    status, lines = run_check(empty)
    assert status == 1
    missing = [line for line in lines if line.startswith("error   not_in_store ")]
    assert len(missing) == len(lines) - 1 == 11  # ten version files and the payload
    assert lines[-1] == f"checked 2 versions (10 files) and 1 payloads in {empty}: 11 errors, 0 warnings"


def test_a_copy_of_the_store_is_checked_before_it_replaces_the_original(
    registry: str, artifact_store: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(artifact_store, copy)
    assert run_check(copy)[0] == 0
    (copy / "versions" / "v1" / "gate.safetensors").unlink()
    status, lines = run_check(copy)
    assert (status, lines[0]) == (1, "error   not_in_store       version v1: versions/v1/gate.safetensors")
    assert run_check()[0] == 0  # the original is untouched


def test_fednested_registry_check_store_runs_the_same_check(
    registry: str, artifact_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from typer.testing import CliRunner

    from fednested.cli.app import build_app

    runner = CliRunner()
    healthy = runner.invoke(build_app(), ["registry", "check-store"])
    assert healthy.exit_code == 0, healthy.output
    assert "checked 2 versions (10 files) and 1 payloads" in capsys.readouterr().out + healthy.output
    (artifact_store / "versions" / "v2" / "gate.safetensors").unlink()
    broken = runner.invoke(build_app(), ["registry", "check-store", "--root", str(artifact_store)])
    assert broken.exit_code == 1
    assert "does not hold what the registry says (1 errors" in broken.output
