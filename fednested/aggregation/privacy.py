"""Central differential privacy on the aggregate (DP-FedAvg, McMahan et al., 2018, "Learning Differentially Private
Recurrent Language Models"): every update is clipped to a joint L2 norm C, the clipped updates are averaged with a
fixed denominator K, and Gaussian noise N(0, (z·C/K)²) is added to every coordinate. Each such aggregation is one
Gaussian mechanism with noise multiplier z; ε at a given δ over a federation's history is composed by the RDP
accountant of Google's `dp-accounting` library (imported lazily: the edge client does not need it).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

# Bounds that keep a hostile or mistyped config from stalling the accountant; far beyond any useful setting.
MAX_NOISE_MULTIPLIER = 1e6
MAX_PLANNED_AGGREGATIONS = 1_000_000

PRIVACY_KEYS: dict[str, str] = {
    "noise_multiplier": "a number > 0 (required): the noise std in units of clip_norm, z",
    "clip_norm": "a number > 0 (required): the bound C on the joint L2 norm of one whole update (all its experts)",
    "delta": "a number in (0, 1) (default 1e-05): the δ at which ε is reported",
    "epsilon_budget": "a number > 0, or null (default): the ε a round may not exceed (null: account, never refuse)",
    "planned_aggregations": f"an integer in [1, {MAX_PLANNED_AGGREGATIONS}] (default 1): how many noised aggregations "
    "the round plans, all counted against the budget before it opens",
}


class PrivacyConfigError(ValueError):
    """A DP configuration that cannot be used; the message names the key, the value and what is expected."""


@dataclass(frozen=True)
class PrivacyConfig:
    """A federation's DP settings: noise multiplier z, clip C, the δ of its ε, and an optional ε budget."""

    noise_multiplier: float
    clip_norm: float
    delta: float = 1e-5
    epsilon_budget: float | None = None
    planned_aggregations: int = 1

    def __post_init__(self) -> None:
        checks: tuple[tuple[str, Any, bool], ...] = (
            ("noise_multiplier", self.noise_multiplier, _number(self.noise_multiplier, 0, MAX_NOISE_MULTIPLIER)),
            ("clip_norm", self.clip_norm, _number(self.clip_norm, 0, math.inf)),
            ("delta", self.delta, _number(self.delta, 0, 1) and self.delta < 1),
            (
                "epsilon_budget",
                self.epsilon_budget,
                self.epsilon_budget is None or _number(self.epsilon_budget, 0, math.inf),
            ),
            (
                "planned_aggregations",
                self.planned_aggregations,
                isinstance(self.planned_aggregations, int)
                and not isinstance(self.planned_aggregations, bool)
                and 1 <= self.planned_aggregations <= MAX_PLANNED_AGGREGATIONS,
            ),
        )
        for key, value, ok in checks:
            if not ok:
                raise PrivacyConfigError(f"'{key}' must be {PRIVACY_KEYS[key]}, got {value!r}")

    @classmethod
    def from_mapping(cls, raw: Any, *, where: str = "round config 'dp'") -> PrivacyConfig:
        """The config from a JSON object; PrivacyConfigError naming `where` and the key for anything unusable."""
        if not isinstance(raw, dict):
            raise PrivacyConfigError(f"{where} must be an object with noise_multiplier and clip_norm, got {raw!r}")
        unknown = sorted(str(key) for key in raw if key not in PRIVACY_KEYS)
        if unknown:
            raise PrivacyConfigError(f"{where}: unknown keys {unknown}; known keys are {sorted(PRIVACY_KEYS)}")
        for key in ("noise_multiplier", "clip_norm"):
            if key not in raw:
                raise PrivacyConfigError(f"{where}: '{key}' is required: {PRIVACY_KEYS[key]}")
        for key, value in raw.items():
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            if not numeric and not (key == "epsilon_budget" and value is None):
                raise PrivacyConfigError(f"{where}: '{key}' must be {PRIVACY_KEYS[key]}, got {value!r}")
        try:
            return cls(
                noise_multiplier=float(raw["noise_multiplier"]),
                clip_norm=float(raw["clip_norm"]),
                delta=float(raw.get("delta", 1e-5)),
                epsilon_budget=None if raw.get("epsilon_budget") is None else float(raw["epsilon_budget"]),
                planned_aggregations=raw.get("planned_aggregations", 1),
            )
        except PrivacyConfigError as error:
            raise PrivacyConfigError(f"{where}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _number(value: Any, low: float, high: float) -> bool:
    """A finite number (not a bool) in (low, high]."""
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and low < value <= high
    )


