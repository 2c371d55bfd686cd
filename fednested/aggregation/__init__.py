"""Middle-loop aggregation as pure functions: validate edge updates, weight them per expert, combine dense deltas.

Framework-free: the ingest and aggregation workers are the glue between these functions and the control plane.
"""

from fednested.aggregation.aggregate import (
    AGGREGATION_METHODS,
    AggregationConfig,
    AggregationMethod,
    ExpertKey,
    aggregate_expert_deltas,
    clip_update_per_expert,
    expert_key,
    expert_of_delta,
    experts_of,
)
from fednested.aggregation.buffer import BufferDecision, BufferPolicy, ReadyReason
from fednested.aggregation.rejections import REJECTION_DESCRIPTIONS, RejectionCode, UpdateRejected
from fednested.aggregation.validation import UpdateLimits, ValidatedUpdate, expert_shapes_of, validate_update
from fednested.aggregation.weights import (
    UpdateFacts,
    WeightingConfig,
    expert_weights,
    normalise_per_expert,
    raw_expert_weights,
    staleness_weight,
)

__all__ = [
    "AGGREGATION_METHODS",
    "REJECTION_DESCRIPTIONS",
    "AggregationConfig",
    "AggregationMethod",
    "BufferDecision",
    "BufferPolicy",
    "ExpertKey",
    "ReadyReason",
    "RejectionCode",
    "UpdateFacts",
    "UpdateLimits",
    "UpdateRejected",
    "ValidatedUpdate",
    "WeightingConfig",
    "aggregate_expert_deltas",
    "clip_update_per_expert",
    "expert_key",
    "expert_of_delta",
    "expert_shapes_of",
    "expert_weights",
    "experts_of",
    "normalise_per_expert",
    "raw_expert_weights",
    "staleness_weight",
    "validate_update",
]
