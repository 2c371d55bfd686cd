"""Properties of the REST API over generated request bodies: whatever JSON an engineer sends to the write endpoints of
tokens, rounds, tasks, families and versions — huge numbers, NaN, deep nesting, wrong types, nulls, NUL characters,
unknown fields, on top of a valid body or on their own — the answer is 2xx or 4xx, every 4xx body is JSON with a
string `code`, and nothing is a 500."""

import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from apps.registry.models import ModelFamily, ModelVersion
from fednested.aggregation.settings import ROUND_SETTING_KEYS

pytestmark = pytest.mark.django_db

BOUNDED = settings(
    max_examples=60,
    deadline=None,
    # One database transaction holds every example's rows; the cast and v1 are set up once per test.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# Stands for a deeply nested array inside a generated body; replaced in the encoded text (json cannot build it).
DEEP = "\u2063deep\u2063"

edge_numbers = st.sampled_from(
    [
        0,
        -1,
        1,
        2**31 - 1,
        2**31,
        2**63 - 1,
        2**63,
        -(2**63) - 1,
        2**64,
        10**20,
        10**300,
        10**400,
        1e300,
        -1e300,
        1e-320,
        -0.0,
    ]
)
hostile_text = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "a\x00b",
        "\ud800",
        "x" * 5000,
        "../../etc/passwd",
        "tiny-moe-v1",
        "car-0001",
        "evaluation",
        "sync",
        "2026-01-01T00:00:00Z",
        "9999-12-31T23:59:59-23:59",
        "0001-01-01T00:00:00+23:59",
        DEEP,
    ]
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and ±Infinity included: json.dumps writes them as the bare words
    | edge_numbers
    | hostile_text
    | st.text(max_size=12)
)