class PrivacyBudgetExceeded(ValueError):
    """The planned aggregations would take ε over the federation's budget; says by how much."""

    def __init__(
        self, *, epsilon_after: float, budget: float, planned: int, done: int, noise_multiplier: float, delta: float
    ) -> None:
        self.epsilon_after = epsilon_after
        self.budget = budget
        self.excess = epsilon_after - budget
        self.planned = planned
        super().__init__(
            f"ε would reach {epsilon_after:.3g} (δ={delta:g}) after {done + planned} noised aggregations ({done} done "
            f"+ {planned} planned) at noise multiplier {noise_multiplier:g}; the budget is {budget:g}, exceeded by "
            f"{self.excess:.3g}"
        )


def epsilon_for(noise_multipliers: Sequence[float], delta: float) -> float:
    """ε at `delta` after one Gaussian mechanism per aggregation, with the noise multipliers given (they may differ
    from one aggregation to the next), composed with the RDP accountant; 0.0 for an empty history.

    No amplification by subsampling is claimed: the server does not sample devices uniformly at random (devices
    choose when to train and send), so each aggregation counts as a full Gaussian mechanism on every update in it.
    """
    if not (isinstance(delta, float | int) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    for index, z in enumerate(noise_multipliers):
        if not (math.isfinite(z) and z > 0):
            raise ValueError(f"noise multiplier #{index} must be a finite number > 0, got {z!r}")
    if not noise_multipliers:
        return 0.0
    import dp_accounting
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant()
    # One composition per distinct z, with its count: the same ε, without a Python loop over a long history.
    for z, count in Counter(float(z) for z in noise_multipliers).items():
        accountant.compose(dp_accounting.GaussianDpEvent(z), count)
    return float(accountant.get_epsilon(delta))


def check_budget(history: Sequence[float], config: PrivacyConfig, planned: int = 1) -> float:
    """ε after `history` (the noise multipliers of the aggregations done) and `planned` more at the config's z.

    Raises PrivacyBudgetExceeded, saying by how much, when the config has an ε budget and that ε is over it.
    """
    if isinstance(planned, bool) or not isinstance(planned, int) or planned < 1:
        raise ValueError(f"planned must be an integer >= 1, got {planned!r}")
    epsilon = epsilon_for([*history, *([config.noise_multiplier] * planned)], config.delta)
    if config.epsilon_budget is not None and epsilon > config.epsilon_budget:
        raise PrivacyBudgetExceeded(
            epsilon_after=epsilon,
            budget=config.epsilon_budget,
            planned=planned,
            done=len(history),
            noise_multiplier=config.noise_multiplier,
            delta=config.delta,
        )
    return epsilon


def noise_multiplier_for(epsilon: float, delta: float, aggregations: int) -> float:
    """The smallest noise multiplier z (to dp-accounting's calibration tolerance, erring on the private side) whose
    `aggregations` Gaussian mechanisms stay within ε = `epsilon` at `delta`."""
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if isinstance(aggregations, bool) or not isinstance(aggregations, int) or aggregations < 1:
        raise ValueError(f"aggregations must be an integer >= 1, got {aggregations!r}")
    import dp_accounting
    from dp_accounting import rdp

    def event(z: float) -> Any:
        return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), aggregations)

    z = dp_accounting.calibrate_dp_mechanism(
        rdp.RdpAccountant,
        event,
        epsilon,
        delta,
        dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
        tol=1e-4,
    )
    return float(z)


def secure_generator() -> torch.Generator:
    """A generator for DP noise seeded from the operating system's entropy (64 bits of os.urandom).

    A seed derived from anything an adversary knows (a round id, the time, a fixed seed) would let them regenerate
    the noise and subtract it. torch's Mersenne Twister is not a cryptographic generator, but its draws are never
    released apart from the noised aggregate, so they cannot be observed to recover its state.
    """
    generator = torch.Generator()
    generator.manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
    return generator
