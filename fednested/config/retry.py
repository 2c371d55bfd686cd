"""The retry policy of a device's network calls, declared once: the tier2 YAML section `retry:` and the edge
client's back-off (`edge_client.transport.retry`) both read this dataclass; it needs neither Django nor torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from fednested.config.fields import SettingError, check_settings


@dataclass(frozen=True)
class RetryPolicy:
    """Delay n (0-based) is min(max_delay_s, initial_delay_s · multiplier^n), then scaled by a uniform factor in
    [1 - jitter, 1], so devices that lost the link together do not come back in lockstep ("equal jitter")."""

    initial_delay_s: float = field(
        default=0.5, metadata={"help": "First wait after a failed attempt, in seconds.", "minimum": 0}
    )
    multiplier: float = field(default=2.0, metadata={"help": "Each further wait grows by this factor.", "minimum": 1})
    max_delay_s: float = field(default=30.0, metadata={"help": "Upper bound of one wait, in seconds.", "minimum": 0})
    jitter: float = field(
        default=0.5,
        metadata={"help": "Each wait is scaled by a random factor in [1 - jitter, 1].", "minimum": 0, "maximum": 1},
    )
    max_attempts: int = field(
        default=8, metadata={"help": "Attempts before giving up (the spool keeps the payload).", "minimum": 1}
    )

    def __post_init__(self) -> None:
        check_settings(self)
        if self.max_delay_s < self.initial_delay_s:
            raise SettingError(
                "RetryPolicy",
                "max_delay_s",
                f"must be at least initial_delay_s ({self.initial_delay_s}), got {self.max_delay_s}",
            )
