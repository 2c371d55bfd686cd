"""combine_window: the round's weights and rule then the server optimiser; with DP, the whole-update clip, the fixed
denominator K and Gaussian noise of the right size, really added; and the evidence record."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import torch
from torch import Tensor

from fednested.adapters.lora import adapter_key
from fednested.aggregation.aggregate import aggregate_expert_deltas
from fednested.aggregation.factored import aggregate_factored
from fednested.aggregation.factors import AdapterFactors
from fednested.aggregation.server_optimizers import ServerOptimizer
from fednested.aggregation.settings import RoundAggregationSettings
from fednested.aggregation.weights import UpdateFacts, bounded_expert_weights
from fednested.aggregation.window import WindowResult, combine_window
from fednested.deltas import DeltaKey, delta_key

UP = "model.layers.0.mlp.experts.gate_up_proj"
DOWN = "model.layers.0.mlp.experts.down_proj"
# (out, in) of each fused parameter's experts; small, the identities do not depend on size.
SIZES = {UP: (6, 4), DOWN: (4, 3)}


# FedAvg's plain weighted mean, spelled out: these tests check combine_window's arithmetic, not the library's robust
# defaults (a new federation's norm bound and FedAvgM, tested in test_round_aggregation_settings.py).
PLAIN = {"server_optimizer": "fedavg", "norm_bound_multiplier": None, "min_cosine": None}


def adapters(seed: int, experts: Mapping[str, Sequence[int]], *, factor: float = 1.0, sizes: Any = None) -> Any:
    sizes = sizes or SIZES
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for param, indexes in experts.items():
        out_features, in_features = sizes[param]
        for expert in indexes:
            out[adapter_key(param, expert, "lora_A")] = torch.randn(2, in_features, generator=generator) * factor
            out[adapter_key(param, expert, "lora_B")] = torch.randn(out_features, 2, generator=generator) * 0.5
    return out


def window(
    specs: Sequence[tuple[str, dict[str, Tensor]]], senders: Sequence[str] | None = None
) -> tuple[list[AdapterFactors], list[UpdateFacts[str]]]:
    """Sources (scale 1) and facts (routed tokens 10·(i+1) per expert, staleness i) for (update id, adapters)."""
    sources = [AdapterFactors(update_id, tensors, 1.0) for update_id, tensors in specs]
    facts = []
    for index, source in enumerate(sources):
        experts = frozenset(f"0.{int(key.rpartition('=')[2])}" for key in source.delta_keys())
        facts.append(
            UpdateFacts(
                update_id=source.update_id,
                experts=experts,
                staleness=index,
                examples=1,
                routed_tokens=dict.fromkeys(experts, 10 * (index + 1)),
                sender=senders[index] if senders else "",
            )
        )
    return sources, facts


def dense(source: AdapterFactors) -> dict[DeltaKey, Tensor]:
    return {key: source.read(key).dense_rows(0, source.read(key).out_features).double() for key in source.delta_keys()}


def run(
    sources: Sequence[AdapterFactors],
    facts: Sequence[UpdateFacts[str]],
    settings: RoundAggregationSettings,
    optimizer: ServerOptimizer | None = None,
    **kwargs: Any,
) -> tuple[dict[DeltaKey, Tensor], WindowResult]:
    emitted: dict[DeltaKey, Tensor] = {}

    def emit(key: DeltaKey, step: Tensor) -> None:
        assert key not in emitted, f"{key} emitted twice"
        emitted[key] = step

    optimizer = optimizer or ServerOptimizer(settings.server_optimizer)
    result = combine_window(sources, facts, settings, optimizer, emit, **kwargs)
    assert result.steps == len(emitted)
    return emitted, result


THREE = [
    ("u0", adapters(0, {UP: [0, 1], DOWN: [0]})),
    ("u1", adapters(1, {UP: [0], DOWN: [0, 1]})),
    ("u2", adapters(2, {UP: [0, 1], DOWN: [1]})),
]


def test_without_dp_fedavg_emits_the_rounds_weighted_mean() -> None:
    sources, facts = window(THREE)
    settings = RoundAggregationSettings.from_mapping(PLAIN)
    emitted, result = run(sources, facts, settings)
    weights = bounded_expert_weights(facts, settings.aggregation.weighting).weights
    expected = aggregate_expert_deltas([(dense(source), weights[i]) for i, source in enumerate(sources)])
    assert set(emitted) == set(expected) == {delta_key(UP, 0), delta_key(UP, 1), delta_key(DOWN, 0), delta_key(DOWN, 1)}
    for key, delta in expected.items():
        torch.testing.assert_close(emitted[key].double(), delta.double(), rtol=1e-5, atol=1e-6)
    assert result.record["privacy"] is None
    assert result.weights == {source.update_id: weights[i] for i, source in enumerate(sources)}
    assert result.record["server_optimizer"] == {
        "name": "fedavg",
        "learning_rate": 1.0,
        "momentum": 0.9,
        "beta2": 0.99,
        "tau": 0.001,
        "resumed": False,
        "note": None,
        "keys_with_state": 0,
    }


def test_the_server_optimizer_turns_each_aggregate_into_its_step() -> None:
    sources, facts = window(THREE)
    plain = RoundAggregationSettings.from_mapping(PLAIN)
    means, _ = run(sources, facts, plain)
    settings = RoundAggregationSettings.from_mapping(
        {"server_optimizer": "fedavgm", "server_learning_rate": 0.5, "server_momentum": 0.25}
    )
    optimizer = ServerOptimizer(settings.server_optimizer)
    first, result = run(sources, facts, settings, optimizer)
    for key, mean in means.items():
        torch.testing.assert_close(first[key], 0.5 * mean)
    assert result.record["server_optimizer"]["keys_with_state"] == 4
    # The next window carries only u1 (experts 0.0 and 0.1 of DOWN, 0.0 of UP): those keys step with momentum, and
    # UP expert 1, which nobody sent, is not stepped at all.
    only, only_facts = window(THREE[1:2])
    alone, _ = run(only, only_facts, plain)
    second, _ = run(only, only_facts, settings, optimizer)
    assert set(second) == {delta_key(UP, 0), delta_key(DOWN, 0), delta_key(DOWN, 1)}
    for key, mean in alone.items():
        torch.testing.assert_close(second[key], 0.5 * (0.25 * means[key] + mean))
    assert optimizer.steps[delta_key(UP, 1)] == 1


def test_the_rule_record_says_what_was_cut() -> None:
    specs = [(f"u{i}", adapters(i, {UP: [0], DOWN: [0]}, factor=1 + 3 * (i == 4))) for i in range(5)]
    sources, facts = window(specs)
    settings = RoundAggregationSettings.from_mapping(
        {"aggregation_method": "trimmed_mean", "trim_fraction": 0.2, "clip_norm": 2.0, "max_update_share": None}
    )
    _, result = run(sources, facts, settings)
    rule = result.record["rule"]
    assert (rule["method"], rule["clip_norm"], rule["trim_fraction"]) == ("trimmed_mean", 2.0, 0.2)
    assert rule["trimmed_per_end"] == {"1": 1}
    norms = result.report.experts["0.0"].norms
    clipped = {update_id for update_id, norm in norms.items() if norm > 2.0}
    assert clipped
    assert set(rule["scaled"]) == clipped
    for update_id in clipped:
        assert rule["scaled"][update_id]["by"] == {"clip_norm": 1}
        assert rule["scaled"][update_id]["min_factor"] == pytest.approx(2.0 / norms[update_id])


def dp_settings(z: float, clip: float, **extra: Any) -> RoundAggregationSettings:
    return RoundAggregationSettings.from_mapping({"dp": {"noise_multiplier": z, "clip_norm": clip}, **extra})


def whole_norm(source: AdapterFactors) -> float:
    return math.sqrt(sum(float(delta.square().sum()) for delta in dense(source).values()))


def clipped_sum_over_k(sources: Sequence[AdapterFactors], clip: float) -> dict[DeltaKey, Tensor]:
    """Σ_i min(1, C/‖Δ_i‖)·Δ_i / K per key, in float64, K = all updates (also for keys an update lacks)."""
    total: dict[DeltaKey, Tensor] = {}
    for source in sources:
        factor = min(1.0, clip / whole_norm(source))
        for key, delta in dense(source).items():
            total[key] = total.get(key, torch.zeros_like(delta)) + factor * delta
    return {key: value / len(sources) for key, value in total.items()}


def test_dp_with_tiny_noise_is_the_clipped_sum_over_k() -> None:
    sources, facts = window(THREE)
    clip = 0.8 * min(whole_norm(source) for source in sources[:2])
    emitted, result = run(sources, facts, dp_settings(1e-9, clip), generator=torch.Generator().manual_seed(0))
    expected = clipped_sum_over_k(sources, clip)
    assert set(emitted) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(emitted[key].double(), value, rtol=1e-5, atol=1e-6)
    assert result.weights["u1"] == {"0.0": pytest.approx(1 / 3), "0.1": pytest.approx(1 / 3)}
    privacy = result.record["privacy"]
    assert privacy["contributors"] == 3
    assert privacy["weights"] == "uniform"
    assert privacy["clipped"] == {
        source.update_id: pytest.approx(clip / whole_norm(source)) for source in sources if whole_norm(source) > clip
    }
    assert privacy["noise_std"] == pytest.approx(1e-9 * clip / 3)
    assert result.record["rule"]["update_scale"].keys() == privacy["clipped"].keys()


BIG = {UP: (64, 48), DOWN: (48, 64)}


def test_dp_noise_is_really_added_with_the_right_std() -> None:
    specs = [(f"u{i}", adapters(i, {UP: [0], DOWN: [0]}, sizes=BIG)) for i in range(4)]
    sources, facts = window(specs)
    z, clip = 2.0, 1.0
    emitted, result = run(sources, facts, dp_settings(z, clip), generator=torch.Generator().manual_seed(1))
    noiseless = clipped_sum_over_k(sources, clip)
    noise = torch.cat([(emitted[key].double() - noiseless[key]).flatten() for key in noiseless])
    assert noise.numel() == 2 * 64 * 48
    expected_std = z * clip / 4
    assert float(noise.std()) == pytest.approx(expected_std, rel=0.05)
    assert abs(float(noise.mean())) < 0.05 * expected_std
    privacy = result.record["privacy"]
    assert privacy["noise_std"] == expected_std
    assert privacy["noise_rms_drawn"] == pytest.approx(float(noise.square().mean().sqrt()), rel=1e-4)
    assert (privacy["noised_keys"], privacy["noised_coordinates"]) == (2, 2 * 64 * 48)
    # The signal is far below the noise here: the noised aggregate is not the noiseless one.
    assert float((emitted[delta_key(UP, 0)].double() - noiseless[delta_key(UP, 0)]).abs().max()) > expected_std


def test_an_update_scaled_100_times_moves_the_dp_aggregate_by_at_most_c_over_k() -> None:
    honest = [(f"h{i}", adapters(i, {UP: [0], DOWN: [0]})) for i in range(3)]
    attacker = {name: tensor * (100 if name.endswith("/lora_A") else 1) for name, tensor in honest[0][1].items()}
    silent = {name: torch.zeros_like(tensor) for name, tensor in attacker.items()}
    clip = 1.5 * max(whole_norm(AdapterFactors(uid, tensors, 1.0)) for uid, tensors in honest)
    settings = dp_settings(1.0, clip)
    attacked_sources, attacked_facts = window([*honest, ("evil", attacker)])
    quiet_sources, quiet_facts = window([*honest, ("evil", silent)])
    # The same generator seed draws the same noise for the same keys, so the difference is the attacker's share.
    attacked, result = run(attacked_sources, attacked_facts, settings, generator=torch.Generator().manual_seed(7))
    quiet, _ = run(quiet_sources, quiet_facts, settings, generator=torch.Generator().manual_seed(7))
    shift = math.sqrt(sum(float((attacked[key] - quiet[key]).double().square().sum()) for key in attacked))
    assert shift == pytest.approx(clip / 4, rel=1e-4)
    assert set(result.record["privacy"]["clipped"]) == {"evil"}
    # Without DP the plain mean moves by a quarter of the attacker's norm, about 100 honest updates' worth.
    plain = RoundAggregationSettings.from_mapping(PLAIN | {"max_update_share": None, "weight_by_routed_tokens": False})
    plain_attacked, _ = run(attacked_sources, attacked_facts, plain)
    plain_quiet, _ = run(quiet_sources, quiet_facts, plain)
    plain_shift = math.sqrt(
        sum(float((plain_attacked[key] - plain_quiet[key]).double().square().sum()) for key in plain_attacked)
    )
    assert plain_shift > 10 * shift


def test_dp_noises_every_model_key_when_given_the_shapes() -> None:
    sources, facts = window(THREE)
    shapes = {delta_key(param, expert): SIZES[param] for param in (UP, DOWN) for expert in range(3)}
    emitted, result = run(
        sources, facts, dp_settings(1.0, 1.0), generator=torch.Generator().manual_seed(3), key_shapes=shapes
    )
    assert set(emitted) == set(shapes)
    untouched = emitted[delta_key(UP, 2)]
    assert untouched.shape == (6, 4)
    assert float(untouched.abs().sum()) > 0
    privacy = result.record["privacy"]
    assert (privacy["untouched_keys_noised"], privacy["noised_all_model_keys"], privacy["noised_keys"]) == (2, True, 6)
    with pytest.raises(ValueError, match=r"is not one of the model's expert deltas"):
        run(sources, facts, dp_settings(1.0, 1.0), key_shapes={delta_key(UP, 0): (6, 4)})
    with pytest.raises(ValueError, match=r"has shape \[6, 4\], the model's is \[4, 6\]"):
        run(sources, facts, dp_settings(1.0, 1.0), key_shapes={**shapes, delta_key(UP, 0): (4, 6)})


def test_dp_clips_a_device_with_several_updates_to_c_in_total() -> None:
    sources, facts = window(THREE, senders=["car-1", "car-1", "car-2"])
    clip = 0.1 * min(whole_norm(source) for source in sources)
    _, result = run(sources, facts, dp_settings(1e-9, clip), generator=torch.Generator().manual_seed(0))
    clipped = result.record["privacy"]["clipped"]
    assert clipped["u0"] == pytest.approx(clip / 2 / whole_norm(sources[0]))
    assert clipped["u1"] == pytest.approx(clip / 2 / whole_norm(sources[1]))
    assert clipped["u2"] == pytest.approx(clip / whole_norm(sources[2]))
    assert result.record["privacy"]["senders_with_several_updates"] == {"car-1": 2}


def test_given_norms_are_used_and_match_the_computed_ones() -> None:
    sources, facts = window(THREE)
    settings = dp_settings(0.5, 1.0)
    computed, _ = run(sources, facts, settings, generator=torch.Generator().manual_seed(5))
    norms = {source.update_id: whole_norm(source) for source in sources}
    given, _ = run(sources, facts, settings, generator=torch.Generator().manual_seed(5), update_norms=norms)
    for key, value in computed.items():
        torch.testing.assert_close(given[key], value)
    with pytest.raises(ValueError, match="update u2: its whole-update norm must be finite and >= 0, got None"):
        run(sources, facts, settings, update_norms={"u0": 1.0, "u1": 1.0})


def test_without_a_generator_the_noise_is_unpredictable() -> None:
    sources, facts = window(THREE)
    first, _ = run(sources, facts, dp_settings(1.0, 1.0))
    second, _ = run(sources, facts, dp_settings(1.0, 1.0))
    assert not torch.equal(first[delta_key(UP, 0)], second[delta_key(UP, 0)])


def test_misaligned_inputs_and_another_optimizer_are_refused() -> None:
    sources, facts = window(THREE)
    settings = RoundAggregationSettings.from_mapping(PLAIN)
    with pytest.raises(ValueError, match="misaligned: update u0 next to u1"):
        run(sources, [facts[1], facts[0], facts[2]], settings)
    with pytest.raises(ValueError, match="3 updates but 2 update facts"):
        run(sources, facts[:2], settings)
    other = RoundAggregationSettings.from_mapping({"server_optimizer": "fedadam"})
    with pytest.raises(ValueError, match="resume it from the settings"):
        run(sources, facts, settings, ServerOptimizer(other.server_optimizer))


def test_update_scale_multiplies_each_updates_delta_and_is_reported() -> None:
    sources, facts = window(THREE)
    settings = RoundAggregationSettings.from_mapping(PLAIN)
    weights = bounded_expert_weights(facts, settings.aggregation.weighting).weights
    halved = [
        AdapterFactors("u0", {k: v * 0.5 if k.endswith("/lora_A") else v for k, v in THREE[0][1].items()}, 1.0),
        *sources[1:],
    ]
    scaled: dict[DeltaKey, Tensor] = {}
    report = aggregate_factored(sources, weights, settings.aggregation, scaled.__setitem__, update_scale={"u0": 0.5})
    expected: dict[DeltaKey, Tensor] = {}
    plain = aggregate_factored(halved, weights, settings.aggregation, expected.__setitem__)
    for key, value in expected.items():
        torch.testing.assert_close(scaled[key], value)
    assert report.to_dict()["update_scale"] == {"u0": {"by": "dp_clip", "factor": 0.5}}
    assert "update_scale" not in plain.to_dict()
    with pytest.raises(ValueError, match=r"update u1: update_scale must be in \(0, 1\], got 1.5"):
        aggregate_factored(sources, weights, settings.aggregation, scaled.__setitem__, update_scale={"u1": 1.5})
    with pytest.raises(ValueError, match="update_scale names update u9, which is not being aggregated"):
        aggregate_factored(sources, weights, settings.aggregation, scaled.__setitem__, update_scale={"u9": 0.5})
