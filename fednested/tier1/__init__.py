"""Tier-1 (data centre) training: the core update of the champion under DeepSpeed, launched as several ranks.

`run_core_update` (the launcher, imported by the CLI and the worker) checks everything a run needs, starts the ranks
and moves the candidate version into place only when every rank succeeded; `fednested.tier1.core_update` is what
each rank runs. Importing this package does not import DeepSpeed: only the ranks do.
"""

from fednested.tier1.combine import CoreUpdateEtas, combine_core_update, edge_expert_delta
from fednested.tier1.launcher import CoreUpdateError, CoreUpdateResult, run_core_update
from fednested.tier1.plan import CoreUpdatePlan, DatasetEntry, build_deepspeed_config

__all__ = [
    "CoreUpdateError",
    "CoreUpdateEtas",
    "CoreUpdatePlan",
    "CoreUpdateResult",
    "DatasetEntry",
    "build_deepspeed_config",
    "combine_core_update",
    "edge_expert_delta",
    "run_core_update",
]
