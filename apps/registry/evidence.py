"""How an aggregated candidate was made, as officers read it: the robust rule and what it cut, the server optimiser,
and the differential privacy actually applied, summarised from the lineage its immutable manifest records.

One function for the REST API (`aggregation` of a version) and the console's version page, so both say the same.
`dp_noised` is true only when the record shows noise drawn on some coordinates: a configuration that asked for noise
is not proof that any was added.
"""

from __future__ import annotations

import math
from typing import Any

PRIVACY_FIELDS = (
    "noise_multiplier",
    "clip_norm",
    "delta",
    "epsilon",
    "epsilon_budget",
    "noise_std",
    "noise_drawn",
    "noised_coordinates",
    "noised_all_model_keys",
    "contributors",
    "noised_aggregations",
    "unprotected_aggregations",
    "clipped_updates",
)


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def aggregation_evidence(manifest: Any) -> dict[str, Any] | None:
    """The summary for a version whose manifest records an aggregation; None for any other version (uploaded,
    trained on Tier 1)."""
    lineage = manifest.get("lineage") if isinstance(manifest, dict) else None
    aggregation = lineage.get("aggregation") if isinstance(lineage, dict) else None
    if not isinstance(aggregation, dict):
        return None
    raw_rule = aggregation.get("rule")
    rule: dict[str, Any] = raw_rule if isinstance(raw_rule, dict) else {}
    raw_scaled = rule.get("scaled")
    scaled: dict[str, Any] = raw_scaled if isinstance(raw_scaled, dict) else {}
    optimizer = aggregation.get("server_optimizer")
    privacy = aggregation.get("privacy")
    noised = (
        isinstance(privacy, dict)
        and privacy.get("noise_drawn") is True
        and (_number(privacy.get("noised_coordinates")) or 0.0) > 0
        and (_number(privacy.get("noise_std")) or 0.0) > 0
    )
    return {
        "rule": {
            "method": aggregation.get("method"),
            "clip_norm": aggregation.get("clip_norm"),
            "norm_bound_multiplier": aggregation.get("norm_bound_multiplier"),
            "trim_fraction": aggregation.get("trim_fraction") if aggregation.get("method") == "trimmed_mean" else None,
            "max_update_share": aggregation.get("max_update_share"),
            "staleness_exponent": aggregation.get("staleness_exponent"),
            "weights": rule.get("weights"),
            "updates_scaled": len(scaled),
            "scaled": scaled,
            "share_capped": rule.get("share_capped") or {},
            "trimmed_per_end": rule.get("trimmed_per_end") or {},
            "notes": aggregation.get("notes") or [],
        },
        "server_optimizer": (
            {
                key: optimizer.get(key)
                for key in ("name", "learning_rate", "momentum", "beta2", "tau", "resumed_from", "note")
            }
            if isinstance(optimizer, dict)
            # Candidates made before server optimisers: plain FedAvg with the server learning rate.
            else {"name": "fedavg", "learning_rate": aggregation.get("server_learning_rate")}
        ),
        "dp_noised": noised,
        "privacy": {key: privacy.get(key) for key in PRIVACY_FIELDS} if isinstance(privacy, dict) else None,
    }
