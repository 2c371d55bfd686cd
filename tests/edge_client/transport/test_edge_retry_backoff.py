"""Backoff: exponential, capped, jittered within its bounds, bounded in attempts, and stopping at a deadline."""

import random
import time

import pytest

from edge_client.transport.retry import RetriesExhausted, RetryPolicy, backoff_delays, call_with_retries
from fednested import config
from fednested.config import SettingError


def test_delays_grow_exponentially_up_to_the_cap_with_equal_jitter() -> None:
    policy = RetryPolicy(initial_delay_s=1.0, multiplier=2.0, max_delay_s=5.0, jitter=0.5, max_attempts=6)
    delays = list(backoff_delays(policy, random.Random(7)))
    ceilings = [1.0, 2.0, 4.0, 5.0, 5.0]
    assert len(delays) == 5
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling * 0.5 <= delay <= ceiling
    no_jitter = RetryPolicy(initial_delay_s=1.0, multiplier=2.0, max_delay_s=5.0, jitter=0.0, max_attempts=6)
    assert list(backoff_delays(no_jitter, random.Random(7))) == ceilings


def test_jitter_spreads_devices_apart() -> None:
    policy = RetryPolicy(initial_delay_s=1.0, jitter=0.5, max_attempts=2)
    firsts = {round(next(backoff_delays(policy, random.Random(seed))), 6) for seed in range(20)}
    assert len(firsts) == 20


def test_retries_only_the_named_errors_and_gives_up_after_max_attempts() -> None:
    calls: list[int] = []
    slept: list[float] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("down")
        return "ok"

    policy = RetryPolicy(initial_delay_s=0.1, max_delay_s=1.0, jitter=0.0, max_attempts=5)
    assert call_with_retries("flaky", flaky, policy, retry_on=(ConnectionError,), sleep=slept.append) == "ok"
    assert slept == [0.1, 0.2]

    def always_down() -> None:
        raise ConnectionError("still down")

    with pytest.raises(RetriesExhausted, match="gave up after 5 attempt") as caught:
        call_with_retries("always", always_down, policy, retry_on=(ConnectionError,), sleep=lambda _: None)
    assert isinstance(caught.value.last, ConnectionError)

    def wrong() -> None:
        raise ValueError("permanent")

    with pytest.raises(ValueError, match="permanent"):
        call_with_retries("wrong", wrong, policy, retry_on=(ConnectionError,), sleep=lambda _: None)


def test_deadline_stops_before_sleeping_past_it() -> None:
    slept: list[float] = []

    def down() -> None:
        raise ConnectionError("down")

    policy = RetryPolicy(initial_delay_s=10.0, max_delay_s=10.0, jitter=0.0, max_attempts=50)
    with pytest.raises(RetriesExhausted, match="1 attempt"):
        call_with_retries(
            "x", down, policy, retry_on=(ConnectionError,), sleep=slept.append, deadline=time.monotonic() + 1
        )
    assert slept == []


@pytest.mark.parametrize(
    ("kwargs", "field", "problem"),
    [
        ({"initial_delay_s": -1.0}, "initial_delay_s", "must be at least 0, got -1.0"),
        (
            {"max_delay_s": 0.1, "initial_delay_s": 1.0},
            "max_delay_s",
            "must be at least initial_delay_s (1.0), got 0.1",
        ),
        ({"multiplier": 0.5}, "multiplier", "must be at least 1, got 0.5"),
        ({"jitter": 2.0}, "jitter", "must be at most 1, got 2.0"),
        ({"max_attempts": 0}, "max_attempts", "must be at least 1, got 0"),
    ],
)
def test_invalid_policies_are_refused_naming_the_field(kwargs: dict[str, float], field: str, problem: str) -> None:
    with pytest.raises(SettingError) as caught:
        RetryPolicy(**kwargs)  # type: ignore[arg-type]
    assert (caught.value.field, caught.value.problem) == (field, problem)
    assert str(caught.value) == f"RetryPolicy.{field} {problem}"


def test_the_client_uses_the_policy_declared_beside_the_tier2_config() -> None:
    assert RetryPolicy is config.RetryPolicy
    assert config.Tier2Config.model_fields["retry"].default_factory is RetryPolicy