def values(keys: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    return st.recursive(
        scalars,
        lambda children: (
            st.lists(children, max_size=3) | st.dictionaries(keys | st.text(max_size=8), children, max_size=3)
        ),
        max_leaves=12,
    )


def bodies(
    base: dict[str, Any], fields: list[str], nested: dict[str, st.SearchStrategy[Any]]
) -> st.SearchStrategy[Any]:
    """A valid `base` or nothing, with generated fields set over it; now and then not an object at all."""
    keys = st.sampled_from(fields)
    overrides = st.dictionaries(keys | st.text(max_size=10), values(keys), max_size=5)
    targeted = st.fixed_dictionaries({}, optional=nested)
    objects = st.builds(
        lambda start, generated, aimed: {**start, **generated, **aimed},
        st.sampled_from([base, {}]),
        overrides,
        targeted,
    )
    return objects | values(keys)


def encode(body: Any) -> bytes:
    raw = json.dumps(body, allow_nan=True).encode()
    return raw.replace(json.dumps(DEEP).encode(), b"[" * 3000 + b"]" * 3000)


def post(member: Any, url: str, body: Any) -> None:
    """The property, for one request."""
    response = member.client.post(url, data=encode(body), content_type="application/json")
    assert response.status_code < 500, (url, body, response.content[:500])
    event(f"HTTP {response.status_code}")  # --hypothesis-show-statistics: how many got through to a 2xx
    assert response["Content-Type"].startswith("application/json"), response.content[:300]
    answer = json.loads(response.content)
    assert isinstance(answer, dict)
    if response.status_code >= 400:
        assert isinstance(answer.get("code"), str), answer


@pytest.fixture
def v1(family_factory: Callable[..., ModelFamily], version_factory: Callable[..., ModelVersion]) -> ModelVersion:
    return version_factory(family_factory(), "tiny-moe-v1")


@BOUNDED
@given(
    bodies(
        {"note": "for car-9", "domain": "medical", "ttl_seconds": 3600},
        ["note", "domain", "ttl_seconds"],
        {"ttl_seconds": scalars},
    )
)
def test_enrollment_tokens(cast: dict[str, Any], body: Any) -> None:
    post(cast["engineer"], "/api/v1/enrollment-tokens/", body)


round_configs = st.dictionaries(st.sampled_from(sorted(ROUND_SETTING_KEYS)) | st.text(max_size=6), scalars, max_size=4)


@BOUNDED
@given(
    st.data(),
    st.sampled_from(["async", "sync"]),
)
def test_rounds(cast: dict[str, Any], v1: ModelVersion, data: st.DataObject, mode: str) -> None:
    base = {
        "base_version": "tiny-moe-v1",
        "buffer_size_k": 2,
        "deadline_at": (timezone.now() + timedelta(hours=1)).isoformat(),
        "mode": mode,
        "cohort": ["car-0001"] if mode == "sync" else [],
    }
    fields = ["round_id", "mode", "base_version", "cohort", "buffer_size_k", "deadline_at", "config"]
    body = data.draw(bodies(base, fields, {"config": round_configs, "round_id": st.text(max_size=70)}), label="body")
    post(cast["engineer"], "/api/v1/rounds/", body)


@BOUNDED
@given(st.uuids(), round_configs, st.sampled_from(["async", "sync"]))
def test_round_configs(cast: dict[str, Any], v1: ModelVersion, round_id: Any, config: Any, mode: str) -> None:
    """Only the config varies, so the round's aggregation settings are what is checked."""
    body = {
        "round_id": f"r-{round_id.hex[:20]}",
        "base_version": "tiny-moe-v1",
        "buffer_size_k": 2,
        "deadline_at": (timezone.now() + timedelta(hours=1)).isoformat(),
        "mode": mode,
        "cohort": ["car-0001"] if mode == "sync" else [],
        "config": config,
    }
    post(cast["engineer"], "/api/v1/rounds/", body)


@BOUNDED
@given(bodies({"kind": "evaluation", "params": {"version_id": "tiny-moe-v1"}}, ["kind", "params", "round"], {}))
def test_tasks(cast: dict[str, Any], v1: ModelVersion, body: Any) -> None:
    post(cast["engineer"], "/api/v1/tasks/", body)


@BOUNDED
@given(
    bodies(
        {"name": "tiny-moe-2", "architecture": "MixtralForCausalLM", "config": {"num_local_experts": 2}},
        ["name", "architecture", "config", "description"],
        {},
    )
)
def test_families(cast: dict[str, Any], body: Any) -> None:
    post(cast["engineer"], "/api/v1/families/", body)


artifact_fields = ["file_name", "sha256", "size_bytes", "partition", "layer", "expert_index"]
artifacts = st.lists(
    bodies(
        {"file_name": "core.safetensors", "sha256": "0f" * 32, "size_bytes": 10, "partition": "expert", "layer": 0},
        artifact_fields,
        {"size_bytes": scalars, "layer": scalars, "expert_index": scalars},
    ),
    max_size=3,
)


@BOUNDED
@given(st.data())
def test_versions(cast: dict[str, Any], v1: ModelVersion, data: st.DataObject) -> None:
    version_id = f"v-{data.draw(st.integers(0, 10**9), label='id')}"
    core = v1.artifacts.get(file_name="core.safetensors")
    base = {
        "family": "tiny-moe",
        "version_id": version_id,
        "parent": "tiny-moe-v1",
        "manifest": {"version_id": version_id, "architecture": "MixtralForCausalLM"},
        # v1's folder and its core file, as the store holds them: a body the generator leaves alone registers.
        "artifact_uri": v1.artifact_uri,
        "artifacts": [
            {"file_name": "core.safetensors", "sha256": core.sha256, "size_bytes": core.size_bytes, "partition": "core"}
        ],
    }
    fields = ["family", "version_id", "parent", "manifest", "artifact_uri", "artifacts", "datasets", "runs"]
    body = data.draw(bodies(base, fields, {"artifacts": artifacts}), label="body")
    post(cast["engineer"], "/api/v1/versions/", body)
