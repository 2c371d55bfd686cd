"""Buffer policy: ready at K updates or at the deadline, on fixed timestamps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from fednested.aggregation.buffer import BufferPolicy, ReadyReason

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def test_empty_buffer_is_never_ready() -> None:
    policy = BufferPolicy(size=3, max_wait=timedelta(minutes=10))
    decision = policy.decide(buffered=0, oldest_received_at=None, now=T0 + timedelta(days=1))
    assert (decision.ready, decision.reason, decision.check_again_at) == (False, None, None)


def test_ready_when_full() -> None:
    policy = BufferPolicy(size=3, max_wait=timedelta(minutes=10))
    assert not policy.decide(buffered=2, oldest_received_at=T0, now=T0).ready
    decision = policy.decide(buffered=3, oldest_received_at=T0, now=T0)
    assert (decision.ready, decision.reason) == (True, ReadyReason.FULL)
    assert policy.decide(buffered=5, oldest_received_at=T0, now=T0).reason is ReadyReason.FULL


def test_not_full_waits_until_the_deadline_then_fires() -> None:
    policy = BufferPolicy(size=3, max_wait=timedelta(minutes=10))
    before = policy.decide(buffered=1, oldest_received_at=T0, now=T0 + timedelta(minutes=9, seconds=59))
    assert not before.ready
    assert before.check_again_at == T0 + timedelta(minutes=10)
    at = policy.decide(buffered=1, oldest_received_at=T0, now=T0 + timedelta(minutes=10))
    assert (at.ready, at.reason) == (True, ReadyReason.DEADLINE)


def test_deadline_needs_the_minimum_count() -> None:
    policy = BufferPolicy(size=4, max_wait=timedelta(minutes=10), min_size_at_deadline=2)
    late = T0 + timedelta(hours=1)
    lone = policy.decide(buffered=1, oldest_received_at=T0, now=late)
    assert (lone.ready, lone.check_again_at) == (False, None)
    assert policy.decide(buffered=2, oldest_received_at=T0, now=late).reason is ReadyReason.DEADLINE


def test_naive_timestamps_are_refused() -> None:
    policy = BufferPolicy(size=2, max_wait=timedelta(minutes=1))
    with pytest.raises(ValueError, match="timezone-aware"):
        policy.decide(buffered=1, oldest_received_at=datetime(2025, 1, 1), now=T0)


def test_count_without_arrival_time_is_refused() -> None:
    policy = BufferPolicy(size=2, max_wait=timedelta(minutes=1))
    with pytest.raises(ValueError, match="1 buffered updates need the oldest one's arrival time"):
        policy.decide(buffered=1, oldest_received_at=None, now=T0)


def test_fixed_deadline_fires_whatever_the_arrival_time() -> None:
    policy = BufferPolicy(size=5, deadline_at=T0 + timedelta(minutes=30))
    late_arrival = T0 + timedelta(minutes=29)
    waiting = policy.decide(buffered=1, oldest_received_at=late_arrival, now=late_arrival)
    assert waiting.check_again_at == T0 + timedelta(minutes=30)
    due = policy.decide(buffered=1, oldest_received_at=late_arrival, now=T0 + timedelta(minutes=30))
    assert due.reason is ReadyReason.DEADLINE


def test_the_earlier_of_both_deadlines_counts() -> None:
    policy = BufferPolicy(size=5, max_wait=timedelta(minutes=10), deadline_at=T0 + timedelta(minutes=30))
    assert policy.deadline(T0) == T0 + timedelta(minutes=10)
    assert policy.deadline(T0 + timedelta(minutes=25)) == T0 + timedelta(minutes=30)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 0, "max_wait": timedelta(minutes=1)}, "buffer size must be >= 1"),
        ({"size": 2, "max_wait": timedelta(0)}, "max_wait must be positive"),
        ({"size": 2}, "needs max_wait, deadline_at, or both"),
        ({"size": 2, "deadline_at": datetime(2025, 1, 1)}, "deadline_at must be timezone-aware"),
        (
            {"size": 2, "max_wait": timedelta(minutes=1), "min_size_at_deadline": 3},
            r"min_size_at_deadline must lie in \[1, size=2\]",
        ),
    ],
)
def test_policy_rejects_bad_settings(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BufferPolicy(**kwargs)  # type: ignore[arg-type]
