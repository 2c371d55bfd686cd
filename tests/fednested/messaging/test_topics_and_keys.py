"""Topic rules: which schemas each topic carries, which keys are allowed, and physical names under a prefix."""

import re
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from fednested.messaging import (
    TOPIC_SPECS,
    AdapterSummary,
    ConfigChange,
    ModelAvailable,
    PayloadRef,
    RoundStart,
    Telemetry,
    Topic,
    TopicError,
    TopicsConfig,
    TrainingTask,
    UpdateEnvelope,
)
from fednested.messaging.topics import resolve_key

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
ENVELOPE = UpdateEnvelope(
    update_id=uuid.uuid4(),
    client_id="edge-7",
    base_version="v1",
    examples=1,
    routed_tokens={"0.0": 1},
    payload=PayloadRef(uri="s3://d/x", sha256="00" * 32, size_bytes=1),
    adapter=AdapterSummary(rank=2, alpha=4.0, target_modules=["w1"]),
    created_at=NOW,
)
ROUND = RoundStart(round_id="r-3", base_version="v1", deadline=NOW + timedelta(hours=1), started_at=NOW)


def test_each_topic_carries_the_schemas_of_the_architecture() -> None:
    assert {topic.value: sorted(spec.schemas) for topic, spec in TOPIC_SPECS.items()} == {
        "control.federation_rounds": ["ConfigChange", "ModelAvailable", "RoundStart"],
        "updates.experts.local": ["UpdateEnvelope"],
        "telemetry.edge": ["Telemetry"],
        "tasks.training": ["TrainingTask"],
    }


def test_default_keys_follow_the_key_semantics() -> None:
    telemetry = Telemetry(
        client_id="edge-7", loss=1.0, steps=1, duration_s=1.0, outcome="succeeded", started_at=NOW, finished_at=NOW
    )
    task = TrainingTask(task_id="t-1", kind="core_update", created_at=NOW)
    promoted = ModelAvailable(
        version_id="v2", alias="champion", manifest_sha256="11" * 32, artifact_uri="s3://m/v2", published_at=NOW
    )
    change = ConfigChange(change_id="c-4", settings={"k": 8}, effective_at=NOW)
    assert resolve_key(Topic.UPDATES, ENVELOPE, None) == "edge-7"
    assert resolve_key(Topic.TELEMETRY, telemetry, None) == "edge-7"
    assert resolve_key(Topic.TASKS, task, None) == "t-1"
    assert resolve_key(Topic.CONTROL_ROUNDS, promoted, None) == "v2"
    assert resolve_key(Topic.CONTROL_ROUNDS, change, None) == "c-4"
    assert resolve_key(Topic.CONTROL_ROUNDS, ROUND, None) == "r-3"
    assert resolve_key(Topic.CONTROL_ROUNDS, ROUND, "v1") == "v1"  # a round may be keyed by its base version


def test_keys_and_topics_that_break_the_rules_are_refused() -> None:
    with pytest.raises(
        TopicError, match=re.escape("key 'r-3' for RoundStart on control.federation_rounds must be the round id")
    ):
        resolve_key(Topic.CONTROL_ROUNDS, ROUND.model_copy(update={"round_id": "r-4"}), "r-3")
    with pytest.raises(TopicError, match=r"topic tasks.training does not carry UpdateEnvelope events \(it carries: "):
        resolve_key(Topic.TASKS, ENVELOPE, None)


def test_prefix_maps_logical_names_to_physical_ones_and_back() -> None:
    topics = TopicsConfig(prefix="staging.")
    assert topics.physical_name(Topic.UPDATES) == "staging.updates.experts.local"
    assert topics.logical_topic("staging.telemetry.edge") is Topic.TELEMETRY
    with pytest.raises(ValueError, match=re.escape("'telemetry.edge' is not one of this bus's topics")):
        topics.logical_topic("telemetry.edge")
    with pytest.raises(ValidationError, match="String should match pattern"):
        TopicsConfig(prefix="bad prefix/")
