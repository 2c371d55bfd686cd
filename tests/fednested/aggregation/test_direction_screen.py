"""The direction screen of aggregate_factored (`min_cosine`): inner products from factors equal the dense ones, the
leave-one-out cosines are the dense cosines, a sign-flipped copy of an honest update is cut per expert or as a whole
update, honest non-IID updates are kept, and a null threshold changes nothing."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch import Tensor

from fednested.adapters.lora import adapter_key
from fednested.aggregation.aggregate import AggregationConfig
from fednested.aggregation.factored import AggregationReport, aggregate_factored, inner_products
from fednested.aggregation.factors import AdapterFactors, FactorSource, LoraFactors
from fednested.aggregation.server_optimizers import ServerOptimizer
from fednested.aggregation.settings import RoundAggregationSettings, RoundSettingsError
from fednested.aggregation.weights import UpdateFacts
from fednested.aggregation.window import combine_window
from fednested.deltas import DeltaKey, ExpertDeltas, delta_key

UP = "model.layers.0.mlp.experts.gate_up_proj"
DOWN = "model.layers.0.mlp.experts.down_proj"
# [out, in] of each parameter's experts; small, the identities do not depend on size.
SIZES = {UP: (12, 10), DOWN: (10, 6)}
EXPERTS = {"0.0": 0, "0.1": 1}


def run(
    sources: Sequence[FactorSource], weights: Sequence[dict[str, float]], config: AggregationConfig
) -> tuple[ExpertDeltas, AggregationReport]:
    emitted: ExpertDeltas = {}

    def emit(key: DeltaKey, delta: Tensor) -> None:
        assert key not in emitted, f"{key} emitted twice"
        emitted[key] = delta

    return emitted, aggregate_factored(sources, weights, config, emit)


def adapters_for(directions: dict[str, Tensor], generator: torch.Generator, rank: int = 3) -> dict[str, Tensor]:
    """Adapters whose B·A is `direction` of each parameter (expert 0 and 1) plus a small own term."""
    adapters: dict[str, Tensor] = {}
    for param, (out_features, in_features) in SIZES.items():
        for expert in EXPERTS.values():
            a = torch.randn(rank, in_features, generator=generator)
            b = torch.randn(out_features, rank, generator=generator)
            # Fold the direction into the factors exactly: [B | D] · [A; I] = B·A + D (rank grows by in_features).
            direction = directions[f"{param}/{expert}"]
            adapters[adapter_key(param, expert, "lora_A")] = torch.cat([0.1 * a, torch.eye(in_features)], dim=0)
            adapters[adapter_key(param, expert, "lora_B")] = torch.cat([b, direction], dim=1)
    return adapters


def non_iid_window(seed: int) -> list[dict[str, Tensor]]:
    """Five honest updates on three domains (2 + 2 + 1, as bench-federated deals them): each is a shared direction,
    its domain's direction (twice as long) and noise; domains are independent random directions."""
    generator = torch.Generator().manual_seed(seed)

    def directions(scale: float) -> dict[str, Tensor]:
        return {
            f"{param}/{expert}": scale * torch.randn(*size, generator=generator)
            for param, size in SIZES.items()
            for expert in EXPERTS.values()
        }

    shared = directions(1.0)
    domains = [directions(2.0) for _ in range(3)]
    window = []
    for domain in (0, 1, 2, 0, 1):
        noise = directions(0.5)
        combined = {key: shared[key] + domains[domain][key] + noise[key] for key in shared}
        window.append(adapters_for(combined, generator))
    return window


def dense(adapters: dict[str, Tensor], scale: float, expert: int) -> Tensor:
    """The expert's deltas of every parameter, flattened into one float64 vector."""
    return torch.cat(
        [
            scale
            * (
                adapters[adapter_key(param, expert, "lora_B")].double()
                @ adapters[adapter_key(param, expert, "lora_A")].double()
            ).flatten()
            for param in SIZES
        ]
    )


def flipped(adapters: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: -tensor if "lora_B" in name else tensor for name, tensor in adapters.items()}


def sources_of(window: Sequence[dict[str, Tensor]], scale: float = 2.0) -> list[AdapterFactors]:
    return [AdapterFactors(f"u{index}", adapters, scale) for index, adapters in enumerate(window)]


def test_inner_products_are_the_dense_frobenius_products_with_mixed_ranks_and_scales() -> None:
    generator = torch.Generator().manual_seed(0)
    ranks_and_scales = [(2, 1.5), (3, 2.0), (5, -1.0), (4, 0.5), (2, 8.0)]
    pairs = [
        LoraFactors(torch.randn(rank, 7, generator=generator), torch.randn(5, rank, generator=generator), scale)
        for rank, scale in ranks_and_scales
    ]
    flat = [pair.scale * (pair.lora_b.double() @ pair.lora_a.double()).flatten() for pair in pairs]
    expected = torch.stack(flat) @ torch.stack(flat).T
    torch.testing.assert_close(inner_products(pairs), expected, rtol=1e-6, atol=1e-6)


