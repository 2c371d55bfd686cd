"""Claim-check URIs stay inside the artifact store; staleness counts promotions behind the champion."""

from pathlib import Path

import pytest

from apps.federation.payloads import artifact_path, fetch_payload
from apps.federation.windows import champion_version, staleness_of
from apps.registry.services import move_alias
from fednested.aggregation import RejectionCode, UpdateRejected
from tests.federation_world import WorkerWorld


def test_uri_forms_resolve_inside_the_store(tmp_path: Path) -> None:
    root = tmp_path / "store"
    (root / "updates").mkdir(parents=True)
    assert artifact_path("artifacts://updates/u1.safetensors", root) == (root / "updates" / "u1.safetensors").resolve()
    assert artifact_path((root / "updates" / "u1").as_uri(), root) == (root / "updates" / "u1").resolve()
    assert artifact_path("updates/u1", root) == (root / "updates" / "u1").resolve()


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("artifacts://updates/../../secrets", "points outside the artifact store"),
        ("file:///etc/passwd", "points outside the artifact store"),
        ("s3://bucket/key", "only artifacts://, file:// and relative paths"),
        ("file://otherhost/x", "file URIs on other hosts"),
    ],
)
def test_uris_leaving_the_store_are_refused(tmp_path: Path, uri: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        artifact_path(uri, tmp_path)


def test_symlink_out_of_the_store_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    (tmp_path / "outside").write_bytes(b"x")
    (root / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(ValueError, match="points outside the artifact store"):
        artifact_path("artifacts://link", root)
    with pytest.raises(UpdateRejected) as caught:
        fetch_payload("artifacts://link", sha256="0" * 64, size_bytes=1, max_bytes=10, root=root, client_id="car-1")
    assert caught.value.code is RejectionCode.MALFORMED


def test_oversized_claim_is_refused_before_reading(tmp_path: Path) -> None:
    with pytest.raises(UpdateRejected) as caught:
        fetch_payload(
            "artifacts://nothing-here", sha256="0" * 64, size_bytes=11, max_bytes=10, root=tmp_path, client_id="c"
        )
    assert (caught.value.code, caught.value.message) == (
        RejectionCode.OVERSIZED,
        "payload is 11 bytes, the limit is 10",
    )


def test_staleness_counts_versions_behind_the_champion(world: WorkerWorld) -> None:
    v1 = world.base
    v2 = world.register_child(v1, "v2")
    v3 = world.register_child(v2, "v3")
    branch = world.register_child(v1, "v2-branch")
    assert champion_version() is None
    assert staleness_of(v1, None) == 0
    move_alias(name="champion", version=v3, actor=world.engineer)
    champion = champion_version()
    assert champion == v3
    assert [staleness_of(version, champion) for version in (v3, v2, v1)] == [0, 1, 2]
    assert staleness_of(branch, champion) is None
    # A candidate never promoted is not on the line of champions: devices never train it, so an update on it
    # cannot be placed.
    candidate = world.register_child(v3, "v4")
    assert staleness_of(candidate, champion) is None


def test_payload_uri_naming_a_directory_is_a_rejection_not_an_os_error(tmp_path: Path) -> None:
    root = tmp_path / "store"
    (root / "updates" / "u1").mkdir(parents=True)
    size = (root / "updates" / "u1").stat().st_size  # the size matches, so only the file check stands in the way
    with pytest.raises(UpdateRejected) as caught:
        fetch_payload(
            "artifacts://updates/u1", sha256="0" * 64, size_bytes=size, max_bytes=10**9, root=root, client_id="c"
        )
    assert (caught.value.code, "is not a regular file" in caught.value.message) == (RejectionCode.MALFORMED, True)
