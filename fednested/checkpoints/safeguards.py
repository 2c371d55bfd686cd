"""The safeguard files a version ships (beside its weights, partition "safeguards") and the `safeguards` section of a
round's config that asks devices to use them: read the same way by the control plane when it opens a round and by
the edge client when it trains, so a round the control plane accepts is one every device can run."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from pydantic import TypeAdapter
from pydantic import ValidationError as PydanticValidationError

from fednested.config.training import SafeguardConfig

# The name a version's replay set has in it: the JSONL of public or synthetic records the federation configured.
REPLAY_FILE_NAME = "replay.jsonl"
# A replay set ships with every version and every device reads it whole: bounded on both sides (the control plane
# refuses a larger one, a device a larger download), so a configuration mistake cannot multiply every download.
MAX_REPLAY_BYTES = 8 * 1024 * 1024
# The round config's key for what devices apply while training.
ROUND_KEY = "safeguards"


def parse_round_safeguards(config: Mapping[str, Any], *, where: str = "config") -> SafeguardConfig | None:
    """The round config's `safeguards` as a SafeguardConfig; None when absent. ValueError naming the key."""
    raw = config.get(ROUND_KEY)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: {ROUND_KEY!r} must be an object of SafeguardConfig fields, got {raw!r}")
    known = {spec.name for spec in dataclasses.fields(SafeguardConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{where}: {ROUND_KEY}: unknown keys {unknown}; known: {sorted(known)}")
    try:
        return TypeAdapter(SafeguardConfig).validate_python(raw)
    except PydanticValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc']) or 'value'}: {item['msg']}" for item in error.errors()
        )
        raise ValueError(f"{where}: {ROUND_KEY}: {problems}") from None


def wants_fisher(safeguards: SafeguardConfig) -> bool:
    """EWC is on: training needs the version's Fisher and must refuse to start without it."""
    return safeguards.ewc_lambda > 0


def wants_replay(safeguards: SafeguardConfig) -> bool:
    """Replay is on: training mixes in the version's replay set and must refuse to start without it."""
    return safeguards.replay_fraction > 0
