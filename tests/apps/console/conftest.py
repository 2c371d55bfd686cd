"""Console fixtures: a registry scene with a champion, a candidate awaiting approval and a rejected update."""

from collections.abc import Callable
from typing import Any

import pytest

from apps.federation.services import reject_update
from apps.governance.actors import Actor
from apps.governance.services import request_approval
from apps.registry.choices import CHAMPION_ALIAS, VersionStatus
from apps.registry.models import ModelFamily, ModelVersion
from apps.registry.services import (
    DomainEvaluation,
    move_alias,
    record_version_evaluation,
    register_version,
    set_version_status,
)
from tests.conftest import Member, make_artifacts, make_manifest, make_update_row, write_artifacts

PASSWORD = "console-test-password-1"

PARENT_SCORES = {
    "cooking": {"loss": 3.0, "perplexity": 20.09},
    "legal": {"loss": 2.5, "perplexity": 12.18},
    "medical": {"loss": 2.0, "perplexity": 7.39},
}
CANDIDATE_SCORES = {
    "cooking": {"loss": 2.4, "perplexity": 11.02},
    "legal": {"loss": 2.75, "perplexity": 15.64},
    "medical": {"loss": 2.001, "perplexity": 7.40},
}


def _register(
    family: ModelFamily, version_id: str, *, parent: ModelVersion | None, scores: dict[str, Any], updates: list[str]
) -> ModelVersion:
    artifacts = make_artifacts(version_id)
    manifest = make_manifest(version_id, parent.version_id if parent else None, artifacts)
    version = register_version(
        family=family,
        version_id=version_id,
        manifest=manifest,
        artifacts=artifacts,
        artifact_uri=write_artifacts(version_id, artifacts),
        parent=parent,
        contributing_updates=updates,
        actor=Actor.automation("tests"),
    )
    record_version_evaluation(
        version,
        [
            DomainEvaluation(
                domain=domain,
                loss=score["loss"],
                perplexity=score["perplexity"],
                tokens=400,
                records=20,
                parent_loss=PARENT_SCORES[domain]["loss"] if parent is not None else None,
                parent_perplexity=PARENT_SCORES[domain]["perplexity"] if parent is not None else None,
            )
            for domain, score in scores.items()
        ],
        actor=Actor.automation("worker:evaluation"),
        heldout="artifacts://heldout",
    )
    return version


@pytest.fixture
def scene(
    cast: dict[str, Member], family_factory: Callable[..., ModelFamily], envelope_factory: Callable[..., Any]
) -> dict[str, Any]:
    """v1 champion; v2 a candidate built from one applied-looking update, awaiting approval the engineer requested;
    one update rejected with a reason."""
    for member in ("officer", "engineer"):
        user = cast[member].user
        assert user is not None
        user.set_password(PASSWORD)
        user.save()
    family = family_factory()
    v1 = _register(family, "v1", parent=None, scores=PARENT_SCORES, updates=[])
    set_version_status(v1, VersionStatus.CHAMPION, actor=Actor.automation("tests"))
    move_alias(name=CHAMPION_ALIAS, version=v1, actor=Actor.automation("tests"))
    device = cast["device"].device
    assert device is not None
    good, bad = make_update_row(device, "v1"), make_update_row(device, "v1")
    reject_update(bad, "non_finite", "tensor 'lora_A.expert3' has 12 NaN values", actor=Actor.automation("tests"))
    v2 = _register(family, "v2", parent=v1, scores=CANDIDATE_SCORES, updates=[good.update_id])
    approval = request_approval(v2, actor=cast["engineer"].user, note="round 1 of the demo")
    return {"v1": v1, "v2": v2, "approval": approval, "good": good, "bad": bad, "device": device, "password": PASSWORD}
