"""aggregate_expert_deltas on dense products: exact identities, robustness, clipping, and the merge with η."""

from __future__ import annotations

import pytest
import torch

from fednested.adapters.lora import ExpertLoraConfig, adapter_key
from fednested.aggregation.aggregate import (
    AggregationConfig,
    aggregate_expert_deltas,
    clip_update_per_expert,
    expert_of_delta,
    experts_of,
)
from fednested.aggregation.rules import joint_norm
from fednested.aggregation.weights import UpdateFacts, WeightingConfig, expert_weights
from fednested.deltas import delta_key, expert_deltas_from_adapters, expert_param_shapes, merge_expert_deltas
from fednested.models.presets import build_model

UP = "model.layers.0.mlp.experts.gate_up_proj"
DOWN = "model.layers.0.mlp.experts.down_proj"
UP1 = "model.layers.1.mlp.experts.gate_up_proj"
# [num_experts, out, in]: small on purpose; the identities do not depend on size.
SHAPES = {UP: (3, 6, 4), DOWN: (3, 4, 3), UP1: (3, 6, 4)}
CONFIG = ExpertLoraConfig(rank=2, alpha=4)


def random_adapters(seed: int, experts: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    adapters = {}
    for param, indexes in experts.items():
        _, out_features, in_features = SHAPES[param]
        for expert in indexes:
            adapters[adapter_key(param, expert, "lora_A")] = torch.randn(CONFIG.rank, in_features, generator=generator)
            adapters[adapter_key(param, expert, "lora_B")] = torch.randn(out_features, CONFIG.rank, generator=generator)
    return adapters


def test_expert_of_delta_uses_the_envelope_naming() -> None:
    assert expert_of_delta(delta_key(UP1, 2)) == "1.2"
    assert experts_of({delta_key(UP, 0): torch.zeros(1), delta_key(DOWN, 0): torch.zeros(1)}) == {"0.0"}


def test_weighted_mean_of_products_equals_manual_computation() -> None:
    clients = [random_adapters(seed, {UP: [0, 1], DOWN: [0, 1]}) for seed in range(3)]
    deltas = [expert_deltas_from_adapters(adapters, CONFIG, SHAPES) for adapters in clients]
    weights = [{"0.0": 1.0, "0.1": 3.0}, {"0.0": 2.0, "0.1": 1.0}, {"0.0": 1.0, "0.1": 0.0}]
    result = aggregate_expert_deltas(list(zip(deltas, weights, strict=True)))
    a, b = adapter_key(UP, 1, "lora_A"), adapter_key(UP, 1, "lora_B")
    # Expert 1: client 2 has weight 0, so the mean is (3·ΔW_0 + 1·ΔW_1) / 4 with ΔW = scale·B·A.
    manual = (3 * CONFIG.scale * clients[0][b] @ clients[0][a] + 1 * CONFIG.scale * clients[1][b] @ clients[1][a]) / 4
    torch.testing.assert_close(result[delta_key(UP, 1)], manual, rtol=1e-6, atol=1e-6)
    assert set(result) == {delta_key(p, e) for p in (UP, DOWN) for e in (0, 1)}


def test_averaging_factors_is_not_averaging_products() -> None:
    clients = [random_adapters(seed, {DOWN: [2]}) for seed in (10, 11)]
    deltas = [expert_deltas_from_adapters(adapters, CONFIG, SHAPES) for adapters in clients]
    result = aggregate_expert_deltas([(d, {"0.2": 1.0}) for d in deltas])[delta_key(DOWN, 2)]
    a, b = adapter_key(DOWN, 2, "lora_A"), adapter_key(DOWN, 2, "lora_B")
    mean_of_products = sum(CONFIG.scale * c[b] @ c[a] for c in clients) / 2
    product_of_means = CONFIG.scale * ((clients[0][b] + clients[1][b]) / 2) @ ((clients[0][a] + clients[1][a]) / 2)
    torch.testing.assert_close(result, mean_of_products)
    # The cross terms B_0·A_1 + B_1·A_0 make the two differ by far more than rounding.
    assert (result - product_of_means).abs().max() > 0.1


def test_trimmed_mean_removes_an_outlier_update_exactly() -> None:
    honest = expert_deltas_from_adapters(random_adapters(1, {UP: [0]}), CONFIG, SHAPES)
    attacker = {key: 1000 * delta for key, delta in honest.items()}
    updates = [(honest, {"0.0": 1.0})] * 4 + [(attacker, {"0.0": 1.0})]
    trimmed = aggregate_expert_deltas(updates, method="trimmed_mean", trim_fraction=0.2)
    # Per coordinate the attacker is an extreme (same sign, 1000× larger) and one honest copy is the other one;
    # what stays is the mean of three honest copies, equal up to the rounding of (x + x + x) / 3.
    torch.testing.assert_close(trimmed[delta_key(UP, 0)], honest[delta_key(UP, 0)], rtol=1e-6, atol=0.0)
    plain = aggregate_expert_deltas(updates)
    assert not torch.allclose(plain[delta_key(UP, 0)], honest[delta_key(UP, 0)])


def test_coordinate_median_is_robust_to_a_minority_of_attackers() -> None:
    honest = expert_deltas_from_adapters(random_adapters(2, {DOWN: [1]}), CONFIG, SHAPES)
    attackers = [{key: torch.full_like(delta, sign * 1e6) for key, delta in honest.items()} for sign in (1, -1)]
    updates = [(honest, {"0.1": 1.0})] * 3 + [(attack, {"0.1": 1.0}) for attack in attackers]
    median = aggregate_expert_deltas(updates, method="coordinate_median")
    assert torch.equal(median[delta_key(DOWN, 1)], honest[delta_key(DOWN, 1)])


def test_clipping_caps_each_updates_norm_per_expert() -> None:
    big = expert_deltas_from_adapters(random_adapters(3, {UP: [0, 1], DOWN: [0]}), CONFIG, SHAPES)
    expert0 = [big[delta_key(UP, 0)], big[delta_key(DOWN, 0)]]
    assert joint_norm(expert0) > 1.0
    clipped = clip_update_per_expert(big, 1.0)
    assert joint_norm([clipped[delta_key(UP, 0)], clipped[delta_key(DOWN, 0)]]) == pytest.approx(1.0)
    assert joint_norm([clipped[delta_key(UP, 1)]]) == pytest.approx(1.0)
    # Clipping scales an expert's matrices together, so the direction is kept.
    ratio = clipped[delta_key(UP, 0)] / big[delta_key(UP, 0)]
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio.flatten()[0].item()))
    aggregated = aggregate_expert_deltas([(big, {"0.0": 1.0, "0.1": 1.0})], clip_norm=1.0)
    assert joint_norm([aggregated[delta_key(UP, 0)], aggregated[delta_key(DOWN, 0)]]) == pytest.approx(1.0)
    small = {key: delta * 1e-3 for key, delta in big.items()}
    assert clip_update_per_expert(small, 1.0) == small


