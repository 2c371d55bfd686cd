"""Registry REST API: families, versions (registration, lineage, filters), aliases, as the cast uses them."""

import hashlib
from collections.abc import Callable
from typing import Any

import pytest

from apps.governance.services import approve_version, request_approval
from apps.registry.models import ModelFamily, ModelVersion
from apps.registry.storage import artifact_root

pytestmark = pytest.mark.django_db

SHA = "0f" * 32
FILES = {"core.safetensors": b"core" * 512, "experts/l1e3.safetensors": b"expert" * 100}


def version_payload(version_id: str, **changes: Any) -> dict[str, Any]:
    """A registration of a version whose files the artifact store holds (written here)."""
    folder = artifact_root() / "versions" / version_id
    for name, content in FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    core, expert = (
        {"sha256": hashlib.sha256(content).hexdigest(), "size_bytes": len(content)} for content in FILES.values()
    )
    body: dict[str, Any] = {
        "family": "tiny-moe",
        "version_id": version_id,
        "manifest": {"version_id": version_id},
        "artifact_uri": f"artifacts://versions/{version_id}",
        "artifacts": [
            {"file_name": "core.safetensors", "partition": "core", **core},
            {
                "file_name": "experts/l1e3.safetensors",
                "partition": "expert",
                "layer": 1,
                "expert_index": 3,
                **expert,
            },
        ],
        "runs": ["mlflow-run-17"],
    }
    body.update(changes)
    return body


def test_engineer_registers_family_and_versions_and_reads_lineage(cast: dict[str, Any]) -> None:
    engineer = cast["engineer"].client
    family = engineer.post(
        "/api/v1/families/", {"name": "tiny-moe", "architecture": "MixtralForCausalLM"}, format="json"
    )
    assert family.status_code == 201
    assert family.json()["created_by"] == "eric-engineer"
    duplicate = engineer.post("/api/v1/families/", {"name": "tiny-moe", "architecture": "X"}, format="json")
    assert duplicate.status_code == 400
    assert "already exists" in duplicate.json()["name"][0]

    v1 = engineer.post("/api/v1/versions/", version_payload("tiny-moe-v1"), format="json")
    assert v1.status_code == 201, v1.content
    body = v1.json()
    assert (body["status"], body["family"], body["parent"]) == ("candidate", "tiny-moe", None)
    assert [a["file_name"] for a in body["artifacts"]] == ["core.safetensors", "experts/l1e3.safetensors"]
    assert body["created_by_label"] == "eric-engineer"
    assert len(body["manifest_sha256"]) == 64

    v2 = engineer.post("/api/v1/versions/", version_payload("tiny-moe.v2", parent="tiny-moe-v1"), format="json")
    assert v2.status_code == 201, v2.content
    lineage = engineer.get("/api/v1/versions/tiny-moe.v2/lineage/").json()
    assert lineage["ancestors"] == ["tiny-moe-v1"]
    assert {(e["kind"], e["source_ref"]) for e in lineage["edges"]} == {
        ("parent", "tiny-moe-v1"),
        ("run", "mlflow-run-17"),
    }
    assert engineer.get("/api/v1/versions/tiny-moe-v1/lineage/").json()["children"] == ["tiny-moe.v2"]

    listed = engineer.get("/api/v1/versions/", {"family": "tiny-moe", "parent": "tiny-moe-v1"}).json()
    assert listed["count"] == 1
    assert listed["results"][0]["version_id"] == "tiny-moe.v2"


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        (
            {"artifacts": [{"file_name": "a", "sha256": "nothex", "size_bytes": 1, "partition": "core"}]},
            "artifacts",
            "",
        ),
        ({"family": "no-such-family"}, "family", "does not exist"),
        ({"parent": "tiny-moe-v404"}, "parent", "does not exist"),
        (
            {"artifacts": [{"file_name": "e", "sha256": SHA, "size_bytes": 1, "partition": "expert", "layer": 0}]},
            "artifacts",
            "layer and expert_index go together",
        ),
    ],
)
def test_bad_version_registration_names_the_field_and_creates_nothing(
    cast: dict[str, Any], family_factory: Callable[..., ModelFamily], changes: dict[str, Any], field: str, message: str
) -> None:
    family_factory("tiny-moe")
    response = cast["engineer"].client.post(
        "/api/v1/versions/", version_payload("tiny-moe-v1", **changes), format="json"
    )
    assert response.status_code == 400
    assert field in response.json()
    assert message in str(response.json()[field])
    assert ModelVersion.objects.count() == 0


def test_devices_read_the_champion_with_its_files(
    cast: dict[str, Any], family_factory: Callable[..., ModelFamily], version_factory: Callable[..., ModelVersion]
) -> None:
    v1 = version_factory(family_factory(), "tiny-moe-v1")
    approve_version(request_approval(v1, actor=cast["engineer"].user), actor=cast["officer"].user)
    champion = cast["device"].client.get("/api/v1/aliases/champion/")
    assert champion.status_code == 200
    version = champion.json()["version"]
    assert (version["version_id"], version["status"], version["manifest_sha256"]) == (
        "tiny-moe-v1",
        "champion",
        v1.manifest_sha256,
    )
    assert {a["sha256"] for a in version["artifacts"]} == set(v1.artifacts.values_list("sha256", flat=True))
    assert [a["name"] for a in cast["device"].client.get("/api/v1/aliases/").json()["results"]] == ["champion"]
