"""A round's config object → aggregation settings; bad values are named with what is expected."""

from datetime import timedelta
from typing import Any

import pytest

from fednested.aggregation.settings import RoundAggregationSettings, RoundSettingsError


def test_empty_config_gives_the_defaults() -> None:
    settings = RoundAggregationSettings.from_mapping({})
    assert settings == RoundAggregationSettings()
    assert settings.aggregation.method == "weighted_mean"
    assert settings.max_wait is None


def test_every_known_key_is_read_and_unknown_keys_are_left_alone() -> None:
    settings = RoundAggregationSettings.from_mapping(
        {
            "aggregation_method": "trimmed_mean",
            "clip_norm": 2,
            "trim_fraction": 0.2,
            "server_learning_rate": 0.5,
            "staleness_exponent": 1.0,
            "weight_by_routed_tokens": False,
            "weight_by_examples": True,
            "weight_by_reliability": False,
            "max_staleness": 2,
            "max_payload_bytes": 4096,
            "max_delta_norm": 10,
            "max_total_norm": None,
            "max_wait_s": 90,
            "min_updates_at_deadline": 2,
            "local_steps": 50,
        }
    )
    aggregation = settings.aggregation
    assert (aggregation.method, aggregation.clip_norm, aggregation.trim_fraction) == ("trimmed_mean", 2.0, 0.2)
    assert aggregation.server_learning_rate == 0.5
    weighting = aggregation.weighting
    assert (weighting.staleness_exponent, weighting.by_routed_tokens, weighting.by_examples) == (1.0, False, True)
    assert weighting.by_reliability is False
    assert (settings.limits.max_bytes, settings.limits.max_delta_norm, settings.limits.max_total_norm) == (
        4096,
        10.0,
        None,
    )
    assert (settings.max_staleness, settings.max_wait, settings.min_updates_at_deadline) == (
        2,
        timedelta(seconds=90),
        2,
    )


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"aggregation_method": "krum"}, "unknown aggregation method 'krum'"),
        ({"clip_norm": "big"}, r"'clip_norm' must be a number > 0, or null for no clipping, got 'big'"),
        ({"clip_norm": -1}, "clip_norm must be None or a finite number > 0"),
        (
            {"max_staleness": True},
            r"'max_staleness' must be an integer >= 0 \(versions behind the champion\), got True",
        ),
        ({"max_staleness": -1}, "'max_staleness' must be an integer >= 0"),
        ({"max_payload_bytes": 1.5}, "'max_payload_bytes' must be an integer > 0, got 1.5"),
        ({"max_payload_bytes": 0}, "max_bytes must be > 0"),
        ({"server_learning_rate": float("inf")}, "'server_learning_rate' must be a finite number"),
        ({"max_wait_s": 0}, "'max_wait_s' must be a number of seconds > 0"),
        ({"min_updates_at_deadline": 0}, "'min_updates_at_deadline' must be an integer >= 1"),
        ({"weight_by_examples": "yes"}, "'weight_by_examples' must be true or false, got 'yes'"),
    ],
)
def test_bad_values_are_named(config: dict[str, Any], message: str) -> None:
    with pytest.raises(RoundSettingsError, match=message) as caught:
        RoundAggregationSettings.from_mapping(config, where="round 'r1' config")
    assert str(caught.value).startswith("round 'r1' config: ")