def test_zero_routed_tokens_means_no_contribution_to_that_expert() -> None:
    first = expert_deltas_from_adapters(random_adapters(4, {UP: [0, 1]}), CONFIG, SHAPES)
    second = expert_deltas_from_adapters(random_adapters(5, {UP: [0, 1]}), CONFIG, SHAPES)
    facts = [
        UpdateFacts("first", experts_of(first), staleness=0, examples=5, routed_tokens={"0.0": 10, "0.1": 10}),
        UpdateFacts("second", experts_of(second), staleness=0, examples=5, routed_tokens={"0.0": 30}),
    ]
    weights = expert_weights(facts, WeightingConfig(max_update_share=None))
    assert weights[1]["0.1"] == 0.0
    result = aggregate_expert_deltas([(first, weights[0]), (second, weights[1])])
    assert torch.equal(result[delta_key(UP, 1)], first[delta_key(UP, 1)])
    manual = (10 * first[delta_key(UP, 0)] + 30 * second[delta_key(UP, 0)]) / 40
    torch.testing.assert_close(result[delta_key(UP, 0)], manual)
    # The default share cap (1/2) leaves two contributors equal shares; zero tokens still mean no contribution.
    capped = expert_weights(facts, WeightingConfig())
    assert capped[1]["0.1"] == 0.0
    result = aggregate_expert_deltas([(first, capped[0]), (second, capped[1])])
    assert torch.equal(result[delta_key(UP, 1)], first[delta_key(UP, 1)])
    torch.testing.assert_close(result[delta_key(UP, 0)], (first[delta_key(UP, 0)] + second[delta_key(UP, 0)]) / 2)


