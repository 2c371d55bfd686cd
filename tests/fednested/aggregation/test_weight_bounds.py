"""Bounds on what a device's own claims can buy: the per-update share cap, reliability from the device's record,
and routed tokens scaled down when the claimed training is out of line with the device's history."""

from __future__ import annotations

import math

import pytest

from fednested.aggregation.weights import (
    UpdateFacts,
    WeightingConfig,
    bound_claimed_tokens,
    bounded_expert_weights,
    cap_shares,
    expert_weights,
    expert_weights_uncapped,
    reliability_from_history,
)


def facts(update_id: str, tokens: dict[str, int], *, staleness: int = 0, reliability: float = 1.0) -> UpdateFacts[str]:
    return UpdateFacts(
        update_id=update_id,
        experts=frozenset(tokens),
        staleness=staleness,
        examples=10,
        routed_tokens=tokens,
        reliability=reliability,
    )


@pytest.mark.parametrize(
    ("values", "cap", "shares"),
    [
        # One entry over the cap: fixed at 0.5, the other three share the remaining 0.5 in proportion.
        ([1, 1, 1, 97], 0.5, [1 / 6, 1 / 6, 1 / 6, 0.5]),
        ([10, 10, 80, 0], 0.4, [0.3, 0.3, 0.4, 0.0]),
        # Cascade: capping 69 lifts 30 over the cap (30/31 · 0.6 > 0.4), which is capped in turn; 1 gets the rest.
        ([1, 30, 69], 0.4, [0.2, 0.4, 0.4]),
        # Exactly at the cap is not over it.
        ([2, 1, 1], 0.5, [0.5, 0.25, 0.25]),
        # Nothing over the cap: plain proportions.
        ([1, 2, 3, 4], 0.5, [0.1, 0.2, 0.3, 0.4]),
        ([3, 1], 1.0, [0.75, 0.25]),
        # Infeasible (2 positive entries cannot each stay under 0.3): equal shares; zeros stay 0.
        ([5, 0, 1], 0.3, [0.5, 0.0, 0.5]),
        ([7], 0.5, [1.0]),
        # Two entries under a cap of 1/2: the only split that respects it.
        ([10, 30], 0.5, [0.5, 0.5]),
        ([0, 0], 0.5, [0.0, 0.0]),
        ([], 0.5, []),
    ],
)
def test_cap_shares_water_fills(values: list[float], cap: float, shares: list[float]) -> None:
    result = cap_shares(values, cap)
    assert result == pytest.approx(shares, abs=1e-12)
    if any(value > 0 for value in values):
        assert math.fsum(result) == pytest.approx(1.0, abs=1e-12)
        if cap * sum(value > 0 for value in values) > 1:
            assert max(result) <= cap + 1e-12


def test_cap_shares_keeps_the_proportions_of_the_uncapped_entries() -> None:
    values = [3.0, 6.0, 9.0, 1000.0, 2000.0]
    shares = cap_shares(values, 0.3)
    assert shares[3] == shares[4] == 0.3
    assert shares[1] / shares[0] == pytest.approx(2.0)
    assert shares[2] / shares[0] == pytest.approx(3.0)
    assert sum(shares) == pytest.approx(1.0)


@pytest.mark.parametrize("cap", [0.0, -0.5, 1.5, math.nan])
def test_cap_shares_refuses_a_cap_outside_zero_one(cap: float) -> None:
    with pytest.raises(ValueError, match=r"cap must lie in \(0, 1\]"):
        cap_shares([1.0, 2.0], cap)


@pytest.mark.parametrize("share", [0.0, 1.5, -0.1, math.inf, math.nan])
def test_config_refuses_a_share_outside_zero_one(share: float) -> None:
    with pytest.raises(ValueError, match=r"max_update_share must be None or a number in \(0, 1\]"):
        WeightingConfig(max_update_share=share)


def test_default_cap_is_below_one_half() -> None:
    # Strictly below the weighted median's breakdown point: no single update can hold half an expert's weight.
    assert WeightingConfig().max_update_share == 0.4


def test_one_update_claiming_a_thousand_times_the_tokens_is_capped() -> None:
    updates = [facts(f"h{index}", {"0.0": 100, "0.1": 50}) for index in range(3)]
    updates.append(facts("liar", {"0.0": 100_000, "0.1": 50}))
    config = WeightingConfig(max_update_share=0.4)
    plan = bounded_expert_weights(updates, config)
    assert plan.capped == {"liar": ["0.0"]}
    assert plan.weights[3]["0.0"] == pytest.approx(0.4)
    assert [weight["0.0"] for weight in plan.weights[:3]] == pytest.approx([0.2, 0.2, 0.2])
    # Expert 0.1: equal claims, nothing capped, equal weights.
    assert [weight["0.1"] for weight in plan.weights] == pytest.approx([0.25] * 4)
    # What the cap is measured against: the liar's raw claim would have bought 99.7 % of expert 0.0.
    uncapped = expert_weights_uncapped(updates, config)
    assert uncapped[3]["0.0"] == pytest.approx(100_000 / 100_300)
    assert expert_weights(updates, config) == plan.weights


def test_default_config_caps_the_liar_below_one_half() -> None:
    updates = [*(facts(f"h{index}", {"0.0": 100}) for index in range(3)), facts("liar", {"0.0": 100_000})]
    plan = bounded_expert_weights(updates, WeightingConfig())
    assert plan.capped == {"liar": ["0.0"]}
    assert [weight["0.0"] for weight in plan.weights] == pytest.approx([0.2, 0.2, 0.2, 0.4])


