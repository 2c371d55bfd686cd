"""Staleness, routed-token, data-size and reliability weights, normalised per expert."""

from __future__ import annotations

import itertools

import pytest

from fednested.aggregation.weights import (
    UpdateFacts,
    WeightingConfig,
    expert_weights,
    normalise_per_expert,
    raw_expert_weights,
    staleness_weight,
)


def facts(update_id: str, tokens: dict[str, int], **kwargs: float) -> UpdateFacts[str]:
    return UpdateFacts(
        update_id=update_id,
        experts=frozenset(tokens),
        staleness=int(kwargs.pop("staleness", 0)),
        examples=int(kwargs.pop("examples", 10)),
        routed_tokens=tokens,
        **kwargs,
    )


def test_staleness_weight_is_the_polynomial_and_decreases() -> None:
    assert staleness_weight(0, 0.5) == 1.0
    assert staleness_weight(3, 0.5) == 0.5
    assert staleness_weight(1, 2.0) == 0.25
    weights = [staleness_weight(tau, 0.5) for tau in range(20)]
    assert all(later < earlier for earlier, later in itertools.pairwise(weights))
    assert {staleness_weight(tau, 0.0) for tau in range(5)} == {1.0}


def test_staleness_weight_rejects_negative_staleness() -> None:
    with pytest.raises(ValueError, match="staleness must be >= 0, got -1"):
        staleness_weight(-1, 0.5)


def test_raw_weight_is_the_product_of_enabled_factors() -> None:
    update = facts("u1", {"0.0": 30, "0.1": 10}, staleness=3, examples=4, reliability=0.5)
    everything = WeightingConfig(staleness_exponent=0.5, by_examples=True)
    assert raw_expert_weights(update, everything) == {"0.0": 0.5 * 30 * 4 * 0.5, "0.1": 0.5 * 10 * 4 * 0.5}
    nothing = WeightingConfig(staleness_exponent=0.0, by_routed_tokens=False, by_reliability=False)
    assert raw_expert_weights(update, nothing) == {"0.0": 1.0, "0.1": 1.0}


def test_expert_without_routed_tokens_gets_zero_weight_from_that_client() -> None:
    busy = facts("busy", {"0.0": 50, "0.1": 50})
    idle_on_second = facts("idle", {"0.0": 50, "0.1": 0})
    weights = expert_weights([busy, idle_on_second], WeightingConfig())
    assert weights[1]["0.1"] == 0.0
    assert weights[0]["0.1"] == 1.0
    assert weights[0]["0.0"] == weights[1]["0.0"] == 0.5


def test_expert_missing_from_routed_tokens_counts_as_zero_tokens() -> None:
    update = UpdateFacts(
        update_id="u", experts=frozenset({"1.2", "1.3"}), staleness=0, examples=5, routed_tokens={"1.2": 8}
    )
    assert raw_expert_weights(update, WeightingConfig()) == {"1.2": 8.0, "1.3": 0.0}


def test_weights_are_normalised_per_expert() -> None:
    updates = [
        facts("a", {"0.0": 10, "0.1": 30}, staleness=0),
        facts("b", {"0.0": 30}, staleness=3),
        facts("c", {"0.1": 10, "0.2": 0}, staleness=1, reliability=0.25),
    ]
    weights = expert_weights(updates, WeightingConfig(max_update_share=None))
    for expert in ("0.0", "0.1"):
        assert sum(update.get(expert, 0.0) for update in weights) == pytest.approx(1.0)
    # Expert 0.0: a has 10·1, b has 30·(1/2) = 15 → 0.4 and 0.6.
    assert weights[0]["0.0"] == pytest.approx(0.4)
    assert weights[1]["0.0"] == pytest.approx(0.6)
    # Nobody routed tokens to 0.2: it stays all zero, so aggregation leaves that expert alone.
    assert weights[2]["0.2"] == 0.0
    # With the default share cap of 1/2, two contributors' claims split 1/2 each before staleness and reliability:
    # expert 0.0: a 1/2·1, b 1/2·(1/2) → 2/3 and 1/3; expert 0.1: a 1/2·1, c 1/2·2^-0.5·0.25.
    capped = expert_weights(updates, WeightingConfig())
    assert capped[0]["0.0"] == pytest.approx(2 / 3)
    assert capped[1]["0.0"] == pytest.approx(1 / 3)
    c = 2**-0.5 * 0.25
    assert capped[0]["0.1"] == pytest.approx(1 / (1 + c))
    assert capped[2]["0.1"] == pytest.approx(c / (1 + c))
    assert capped[2]["0.2"] == 0.0


def test_staler_update_gets_less_weight_all_else_equal() -> None:
    shares = [
        expert_weights([facts("fresh", {"0.0": 100}), facts("old", {"0.0": 100}, staleness=tau)], WeightingConfig())[1][
            "0.0"
        ]
        for tau in range(6)
    ]
    assert shares[0] == 0.5
    assert all(later < earlier for earlier, later in itertools.pairwise(shares))


def test_normalise_rejects_negative_or_non_finite_weights() -> None:
    with pytest.raises(ValueError, match=r"update #1, expert '0.0': weight must be finite and >= 0, got -1"):
        normalise_per_expert([{"0.0": 1.0}, {"0.0": -1.0}])
    with pytest.raises(ValueError, match="got nan"):
        normalise_per_expert([{"0.0": float("nan")}])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"staleness": -1}, "update u: staleness must be >= 0"),
        ({"examples": -2}, "update u: examples must be >= 0"),
        ({"reliability": 1.5}, r"update u: reliability must lie in \[0, 1\]"),
        ({"routed_tokens": {"0.0": -3}}, "update u: routed token counts must be >= 0"),
    ],
)
def test_update_facts_reject_bad_values(kwargs: dict[str, object], message: str) -> None:
    base: dict[str, object] = {"update_id": "u", "experts": frozenset({"0.0"}), "staleness": 0, "examples": 1}
    with pytest.raises(ValueError, match=message):
        UpdateFacts(**{**base, **kwargs})  # type: ignore[arg-type]


def test_config_rejects_negative_exponent() -> None:
    with pytest.raises(ValueError, match="staleness_exponent must be a finite number >= 0"):
        WeightingConfig(staleness_exponent=-0.5)
