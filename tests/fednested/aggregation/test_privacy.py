"""DP configuration, ε from the RDP accountant, the budget refusal, calibration of z, and the noise generator."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fednested.aggregation.privacy import (
    PrivacyBudgetExceeded,
    PrivacyConfig,
    PrivacyConfigError,
    check_budget,
    epsilon_for,
    noise_multiplier_for,
    secure_generator,
)


def test_a_full_config_is_read_and_written_back() -> None:
    raw = {"noise_multiplier": 1.1, "clip_norm": 2, "delta": 1e-6, "epsilon_budget": 8, "planned_aggregations": 5}
    config = PrivacyConfig.from_mapping(raw)
    assert config == PrivacyConfig(1.1, 2.0, 1e-6, 8.0, 5)
    assert PrivacyConfig.from_mapping(config.to_dict()) == config
    defaults = PrivacyConfig.from_mapping({"noise_multiplier": 1, "clip_norm": 1, "epsilon_budget": None})
    assert (defaults.delta, defaults.epsilon_budget, defaults.planned_aggregations) == (1e-5, None, 1)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"clip_norm": 1.0}, r"'noise_multiplier' is required: a number > 0"),
        ({"noise_multiplier": 1.0}, r"'clip_norm' is required: a number > 0"),
        ({"noise_multiplier": 0, "clip_norm": 1.0}, r"'noise_multiplier' must be a number > 0 .*, got 0.0"),
        ({"noise_multiplier": -1.0, "clip_norm": 1.0}, r"'noise_multiplier' must be a number > 0 .*, got -1.0"),
        ({"noise_multiplier": 1.0, "clip_norm": 0}, r"'clip_norm' must be a number > 0 .*, got 0.0"),
        ({"noise_multiplier": 1.0, "clip_norm": -2}, r"'clip_norm' must be a number > 0 .*, got -2.0"),
        ({"noise_multiplier": True, "clip_norm": 1.0}, r"'noise_multiplier' must be a number > 0 .*, got True"),
        ({"noise_multiplier": 1.0, "clip_norm": float("nan")}, r"'clip_norm' must be a number > 0 .*, got nan"),
        ({"noise_multiplier": float("inf"), "clip_norm": 1.0}, r"'noise_multiplier' must be .*, got inf"),
        ({"noise_multiplier": "1", "clip_norm": 1.0}, r"'noise_multiplier' must be .*, got '1'"),
        ({"noise_multiplier": None, "clip_norm": 1.0}, r"'noise_multiplier' must be .*, got None"),
        ({"noise_multiplier": 1e7, "clip_norm": 1.0}, r"'noise_multiplier' must be .*, got 10000000.0"),
        ({"noise_multiplier": 1, "clip_norm": 1, "delta": 1}, r"'delta' must be a number in \(0, 1\)"),
        ({"noise_multiplier": 1, "clip_norm": 1, "delta": 0}, r"'delta' must be a number in \(0, 1\)"),
        ({"noise_multiplier": 1, "clip_norm": 1, "epsilon_budget": 0}, "'epsilon_budget' must be a number > 0"),
        ({"noise_multiplier": 1, "clip_norm": 1, "planned_aggregations": 0}, "'planned_aggregations' must be an"),
        ({"noise_multiplier": 1, "clip_norm": 1, "planned_aggregations": 2.5}, "'planned_aggregations' must be an"),
        (
            {"noise_multiplier": 1, "clip_norm": 1, "sigma": 2, "eps": 1},
            r"unknown keys \['eps', 'sigma'\]; known keys are \['clip_norm', 'delta', 'epsilon_budget'",
        ),
        ([1.0, 1.0], "must be an object with noise_multiplier and clip_norm, got"),
        (True, "must be an object with noise_multiplier and clip_norm, got True"),
    ],
)
def test_bad_configs_are_named(raw: Any, message: str) -> None:
    with pytest.raises(PrivacyConfigError, match=message) as caught:
        PrivacyConfig.from_mapping(raw, where="round 'r1' config: 'dp'")
    assert str(caught.value).startswith("round 'r1' config: 'dp'")


def test_epsilon_of_nothing_is_zero() -> None:
    assert epsilon_for([], 1e-5) == 0.0


def test_epsilon_has_the_known_magnitude_and_is_monotone() -> None:
    one = epsilon_for([1.0], 1e-5)
    # One Gaussian mechanism at z = 1: the classical analysis says ε ≈ √(2 ln(1.25/δ)) ≈ 4.8; RDP gives ≈ 4.73.
    assert 3 < one < 6
    rounds = [epsilon_for([1.0] * n, 1e-5) for n in (1, 2, 5, 10)]
    assert rounds == sorted(rounds)
    assert len(set(rounds)) == 4
    noises = [epsilon_for([z] * 10, 1e-5) for z in (0.8, 1.0, 2.0, 4.0)]
    assert noises == sorted(noises, reverse=True)
    assert len(set(noises)) == 4
    # A smaller δ costs more ε.
    assert epsilon_for([1.0], 1e-7) > one


def test_heterogeneous_histories_compose_in_any_order() -> None:
    mixed = epsilon_for([1.0, 2.0, 1.0, 4.0], 1e-5)
    assert mixed == pytest.approx(epsilon_for([4.0, 1.0, 1.0, 2.0], 1e-5))
    assert epsilon_for([2.0] * 4, 1e-5) < mixed < epsilon_for([1.0] * 4, 1e-5)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_epsilon_refuses_impossible_noise(bad: float) -> None:
    with pytest.raises(ValueError, match="noise multiplier #1 must be a finite number > 0"):
        epsilon_for([1.0, bad], 1e-5)


def test_budget_within_returns_epsilon_and_none_never_refuses() -> None:
    config = PrivacyConfig(noise_multiplier=1.1, clip_norm=1.0, epsilon_budget=100.0)
    assert check_budget([1.1] * 3, config, planned=2) == pytest.approx(epsilon_for([1.1] * 5, 1e-5))
    unlimited = PrivacyConfig(noise_multiplier=0.5, clip_norm=1.0)
    assert check_budget([0.5] * 50, unlimited) > 100


def test_budget_refusal_says_by_how_much() -> None:
    config = PrivacyConfig(noise_multiplier=1.1, clip_norm=1.0, epsilon_budget=4.0)
    expected = epsilon_for([1.1] * 12, 1e-5)
    with pytest.raises(PrivacyBudgetExceeded) as caught:
        check_budget([1.1] * 10, config, planned=2)
    error = caught.value
    assert error.epsilon_after == pytest.approx(expected)
    assert (error.budget, error.planned) == (4.0, 2)
    assert error.excess == pytest.approx(expected - 4.0)
    assert str(error) == (
        f"ε would reach {expected:.3g} (δ=1e-05) after 12 noised aggregations (10 done + 2 planned) at noise "
        f"multiplier 1.1; the budget is 4, exceeded by {expected - 4.0:.3g}"
    )


@pytest.mark.parametrize("planned", [0, -1, True])
def test_budget_needs_a_planned_aggregation(planned: int) -> None:
    with pytest.raises(ValueError, match="planned must be an integer >= 1"):
        check_budget([], PrivacyConfig(noise_multiplier=1.0, clip_norm=1.0), planned=planned)


@pytest.mark.parametrize("epsilon", [1.0, 4.0, 8.0])
def test_noise_multiplier_for_reaches_the_requested_epsilon(epsilon: float) -> None:
    z = noise_multiplier_for(epsilon, 1e-5, 10)
    reached = epsilon_for([z] * 10, 1e-5)
    assert reached <= epsilon
    assert reached == pytest.approx(epsilon, rel=1e-3)
    # A little less noise would overshoot: z is the smallest that fits.
    assert epsilon_for([z * 0.99] * 10, 1e-5) > epsilon


def test_noise_multiplier_for_is_monotone_and_checks_its_arguments() -> None:
    assert (
        noise_multiplier_for(1.0, 1e-5, 10) > noise_multiplier_for(4.0, 1e-5, 10) > noise_multiplier_for(8.0, 1e-5, 10)
    )
    assert noise_multiplier_for(4.0, 1e-5, 20) > noise_multiplier_for(4.0, 1e-5, 10)
    for bad in ({"epsilon": 0.0}, {"delta": 1.0}, {"aggregations": 0}):
        arguments: dict[str, Any] = {"epsilon": 1.0, "delta": 1e-5, "aggregations": 1, **bad}
        with pytest.raises(ValueError, match="must be"):
            noise_multiplier_for(**arguments)


def test_secure_generators_are_seeded_unpredictably() -> None:
    first, second = secure_generator(), secure_generator()
    assert first.initial_seed() != second.initial_seed()
    assert not torch.equal(torch.randn(8, generator=first), torch.randn(8, generator=second))
