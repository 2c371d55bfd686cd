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
from fednested.aggregation.privacy import (
    PrivacyBudgetExceeded,
    PrivacyConfig,
    PrivacyConfigError,
    check_budget,
    epsilon_for,
    noise_multiplier_for,
    secure_generator,
)
from fednested.aggregation.rejections import REJECTION_DESCRIPTIONS, RejectionCode, UpdateRejected
from fednested.aggregation.server_optimizers import (
    SERVER_OPTIMIZERS,
    ServerOptimizer,
    ServerOptimizerConfig,
    ServerOptimizerName,
    ServerOptimizerState,
    ServerOptimizerStateError,
    load_server_state,
    resume_server_optimizer,
    save_server_state,
)
from fednested.aggregation.validation import UpdateLimits, ValidatedUpdate, expert_shapes_of, validate_update
from fednested.aggregation.weights import (
    UpdateFacts,
    WeightingConfig,
    expert_weights,
    normalise_per_expert,
    raw_expert_weights,
    staleness_weight,
)
from fednested.aggregation.window import WindowResult, combine_window

__all__ = [
    "AGGREGATION_METHODS",
    "REJECTION_DESCRIPTIONS",
    "SERVER_OPTIMIZERS",
    "AggregationConfig",
    "AggregationMethod",
    "BufferDecision",
    "BufferPolicy",
    "ExpertKey",
    "PrivacyBudgetExceeded",
    "PrivacyConfig",
    "PrivacyConfigError",
    "ReadyReason",
    "RejectionCode",
    "ServerOptimizer",
    "ServerOptimizerConfig",
    "ServerOptimizerName",
    "ServerOptimizerState",
    "ServerOptimizerStateError",
    "UpdateFacts",
    "UpdateLimits",
    "UpdateRejected",
    "ValidatedUpdate",
    "WeightingConfig",
    "WindowResult",
    "aggregate_expert_deltas",
    "check_budget",
    "clip_update_per_expert",
    "combine_window",
    "epsilon_for",
    "expert_key",
    "expert_of_delta",
    "expert_shapes_of",
    "expert_weights",
    "experts_of",
    "load_server_state",
    "noise_multiplier_for",
    "normalise_per_expert",
    "raw_expert_weights",
    "resume_server_optimizer",
    "save_server_state",
    "secure_generator",
    "staleness_weight",
    "validate_update",
]