def test_inner_products_in_blocks_match_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(1)
    pairs = [
        LoraFactors(torch.randn(3, 6, generator=generator), torch.randn(4, 3, generator=generator), 1.0)
        for _ in range(7)
    ]
    whole = inner_products(pairs)
    monkeypatch.setattr("fednested.aggregation.factored.NORM_CHUNK", 2)
    torch.testing.assert_close(inner_products(pairs), whole, rtol=1e-9, atol=1e-9)


def test_expert_cosines_are_the_dense_leave_one_out_cosines() -> None:
    window = non_iid_window(seed=2)
    weights = [{"0.0": w, "0.1": 1.0} for w in (0.3, 0.1, 0.25, 0.2, 0.15)]
    _, report = run(sources_of(window), weights, AggregationConfig(min_cosine=-1.0))
    for expert_name, expert in EXPERTS.items():
        deltas = [dense(adapters, 2.0, expert) for adapters in window]
        cosines = report.experts[expert_name].cosines
        assert cosines is not None
        for index, delta in enumerate(deltas):
            others = [(deltas[j], weights[j][expert_name]) for j in range(5) if j != index]
            reference = torch.stack([w * d for d, w in others]).sum(dim=0) / sum(w for _, w in others)
            expected = float(delta @ reference / (delta.norm() * reference.norm()))
            assert cosines[f"u{index}"] == pytest.approx(expected, abs=1e-6)


def test_honest_non_iid_updates_are_not_cut() -> None:
    window = non_iid_window(seed=3)
    weights = [{"0.0": 1.0, "0.1": 1.0}] * 5
    for scope in ("expert", "update"):
        screened, report = run(sources_of(window), weights, AggregationConfig(min_cosine=0.0, direction_scope=scope))
        plain, _ = run(sources_of(window), weights, AggregationConfig())
        assert all(not expert.scaled for expert in report.experts.values())
        for key, delta in plain.items():
            torch.testing.assert_close(screened[key], delta)
        # Every honest update leans towards the others (the shared direction), none by much.
        cosines = [c for expert in report.experts.values() for c in (expert.cosines or {}).values()]
        if scope == "expert":
            assert cosines
            assert all(c is not None and 0.05 < c < 0.9 for c in cosines)
        else:
            assert {u: entry["dropped"] for u, entry in report.direction.items()} == dict.fromkeys(
                [f"u{i}" for i in range(5)], False
            )


def test_a_sign_flipped_copy_is_cut_per_expert_and_gets_weight_zero() -> None:
    window = non_iid_window(seed=4)
    # The attacker flips a copy of update 0, so its direction is the honest one reversed and its norm honest.
    attacked = [*window, flipped(window[0])]
    weights = [{"0.0": 1.0, "0.1": 1.0}] * 6
    screened, report = run(sources_of(attacked), weights, AggregationConfig(min_cosine=0.0))
    honest, _ = run(sources_of(window), weights[:5], AggregationConfig())
    for expert in report.experts.values():
        assert set(expert.scaled) == {"u5"}
        entry = expert.scaled["u5"]
        assert entry["by"] == "direction"
        assert entry["factor"] == 0.0
        assert entry["limit"] == 0.0
        assert entry["cosine"] < -0.2
        assert expert.weights["u5"] == 0.0
    # Weight 0, not a zero delta with its weight kept: the result is the honest five's mean exactly.
    for key, delta in honest.items():
        torch.testing.assert_close(screened[key], delta, rtol=1e-5, atol=1e-5)
    assert json_roundtrip(report)["experts"]["0.0"]["scaled"]["u5"]["by"] == "direction"


def test_the_whole_update_scope_drops_the_update_from_every_expert() -> None:
    window = non_iid_window(seed=5)
    # Flipped in expert 0.0 only: the whole update still points away from the others, so it is dropped everywhere.
    partly = dict(window[1])
    for param in SIZES:
        partly[adapter_key(param, 0, "lora_B")] = -partly[adapter_key(param, 0, "lora_B")]
        partly[adapter_key(param, 1, "lora_B")] = 0.01 * partly[adapter_key(param, 1, "lora_B")]
    attacked = [*window, partly]
    weights = [{"0.0": 1.0, "0.1": 1.0}] * 6
    screened, report = run(sources_of(attacked), weights, AggregationConfig(min_cosine=0.0, direction_scope="update"))
    honest, _ = run(sources_of(window), weights[:5], AggregationConfig())
    assert report.direction["u5"]["dropped"] is True
    assert report.direction["u5"]["cosine"] < 0
    assert not any(entry["dropped"] for update_id, entry in report.direction.items() if update_id != "u5")
    for expert in report.experts.values():
        assert set(expert.scaled) == {"u5"}
        assert expert.scaled["u5"]["by"] == "direction"
        assert expert.cosines is None
    for key, delta in honest.items():
        torch.testing.assert_close(screened[key], delta, rtol=1e-5, atol=1e-5)
    assert "direction" in json_roundtrip(report)


