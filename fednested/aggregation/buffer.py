"""When a buffer of edge updates is ready to aggregate: K updates, or a deadline (a fixed time, or a wait after the
first arrival), whichever comes first.

Pure logic on counts and timestamps (FedBuff-style buffering); the caller owns the clock and the storage, so the
same policy serves the ingest worker (reading the database) and tests (passing fixed times).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum


class ReadyReason(StrEnum):
    """Why a buffer was declared ready (recorded with the aggregation so operators see what triggered it)."""

    FULL = "full"
    DEADLINE = "deadline"


@dataclass(frozen=True)
class BufferDecision:
    """Outcome of one check: `ready` with its reason, or when to check again (`check_again_at`, None = on arrival)."""

    ready: bool
    reason: ReadyReason | None
    check_again_at: datetime | None


@dataclass(frozen=True)
class BufferPolicy:
    """Ready once `size` updates are buffered, or at the deadline with at least `min_size_at_deadline` buffered.

    The deadline is the earlier of `deadline_at` (e.g. a round's closing time) and the oldest buffered update's
    arrival plus `max_wait`; either may be None, not both. A lone straggler thus never waits forever, and with
    `min_size_at_deadline` above 1 never triggers an aggregation by itself either.
    """

    size: int
    max_wait: timedelta | None = None
    deadline_at: datetime | None = None
    min_size_at_deadline: int = 1

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"buffer size must be >= 1, got {self.size}")
        if self.max_wait is None and self.deadline_at is None:
            raise ValueError("a buffer policy needs max_wait, deadline_at, or both")
        if self.max_wait is not None and self.max_wait <= timedelta(0):
            raise ValueError(f"max_wait must be positive, got {self.max_wait}")
        if self.deadline_at is not None and self.deadline_at.tzinfo is None:
            raise ValueError("deadline_at must be timezone-aware")
        if not (1 <= self.min_size_at_deadline <= self.size):
            raise ValueError(f"min_size_at_deadline must lie in [1, size={self.size}], got {self.min_size_at_deadline}")

    def deadline(self, oldest_received_at: datetime) -> datetime:
        """When a buffer whose oldest update arrived at `oldest_received_at` is due at the latest."""
        candidates = [self.deadline_at] if self.deadline_at is not None else []
        if self.max_wait is not None:
            candidates.append(oldest_received_at + self.max_wait)
        return min(candidates)

    def decide(self, *, buffered: int, oldest_received_at: datetime | None, now: datetime) -> BufferDecision:
        """Whether `buffered` updates, the oldest received at `oldest_received_at`, are ready at `now`.

        Timestamps must be timezone-aware so that workers in different zones agree on the deadline.
        """
        if buffered < 0:
            raise ValueError(f"buffered count must be >= 0, got {buffered}")
        if now.tzinfo is None or (oldest_received_at is not None and oldest_received_at.tzinfo is None):
            raise ValueError("buffer timestamps must be timezone-aware")
        if buffered == 0:
            return BufferDecision(ready=False, reason=None, check_again_at=None)
        if oldest_received_at is None:
            raise ValueError(f"{buffered} buffered updates need the oldest one's arrival time")
        if buffered >= self.size:
            return BufferDecision(ready=True, reason=ReadyReason.FULL, check_again_at=None)
        deadline = self.deadline(oldest_received_at)
        if now >= deadline:
            if buffered >= self.min_size_at_deadline:
                return BufferDecision(ready=True, reason=ReadyReason.DEADLINE, check_again_at=None)
            # Past the deadline but too few: only a new arrival can change the answer.
            return BufferDecision(ready=False, reason=None, check_again_at=None)
        return BufferDecision(ready=False, reason=None, check_again_at=deadline)
