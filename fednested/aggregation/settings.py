"""A round's aggregation settings, read from the plain JSON object stored with the round (`Round.config`).

Framework-free so that the control plane can check a round's config when the round is opened, and the workers read
the same settings the same way. Keys this module does not know are left alone: the same object also carries
settings for the devices (it is broadcast in RoundStart).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from fednested.aggregation.aggregate import AGGREGATION_METHODS, DIRECTION_SCOPES, AggregationConfig
from fednested.aggregation.privacy import PRIVACY_KEYS, PrivacyConfig, PrivacyConfigError
from fednested.aggregation.server_optimizers import SERVER_OPTIMIZERS, ServerOptimizerConfig
from fednested.aggregation.validation import UpdateLimits
from fednested.aggregation.weights import WeightingConfig

# key → what the value must be; errors about a key quote it.
ROUND_SETTING_KEYS: dict[str, str] = {
    "aggregation_method": f"one of {', '.join(AGGREGATION_METHODS)}",
    "clip_norm": "a number > 0, or null for no clipping",
    "norm_bound_multiplier": "a number >= 1 (bound = that × the median norm per expert), or null for no bound",
    "max_update_share": "a number in (0, 1]: the most of an expert's routed-token weight one update may claim, or null",
    "claim_history_factor": "a number >= 1: routed tokens are scaled down when an update claims more training tokens "
    "than this × the median of the device's earlier accepted updates",
    "min_cosine": "a number in [-1, 1): an update whose cosine with the weighted mean of the other contributors is "
    "below it gets weight 0 (direction screen), or null for no screen",
    "direction_scope": f"one of {', '.join(DIRECTION_SCOPES)}: the direction screen compares each expert's delta "
    "(and cuts that expert) or the whole update over all its experts (and drops the update)",
    "trim_fraction": "a number in [0, 0.5)",
    "server_learning_rate": "a number in (0, 100] (the server optimiser's η; fedavg: W ← W + η·ΔW)",
    "server_optimizer": f"one of {', '.join(SERVER_OPTIMIZERS)} (Reddi et al., 2021; the state of fedavgm, fedadam and "
    "fedyogi follows the line of champions)",
    "server_momentum": "a number in [0, 1): β1 of fedavgm, fedadam and fedyogi",
    "server_beta2": "a number in [0, 1): β2 of fedadam and fedyogi",
    "server_tau": "a number > 0: the adaptivity τ of fedadam and fedyogi",
    "dp": "null (no differential privacy) or an object with "
    + "; ".join(f"{key}: {text}" for key, text in PRIVACY_KEYS.items())
    + ". Needs aggregation_method weighted_mean and no norm_bound_multiplier",
    "staleness_exponent": "a number >= 0 (a in (1 + τ)^-a)",
    "weight_by_routed_tokens": "true or false",
    "weight_by_examples": "true or false",
    "weight_by_reliability": "true or false",
    "max_staleness": "an integer >= 0 (versions behind the champion)",
    "max_payload_bytes": "an integer > 0",
    "max_delta_norm": "a number > 0, or null",
    "max_total_norm": "a number > 0, or null",
    "max_wait_s": "a number of seconds in (0, 2592000] (30 days), or null (then only the round deadline counts)",
    "min_updates_at_deadline": "an integer >= 1",
    "min_cohort_fraction": "a number in (0, 1]: the share of a synchronous round's cohort needed at the deadline",
}


def default_aggregation() -> AggregationConfig:
    """The rule a new federation gets: the weighted mean with each update's delta per expert scaled down to twice the
    window's median norm (Sun et al., 2019), no update over 40 % of an expert's weight, and a direction screen that
    gives weight 0 to an update whose whole-update cosine with the mean of the others is below −0.02 (a strict minority
    of at least three updates only). Chosen by `make bench-federated` (docs/benchmarks/federated.md) with the rule
    declared before the runs: it costs nothing on clean runs, holds ×100-scaled updates and inflated token claims to a
    few percent, and halves what a sign-flipped update of honest norm does (0.306 → 0.164, target 0.05: not met).
    The −0.02 is absolute and was tuned on the tiny model at rank 8; another model may need it tuned again."""
    return AggregationConfig(
        weighting=WeightingConfig(max_update_share=0.4),
        method="weighted_mean",
        norm_bound_multiplier=2.0,
        clip_norm=None,
        min_cosine=-0.02,
        direction_scope="update",
        server_learning_rate=DEFAULT_SERVER_OPTIMIZER.learning_rate,
    )


# FedAvgM with β = 0.5 and η = 1, the best of the four optimisers in `make bench-federated` (federated_gap 0.030 at
# K = 5; plain FedAvg 0.033 at its best η). Its first step is FedAvg's exactly: momentum only adds from the second.
DEFAULT_SERVER_OPTIMIZER = ServerOptimizerConfig(name="fedavgm", learning_rate=1.0, momentum=0.5)

ADAPTIVE_OPTIMIZERS = frozenset({"fedadam", "fedyogi"})
ADAPTIVE_DEFAULT_LEARNING_RATE = 1e-2

# Longer than any sensible window, and small enough that timedelta and the database hold it.
MAX_WAIT_S = 30 * 24 * 3600


class RoundSettingsError(ValueError):
    """A round config value that cannot be used; the message names the key, the value and what is expected."""


@dataclass(frozen=True)
class RoundAggregationSettings:
    """Everything a round decides about validating, buffering and combining its updates."""

    aggregation: AggregationConfig = field(default_factory=default_aggregation)
    limits: UpdateLimits = field(default_factory=UpdateLimits)
    max_staleness: int = 4
    max_wait: timedelta | None = None
    min_updates_at_deadline: int = 1
    min_cohort_fraction: float = 1.0
    claim_history_factor: float = 4.0
    server_optimizer: ServerOptimizerConfig = field(default_factory=lambda: DEFAULT_SERVER_OPTIMIZER)
    # Central DP on the aggregate (fednested.aggregation.privacy); None = no noise, and no flag may claim any.
    privacy: PrivacyConfig | None = None

    def __post_init__(self) -> None:
        if self.privacy is not None:
            problem = dp_conflict(self.aggregation)
            if problem is not None:
                raise RoundSettingsError(problem)
        if self.server_optimizer.learning_rate != self.aggregation.server_learning_rate:
            raise RoundSettingsError(
                f"server_optimizer.learning_rate {self.server_optimizer.learning_rate} and "
                f"aggregation.server_learning_rate {self.aggregation.server_learning_rate} must be the same η"
            )

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any], *, where: str = "round config") -> RoundAggregationSettings:
        """Parse the known keys of `config` (see ROUND_SETTING_KEYS); absent keys keep their defaults."""
        defaults = cls()
        aggregation = defaults.aggregation
        limits = defaults.limits
        weighting = aggregation.weighting

        def value(key: str, kind: type | tuple[type, ...], default: Any, *, nullable: bool = False) -> Any:
            if key not in config:
                return default
            raw = config[key]
            if raw is None and nullable:
                return None
            # bool is an int to Python, but `true` is no size or count.
            if isinstance(raw, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
                raise RoundSettingsError(f"{where}: {key!r} must be {ROUND_SETTING_KEYS[key]}, got {raw!r}")
            if not isinstance(raw, kind):
                raise RoundSettingsError(f"{where}: {key!r} must be {ROUND_SETTING_KEYS[key]}, got {raw!r}")
            if isinstance(raw, float) and not math.isfinite(raw):
                raise RoundSettingsError(f"{where}: {key!r} must be {ROUND_SETTING_KEYS[key]}, got {raw!r}")
            return raw

        number = (int, float)
        # A round that asks for DP gets the DP-compatible rule where it does not name one: the defaults' robust
        # screens are not clipped sums (dp_conflict), and DP's whole-update clip bounds every update already.
        private = config.get("dp") is not None
        default_method = "weighted_mean" if private else aggregation.method
        default_bound = None if private else aggregation.norm_bound_multiplier
        default_cosine = None if private else aggregation.min_cosine
        name = value("server_optimizer", str, defaults.server_optimizer.name)
        # Adaptive optimisers normalise each coordinate's step, so η is a step size per weight, not a multiple of the
        # mean delta: η = 1 would move every weight by about 1. 1e-2 is the top of bench-federated's grid for them.
        default_eta = (
            ADAPTIVE_DEFAULT_LEARNING_RATE if name in ADAPTIVE_OPTIMIZERS else aggregation.server_learning_rate
        )
        try:
            weighting = WeightingConfig(
                staleness_exponent=float(value("staleness_exponent", number, weighting.staleness_exponent)),
                by_routed_tokens=value("weight_by_routed_tokens", bool, weighting.by_routed_tokens),
                by_examples=value("weight_by_examples", bool, weighting.by_examples),
                by_reliability=value("weight_by_reliability", bool, weighting.by_reliability),
                max_update_share=_optional_float(
                    value("max_update_share", number, weighting.max_update_share, nullable=True)
                ),
            )
            clip_norm = value("clip_norm", number, aggregation.clip_norm, nullable=True)
            aggregation = AggregationConfig(
                weighting=weighting,
                method=value("aggregation_method", str, default_method),
                clip_norm=float(clip_norm) if clip_norm is not None else None,
                norm_bound_multiplier=_optional_float(
                    value("norm_bound_multiplier", number, default_bound, nullable=True)
                ),
                trim_fraction=float(value("trim_fraction", number, aggregation.trim_fraction)),
                min_cosine=_optional_float(value("min_cosine", number, default_cosine, nullable=True)),
                direction_scope=value("direction_scope", str, aggregation.direction_scope),
                server_learning_rate=float(value("server_learning_rate", number, default_eta)),
            )
            # The default's tuned β applies to the default optimiser; another one named alone gets the paper's β.
            optimizer = defaults.server_optimizer if name == defaults.server_optimizer.name else ServerOptimizerConfig()
            server_optimizer = ServerOptimizerConfig(
                name=name,
                learning_rate=aggregation.server_learning_rate,
                momentum=float(value("server_momentum", number, optimizer.momentum)),
                beta2=float(value("server_beta2", number, optimizer.beta2)),
                tau=float(value("server_tau", number, optimizer.tau)),
            )
            max_delta_norm = value("max_delta_norm", number, limits.max_delta_norm, nullable=True)
            max_total_norm = value("max_total_norm", number, limits.max_total_norm, nullable=True)
            limits = UpdateLimits(
                max_bytes=value("max_payload_bytes", int, limits.max_bytes),
                max_delta_norm=float(max_delta_norm) if max_delta_norm is not None else None,
                max_total_norm=float(max_total_norm) if max_total_norm is not None else None,
                allowed_dtypes=limits.allowed_dtypes,
            )
        except RoundSettingsError:
            raise
        except ValueError as error:
            raise RoundSettingsError(f"{where}: {error}") from error
        privacy = None
        if config.get("dp") is not None:
            try:
                privacy = PrivacyConfig.from_mapping(config["dp"], where=f"{where}: 'dp'")
            except PrivacyConfigError as error:
                raise RoundSettingsError(str(error)) from error
            problem = dp_conflict(aggregation)
            if problem is not None:
                raise RoundSettingsError(f"{where}: {problem}")
        max_staleness = value("max_staleness", int, defaults.max_staleness)
        if max_staleness < 0:
            raise RoundSettingsError(f"{where}: 'max_staleness' must be {ROUND_SETTING_KEYS['max_staleness']}")
        max_wait_s = value("max_wait_s", number, None, nullable=True)
        if max_wait_s is not None and not 0 < max_wait_s <= MAX_WAIT_S:
            raise RoundSettingsError(f"{where}: 'max_wait_s' must be {ROUND_SETTING_KEYS['max_wait_s']}")
        minimum = value("min_updates_at_deadline", int, defaults.min_updates_at_deadline)
        if minimum < 1:
            raise RoundSettingsError(
                f"{where}: 'min_updates_at_deadline' must be {ROUND_SETTING_KEYS['min_updates_at_deadline']}"
            )
        fraction = float(value("min_cohort_fraction", number, defaults.min_cohort_fraction))
        if not 0 < fraction <= 1:
            raise RoundSettingsError(
                f"{where}: 'min_cohort_fraction' must be {ROUND_SETTING_KEYS['min_cohort_fraction']}, got {fraction}"
            )
        history_factor = float(value("claim_history_factor", number, defaults.claim_history_factor))
        if history_factor < 1:
            raise RoundSettingsError(
                f"{where}: 'claim_history_factor' must be {ROUND_SETTING_KEYS['claim_history_factor']}, "
                f"got {history_factor}"
            )
        return cls(
            aggregation=aggregation,
            limits=limits,
            max_staleness=max_staleness,
            max_wait=timedelta(seconds=max_wait_s) if max_wait_s is not None else None,
            min_updates_at_deadline=minimum,
            min_cohort_fraction=fraction,
            claim_history_factor=history_factor,
            server_optimizer=server_optimizer,
            privacy=privacy,
        )


def dp_conflict(aggregation: AggregationConfig) -> str | None:
    """Why `aggregation` cannot be combined with DP, or None.

    DP's noise is calibrated to the sensitivity of a clipped sum: one update moves it by at most C. The trimmed mean
    and the coordinate median are not sums (which values survive depends on every update), and the relative norm
    bound scales each update by the median norm of the others, so removing one update changes how all the others
    count: neither has sensitivity C, and the noise would not give the ε the accountant reports. Absolute per-expert
    clipping (clip_norm) depends on the update alone, so it may stay: it applies before DP's whole-update clip.
    """
    if aggregation.method != "weighted_mean":
        return (
            f"'dp' needs aggregation_method 'weighted_mean', not {aggregation.method!r}: a robust rule's output is "
            f"not a clipped sum, so its sensitivity is not clip_norm and the noise would not give the ε reported"
        )
    if aggregation.min_cosine is not None:
        return (
            "'dp' cannot be combined with 'min_cosine': the direction screen keeps or drops an update by its cosine "
            "with the others, so one update's presence changes which others count and the sensitivity is not "
            "clip_norm; set it to null"
        )
    if aggregation.norm_bound_multiplier is not None:
        return (
            "'dp' cannot be combined with 'norm_bound_multiplier': that bound scales each update by the median norm "
            "of the others, so one update's presence changes how all count and the sensitivity is not clip_norm; "
            "set it to null (DP's clip bounds every update already)"
        )
    return None


def _optional_float(raw: Any) -> float | None:
    return None if raw is None else float(raw)
