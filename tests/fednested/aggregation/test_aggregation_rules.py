"""Exact numerical identities of the stack-level aggregation rules."""

from __future__ import annotations

import math

import pytest
import torch

from fednested.aggregation.rules import (
    clip_factor,
    joint_norm,
    weighted_coordinate_median,
    weighted_mean,
    weighted_trimmed_mean,
)


def test_weighted_mean_matches_manual_sum() -> None:
    stack = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, -4.0]])
    weights = torch.tensor([1.0, 2.0, 1.0])
    expected = (1 * stack[0] + 2 * stack[1] + 1 * stack[2]) / 4
    assert torch.equal(weighted_mean(stack, weights), expected)


def test_weighted_mean_does_not_need_normalised_weights() -> None:
    stack = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0))
    weights = torch.tensor([0.5, 1.5, 3.0, 1.0])
    torch.testing.assert_close(weighted_mean(stack, weights), weighted_mean(stack, weights * 7))


def test_trimmed_mean_removes_an_outlier() -> None:
    honest = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    stack = torch.cat([honest, torch.tensor([[1000.0]])])
    weights = torch.ones(5)
    # β = 0.2 of 5 trims one value per side: 1 and 1000 go, the mean of 2, 3, 4 stays.
    assert weighted_trimmed_mean(stack, weights, 0.2).item() == 3.0
    assert weighted_mean(stack, weights).item() == 202.0


def test_trimmed_mean_trims_per_coordinate_and_keeps_weights_of_survivors() -> None:
    stack = torch.tensor([[0.0, 9.0], [1.0, 1.0], [2.0, 2.0], [9.0, 0.0]])
    weights = torch.tensor([1.0, 1.0, 3.0, 1.0])
    # Each column keeps its two middle values (1 and 2) with their own weights 1 and 3.
    expected = torch.tensor([(1 * 1 + 3 * 2) / 4, (1 * 1 + 3 * 2) / 4])
    assert torch.equal(weighted_trimmed_mean(stack, weights, 0.25), expected)


def test_trimmed_mean_with_nothing_to_trim_is_the_weighted_mean() -> None:
    stack = torch.tensor([[1.0], [5.0]])
    weights = torch.tensor([1.0, 3.0])
    assert torch.equal(weighted_trimmed_mean(stack, weights, 0.2), weighted_mean(stack, weights))


def test_trimmed_mean_rejects_fraction_that_trims_everything() -> None:
    with pytest.raises(ValueError, match=r"trim_fraction must lie in \[0, 0.5\)"):
        weighted_trimmed_mean(torch.ones(4, 2), torch.ones(4), 0.5)


def test_median_equals_torch_median_for_odd_count_and_equal_weights() -> None:
    stack = torch.randn(7, 4, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(weighted_coordinate_median(stack, torch.ones(7)), stack.median(dim=0).values)


def test_median_averages_the_two_middle_values_for_even_count() -> None:
    stack = torch.tensor([[1.0], [2.0], [4.0], [100.0]])
    assert weighted_coordinate_median(stack, torch.ones(4)).item() == 3.0
    # 1/6 each: the cumulative weight reaches one half only up to rounding; still the middle pair is averaged.
    six = torch.tensor([[1.0], [2.0], [3.0], [5.0], [8.0], [13.0]])
    assert weighted_coordinate_median(six, torch.full((6,), 1 / 6)).item() == 4.0


def test_median_is_robust_to_a_minority_of_arbitrary_values() -> None:
    honest = torch.full((3, 2, 2), 0.5)
    attackers = torch.full((2, 2, 2), 1e6)
    result = weighted_coordinate_median(torch.cat([honest, attackers]), torch.ones(5))
    assert torch.equal(result, torch.full((2, 2), 0.5))


def test_median_follows_weight_not_count() -> None:
    stack = torch.tensor([[1.0], [2.0], [10.0]])
    # The third update carries 80 % of the weight, so the weighted median is its value.
    assert weighted_coordinate_median(stack, torch.tensor([0.1, 0.1, 0.8])).item() == 10.0


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (torch.tensor([1.0, 0.0]), "weights must be finite and > 0"),
        (torch.tensor([1.0, float("nan")]), "weights must be finite and > 0"),
        (torch.tensor([1.0]), r"weights must have shape \(2,\)"),
    ],
)
def test_rules_reject_bad_weights(weights: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        weighted_mean(torch.ones(2, 3), weights)


def test_rules_reject_an_empty_stack() -> None:
    with pytest.raises(ValueError, match="need at least one delta"):
        weighted_coordinate_median(torch.ones(0, 3), torch.ones(0))


def test_clip_factor_caps_the_joint_norm() -> None:
    tensors = [torch.tensor([[3.0]]), torch.tensor([4.0, 0.0])]
    assert joint_norm(tensors) == 5.0
    factor = clip_factor(tensors, 2.0)
    assert factor == pytest.approx(0.4)
    assert joint_norm([factor * tensor for tensor in tensors]) == pytest.approx(2.0)
    assert clip_factor(tensors, 5.0) == 1.0
    assert clip_factor(tensors, 10.0) == 1.0


def test_clip_factor_rejects_non_positive_bound() -> None:
    with pytest.raises(ValueError, match="max_norm must be a finite number > 0"):
        clip_factor([torch.ones(2)], 0.0)
    with pytest.raises(ValueError, match="max_norm"):
        clip_factor([torch.ones(2)], math.inf)