def test_the_final_cap_holds_whatever_the_servers_factors_do() -> None:
    # Honest updates three promotions stale, the liar fresh: capping the claims alone would leave the liar 0.57.
    updates = [facts(f"h{index}", {"0.0": 100}, staleness=3) for index in range(4)]
    updates.append(facts("liar", {"0.0": 100_000}))
    plan = bounded_expert_weights(updates, WeightingConfig(max_update_share=0.4))
    assert plan.weights[4]["0.0"] == pytest.approx(0.4)
    assert sum(weight["0.0"] for weight in plan.weights) == pytest.approx(1.0)
    assert plan.capped == {"liar": ["0.0"]}


def test_staleness_still_counts_after_the_cap() -> None:
    fresh, stale = facts("fresh", {"0.0": 100}, staleness=0), facts("stale", {"0.0": 100}, staleness=1)
    plan = bounded_expert_weights([fresh, stale], WeightingConfig())
    root = 2**-0.5
    assert plan.weights[0]["0.0"] == pytest.approx(1 / (1 + root), rel=1e-15)
    assert plan.weights[1]["0.0"] == pytest.approx(root / (1 + root), rel=1e-15)
    assert plan.capped == {}
    # A stale liar is capped first, then discounted: its 1000× claim buys it no more than the honest fresh update.
    liar = facts("liar", {"0.0": 100_000}, staleness=1)
    capped = bounded_expert_weights([fresh, liar], WeightingConfig())
    assert capped.capped == {"liar": ["0.0"]}
    assert capped.weights[0]["0.0"] == pytest.approx(1 / (1 + root), rel=1e-15)


def test_reliability_is_applied_after_the_cap() -> None:
    updates = [facts("a", {"0.0": 10}, reliability=1.0), facts("b", {"0.0": 10}, reliability=0.25)]
    plan = bounded_expert_weights(updates, WeightingConfig())
    assert [weight["0.0"] for weight in plan.weights] == pytest.approx([0.8, 0.2])


def test_zero_token_experts_keep_weight_zero_and_are_not_called_capped() -> None:
    updates = [facts("a", {"0.0": 10, "0.1": 0}), facts("b", {"0.0": 10, "0.1": 0}), facts("c", {"0.1": 5})]
    plan = bounded_expert_weights(updates, WeightingConfig())
    assert plan.weights == [{"0.0": 0.5, "0.1": 0.0}, {"0.0": 0.5, "0.1": 0.0}, {"0.1": 1.0}]
    assert plan.capped == {}
    nobody = bounded_expert_weights([facts("a", {"0.2": 0})], WeightingConfig())
    assert nobody.weights == [{"0.2": 0.0}]


@pytest.mark.parametrize(
    "config",
    [WeightingConfig(max_update_share=None), WeightingConfig(by_routed_tokens=False)],
    ids=["no-cap", "no-routed-tokens"],
)
def test_without_the_cap_or_routed_tokens_the_weights_are_the_uncapped_ones(config: WeightingConfig) -> None:
    updates = [facts("a", {"0.0": 100}, staleness=2), facts("b", {"0.0": 100_000})]
    plan = bounded_expert_weights(updates, config)
    assert plan.capped == {}
    assert plan.weights == expert_weights_uncapped(updates, config)


@pytest.mark.parametrize(
    ("accepted", "rejected", "reliability"),
    [(0, 0, 0.5), (8, 0, 0.9), (3, 1, 4 / 6), (0, 2, 0.25), (98, 0, 0.99), (1, 1, 0.5)],
)
def test_reliability_is_the_beta_posterior_mean(accepted: int, rejected: int, reliability: float) -> None:
    assert reliability_from_history(accepted, rejected) == pytest.approx(reliability, rel=1e-15)


def test_reliability_refuses_negative_counts() -> None:
    with pytest.raises(ValueError, match="counts must be >= 0, got accepted=-1, rejected=0"):
        reliability_from_history(-1, 0)
    with pytest.raises(ValueError, match="counts must be >= 0, got accepted=0, rejected=-2"):
        reliability_from_history(0, -2)


ROUTED = {"0.0": 5000, "0.1": 2500, "1.3": 7}


@pytest.mark.parametrize("history", [[], [100.0], [100.0, 120.0]])
def test_claims_with_under_three_earlier_updates_are_not_bounded(history: list[float]) -> None:
    assert bound_claimed_tokens(ROUTED, claimed_tokens=10_000, history=history, factor=4) == (ROUTED, None)


def test_claim_within_the_factor_of_the_history_is_unchanged() -> None:
    # Ceiling 4 × median 100 = 400; claiming exactly that is allowed.
    assert bound_claimed_tokens(ROUTED, claimed_tokens=400, history=[100, 120, 80], factor=4) == (ROUTED, None)
    assert bound_claimed_tokens(ROUTED, claimed_tokens=0, history=[100, 120, 80], factor=4) == (ROUTED, None)


def test_claim_over_the_factor_of_the_history_scales_routed_tokens_down() -> None:
    bounded, note = bound_claimed_tokens(ROUTED, claimed_tokens=10_000, history=[100, 120, 80], factor=4)
    # Ratio 400 / 10,000 = 0.04, rounded down to whole tokens.
    assert bounded == {"0.0": 200, "0.1": 100, "1.3": 0}
    assert note == (
        "claims 10000 training tokens, over 4× the median 100 of the device's last 3 accepted updates; "
        "routed tokens scaled by 0.04"
    )
