"""Bounded exponential backoff with jitter for everything the client sends or fetches over an unreliable link."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from edge_client.errors import EdgeClientError

# Declared beside the tier2 config (its YAML section `retry:` is this dataclass); re-exported for the client's callers.
from fednested.config.retry import RetryPolicy as RetryPolicy

T = TypeVar("T")


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