def test_expert_nobody_trained_is_left_out() -> None:
    deltas = expert_deltas_from_adapters(random_adapters(6, {UP: [0, 2]}), CONFIG, SHAPES)
    result = aggregate_expert_deltas([(deltas, {"0.0": 1.0, "0.2": 0.0})])
    assert set(result) == {delta_key(UP, 0)}


def test_missing_weight_for_a_carried_expert_is_an_error() -> None:
    deltas = expert_deltas_from_adapters(random_adapters(7, {UP1: [1]}), CONFIG, SHAPES)
    with pytest.raises(ValueError, match=r"update #0 carries delta .*expert=1' but no weight for expert 1.1"):
        aggregate_expert_deltas([(deltas, {"0.1": 1.0})])


def test_shapes_must_agree_across_updates() -> None:
    first = {delta_key(UP, 0): torch.zeros(6, 4)}
    second = {delta_key(UP, 0): torch.zeros(4, 6)}
    with pytest.raises(ValueError, match="different shapes across updates"):
        aggregate_expert_deltas([(first, {"0.0": 1.0}), (second, {"0.0": 1.0})])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "krum"}, "unknown aggregation method 'krum'"),
        ({"clip_norm": -1.0}, "clip_norm must be None or a finite number > 0"),
        ({"method": "trimmed_mean", "trim_fraction": 0.6}, r"trim_fraction must lie in \[0, 0.5\)"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        aggregate_expert_deltas([({delta_key(UP, 0): torch.zeros(6, 4)}, {"0.0": 1.0})], **kwargs)  # type: ignore[arg-type]


def test_negative_weight_is_refused() -> None:
    with pytest.raises(ValueError, match=r"update #0: weight for expert 0\.0 must be finite and >= 0"):
        aggregate_expert_deltas([({delta_key(UP, 0): torch.zeros(6, 4)}, {"0.0": -1.0})])


def test_aggregation_config_checks_its_fields() -> None:
    for hostile in (float("inf"), 1e308, 0.0, -1.0):
        with pytest.raises(ValueError, match=r"server_learning_rate must be in \(0, 100\]"):
            AggregationConfig(server_learning_rate=hostile)
    with pytest.raises(ValueError, match="unknown aggregation method"):
        AggregationConfig(method="mean")  # type: ignore[arg-type]


def test_buffer_to_merge_on_a_tiny_model_applies_eta_times_the_weighted_mean() -> None:
    model = build_model("tiny")
    shapes = expert_param_shapes(model)
    config = ExpertLoraConfig(rank=4, alpha=8)
    param = "model.layers.1.mlp.experts.down_proj"
    generator = torch.Generator().manual_seed(0)
    _, out_features, in_features = shapes[param]
    clients = [
        {
            adapter_key(param, 2, "lora_A"): torch.randn(4, in_features, generator=generator) * 0.1,
            adapter_key(param, 2, "lora_B"): torch.randn(out_features, 4, generator=generator) * 0.1,
        }
        for _ in range(2)
    ]
    deltas = [expert_deltas_from_adapters(adapters, config, model) for adapters in clients]
    facts = [
        UpdateFacts("fresh", experts_of(deltas[0]), staleness=0, examples=8, routed_tokens={"1.2": 100}),
        UpdateFacts("stale", experts_of(deltas[1]), staleness=3, examples=8, routed_tokens={"1.2": 100}),
    ]
    weights = expert_weights(facts, WeightingConfig(staleness_exponent=0.5))
    # Staleness 3 with a = 0.5 halves the weight: 100·1 vs 100·0.5 → 2/3 and 1/3.
    assert weights[0]["1.2"] == pytest.approx(2 / 3)
    aggregated = aggregate_expert_deltas(list(zip(deltas, weights, strict=True)))
    before = dict(model.named_parameters())[param].detach().clone()
    eta = 0.5
    merge_expert_deltas(model, aggregated, eta=eta)
    after = dict(model.named_parameters())[param].detach()
    key = delta_key(param, 2)
    expected = before[2] + eta * (2 / 3 * deltas[0][key] + 1 / 3 * deltas[1][key])
    torch.testing.assert_close(after[2], expected, rtol=1e-5, atol=1e-6)
    # Only expert 2 of that layer moved.
    assert torch.equal(after[[0, 1, 3]], before[[0, 1, 3]])