def test_the_screen_never_cuts_half_the_window_or_decides_between_two() -> None:
    # Two updates are each other's reference: same cosine, so a screen could only cut both. It cuts neither.
    (honest,) = non_iid_window(seed=6)[:1]
    pair = sources_of([honest, flipped(honest)])
    kept, report = run(pair, [{"0.0": 1.0, "0.1": 1.0}] * 2, AggregationConfig(min_cosine=-0.5))
    assert report.deltas == len(kept) > 0
    assert not {u for expert in report.experts.values() for u in expert.scaled}
    # Three updates of which two are below the threshold: a majority, so it is disagreement, not an outlier.
    trio = sources_of([honest, flipped(honest), flipped(honest)])
    _, report = run(trio, [{"0.0": 1.0, "0.1": 1.0}] * 3, AggregationConfig(min_cosine=0.99))
    assert not {u for expert in report.experts.values() for u in expert.scaled}


def test_a_lone_contributor_has_no_cosine_and_is_kept() -> None:
    (only,) = non_iid_window(seed=7)[:1]
    emitted, report = run(sources_of([only]), [{"0.0": 1.0, "0.1": 1.0}], AggregationConfig(min_cosine=0.5))
    assert report.experts["0.0"].cosines == {"u0": None}
    assert set(emitted) == {delta_key(param, expert) for param in SIZES for expert in EXPERTS.values()}


def test_a_threshold_nobody_is_below_changes_nothing_and_null_adds_nothing_to_the_report() -> None:
    window = non_iid_window(seed=8)
    weights = [{"0.0": 0.2 + 0.1 * i, "0.1": 1.0} for i in range(5)]
    plain, plain_report = run(sources_of(window), weights, AggregationConfig(norm_bound_multiplier=2.0))
    screened, _ = run(sources_of(window), weights, AggregationConfig(norm_bound_multiplier=2.0, min_cosine=-1.0))
    for key, delta in plain.items():
        torch.testing.assert_close(screened[key], delta, rtol=0, atol=0)
    recorded = json_roundtrip(plain_report)
    assert "direction" not in recorded
    assert all("cosines" not in expert for expert in recorded["experts"].values())


@pytest.mark.parametrize("value", [1.0, 1.5, -1.01, math.nan, math.inf])
def test_min_cosine_outside_its_range_is_refused(value: float) -> None:
    with pytest.raises(ValueError, match="min_cosine"):
        AggregationConfig(min_cosine=value)


def test_round_config_reads_the_screen_and_refuses_it_with_dp() -> None:
    settings = RoundAggregationSettings.from_mapping({"min_cosine": -0.02, "direction_scope": "update"}, where="t")
    assert settings.aggregation.min_cosine == -0.02
    assert settings.aggregation.direction_scope == "update"
    # On by default (the bench's selected rule); null switches it off.
    assert RoundAggregationSettings.from_mapping({}, where="t").aggregation.min_cosine == -0.02
    assert RoundAggregationSettings.from_mapping({"min_cosine": None}, where="t").aggregation.min_cosine is None
    with pytest.raises(RoundSettingsError, match="direction_scope"):
        RoundAggregationSettings.from_mapping({"min_cosine": 0.0, "direction_scope": "layer"}, where="t")
    with pytest.raises(RoundSettingsError, match="min_cosine"):
        RoundAggregationSettings.from_mapping({"min_cosine": "high"}, where="t")
    dp = {"noise_multiplier": 1.0, "clip_norm": 1.0, "delta": 1e-5, "epsilon_budget": 8.0, "planned_aggregations": 10}
    with pytest.raises(RoundSettingsError, match="min_cosine"):
        RoundAggregationSettings.from_mapping({"min_cosine": 0.0, "dp": dp}, where="t")


def test_combine_window_records_the_screen_only_when_it_is_on() -> None:
    window = non_iid_window(seed=9)
    sources = sources_of([*window, flipped(window[2])])
    facts = [
        UpdateFacts(
            update_id=source.update_id,
            experts=frozenset(EXPERTS),
            staleness=0,
            examples=1,
            routed_tokens=dict.fromkeys(EXPERTS, 10),
        )
        for source in sources
    ]
    keys = {"server_optimizer": "fedavg", "norm_bound_multiplier": None, "max_update_share": None}
    records = {}
    for name, extra in {"off": {"min_cosine": None}, "on": {"min_cosine": -0.5, "direction_scope": "update"}}.items():
        settings = RoundAggregationSettings.from_mapping({**keys, **extra}, where=name)
        result = combine_window(sources, facts, settings, ServerOptimizer(settings.server_optimizer), lambda k, d: None)
        records[name] = result.record["rule"]
    assert "min_cosine" not in records["off"]
    assert "direction" not in records["off"]
    assert records["off"]["scaled"] == {}
    rule = records["on"]
    assert (rule["min_cosine"], rule["direction_scope"]) == (-0.5, "update")
    # The flipped copy points away from all five; the original still shares the common direction with the other four.
    assert [update_id for update_id, entry in rule["direction"].items() if entry["dropped"]] == ["u5"]
    assert rule["scaled"] == {"u5": {"scaled_experts": 2, "by": {"direction": 2}, "min_factor": 0.0}}


def json_roundtrip(report: AggregationReport) -> dict[str, Any]:
    import json

    loaded: dict[str, Any] = json.loads(json.dumps(report.to_dict()))
    return loaded
