"""Bounded exponential backoff with jitter for everything the client sends or fetches over an unreliable link."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from edge_client.errors import EdgeClientError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Delay n (0-based) is min(max_delay_s, initial_delay_s · multiplier^n), then scaled by a uniform factor in
    [1 - jitter, 1], so devices that lost the link together do not come back in lockstep ("equal jitter")."""

    initial_delay_s: float = 0.5
    multiplier: float = 2.0
    max_delay_s: float = 30.0
    jitter: float = 0.5
    max_attempts: int = 8

    def __post_init__(self) -> None:
        if self.initial_delay_s < 0 or self.max_delay_s < self.initial_delay_s:
            raise ValueError("retry: need 0 <= initial_delay_s <= max_delay_s")
        if self.multiplier < 1.0 or not 0.0 <= self.jitter <= 1.0 or self.max_attempts < 1:
            raise ValueError("retry: need multiplier >= 1, 0 <= jitter <= 1 and max_attempts >= 1")


def backoff_delays(policy: RetryPolicy, rng: random.Random) -> Iterator[float]:
    """The waits between attempts: max_attempts - 1 of them."""
    for attempt in range(policy.max_attempts - 1):
        ceiling = min(policy.max_delay_s, policy.initial_delay_s * policy.multiplier**attempt)
        yield ceiling * (1.0 - policy.jitter * rng.random())


class RetriesExhausted(EdgeClientError):
    """Every attempt failed; `last` is the final error, `attempts` how many were made."""

    def __init__(self, what: str, attempts: int, last: BaseException) -> None:
        self.what = what
        self.attempts = attempts
        self.last = last
        super().__init__(f"{what}: gave up after {attempts} attempt(s); last error: {last}")


def call_with_retries(
    what: str,
    action: Callable[[], T],
    policy: RetryPolicy,
    *,
    retry_on: tuple[type[BaseException], ...],
    rng: random.Random | None = None,
    sleep: Callable[[float], None] = time.sleep,
    deadline: float | None = None,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
) -> T:
    """Run `action` until it succeeds, retrying only the errors in `retry_on`; anything else propagates at once.
    `deadline` (a time.monotonic() value) stops early rather than sleeping past it."""
    delays = backoff_delays(policy, rng or random.Random())
    attempt = 0
    while True:
        attempt += 1
        try:
            return action()
        except retry_on as exc:
            delay = next(delays, None)
            if delay is None or (deadline is not None and time.monotonic() + delay > deadline):
                raise RetriesExhausted(what, attempt, exc) from exc
            if on_retry is not None:
                on_retry(attempt, exc, delay)
            sleep(delay)
