"""What the contract tests share: how Schemathesis is configured and what it checks in every answer, and versions
whose files really lie in the artifact store, so the file routes answer 200 with the registered bytes."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from apps.governance.actors import Actor
from apps.registry.models import ModelFamily, ModelVersion
from apps.registry.services import register_version
from tests.conftest import artifact_bytes, make_artifacts, make_manifest

# The credentials are the role's token; no generated values for the other security schemes (a session cookie, the
# proxy's client certificate header, which the server ignores without the proxy's secret). Explicit, so no
# schemathesis.toml lying around changes the run.
CONFIG = schemathesis.Config.from_dict({"generation": {"with-security-parameters": False}})
# Every answer: no 5xx, a documented status code, a documented content type, a body that matches its schema.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture
def artifact_store(tmp_path: Path, settings: Any) -> Path:
    """An empty artifact store, configured as the control plane's (FEDNESTED_ARTIFACT_ROOT)."""
    root = tmp_path / "artifacts"
    root.mkdir()
    settings.FEDNESTED_ARTIFACT_ROOT = root
    return root


@pytest.fixture
def stored_version_factory(artifact_store: Path) -> Callable[..., ModelVersion]:
    """Registers a version whose files lie in the store under versions/<id>/, with a store-relative URI."""

    def build(family: ModelFamily, version_id: str, *, parent: ModelVersion | None = None) -> ModelVersion:
        artifacts = make_artifacts(version_id)
        for spec in artifacts:
            path = artifact_store / "versions" / version_id / spec.file_name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(artifact_bytes(version_id, spec.file_name))
        return register_version(
            family=family,
            version_id=version_id,
            manifest=make_manifest(version_id, parent.version_id if parent else None, artifacts),
            artifacts=artifacts,
            artifact_uri=f"artifacts://versions/{version_id}",
            parent=parent,
            datasets=["synthetic-automotive-v1"],
            runs=[f"run-{version_id}"],
            actor=Actor.automation("tests"),
        )

    return build
