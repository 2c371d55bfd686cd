"""The federated benchmark at toy scale: 5 devices, 2 rounds of 2 local steps, one grid point per optimiser."""

import json
import statistics
from typing import Any

import pytest
import torch

from bench.asynchronous import World, build_world, train_local
from bench.federated import (
    RULES,
    FederatedBenchSettings,
    deal_devices,
    gate_round,
    poison,
    run_benchmark,
    run_federation,
    train_centralised,
)
from fednested.adapters import ExpertLoraConfig
from fednested.aggregation.settings import RoundAggregationSettings
from fednested.data import record_texts
from fednested.deltas import expert_deltas_from_adapters

TOY = FederatedBenchSettings(
    seeds=(0,),
    tuning_seed=1,
    rounds=2,
    pretrain_records_per_domain=8,
    device_records=8,
    heldout_per_domain=4,
    tokenizer_vocab=512,
    pretrain_steps=5,
    local_steps=2,
    seq_len=64,
    rows_per_batch=2,
    learning_rate_grid=(5e-3,),
    optimizer_grids={
        "fedavg": [{"server_learning_rate": 1.0}],
        "fedadam": [{"server_learning_rate": 1e-2, "server_tau": 1e-3}],
    },
    dp_epsilons=(8.0,),
)


@pytest.fixture(scope="module")
def world() -> World:
    torch.set_num_threads(1)
    return build_world(TOY)


@pytest.fixture(scope="module")
def report(world: World, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "federated.json"
    run_benchmark(TOY, out)
    loaded: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    return loaded


def test_devices_hold_one_trained_domain_each_and_no_shared_record(world: World) -> None:
    devices = deal_devices(world, TOY, 0)
    assert [device.domains for device in devices] == [
        ("code",),
        ("legal",),
        ("medical",),
        ("code",),
        ("legal",),
    ]
    texts = list(record_texts([record for device in devices for record in device.records]))
    assert len(texts) == len(set(texts)) == 5 * TOY.device_records
    for device in devices:
        pool = set(record_texts(world.device_pool[device.domains[0]]))
        assert set(record_texts(list(device.records))) <= pool
    assert deal_devices(world, TOY, 0) == devices
    assert deal_devices(world, TOY, 1) != devices


def test_poison_multiplies_every_dense_delta(world: World) -> None:
    device = deal_devices(world, TOY, 0)[0]
    adapters, _, _ = train_local(world.base, device, world, TOY, seed=3)
    lora = ExpertLoraConfig(rank=TOY.lora_rank, alpha=TOY.lora_alpha)
    honest = expert_deltas_from_adapters(adapters, lora, world.base)
    assert max(float(delta.abs().max()) for delta in honest.values()) > 0
    for factor in (100.0, -1.0):
        poisoned = expert_deltas_from_adapters(poison(adapters, factor), lora, world.base)
        assert poisoned.keys() == honest.keys()
        for key, delta in honest.items():
            torch.testing.assert_close(poisoned[key], delta * factor, rtol=1e-5, atol=1e-7)


def test_both_sides_train_on_the_same_token_budget(world: World) -> None:
    devices = deal_devices(world, TOY, 0)
    config = {"server_optimizer": "fedavg", "server_learning_rate": 1.0, **RULES["weighted_mean"]}
    run = run_federation(world, devices, TOY, config, seed=0, learning_rate=5e-3, label="budget", every_round=True)
    # every local step is full (the devices hold more than local_steps x rows x seq_len tokens)
    assert run.tokens == TOY.token_budget == 2 * 5 * 2 * 2 * 64
    _, central_tokens = train_centralised(world, devices, TOY, seed=0, learning_rate=5e-3)
    assert 0.9 * TOY.token_budget <= central_tokens <= TOY.token_budget
    assert len(run.curve) == TOY.rounds + 1
    assert run.final.trained < run.curve[0].trained
    assert len(run.honest_norms) == TOY.rounds * 5


def test_inflated_claims_win_the_plain_mean_and_the_share_cap_holds_them(world: World) -> None:
    devices = deal_devices(world, TOY, 0)
    optimizer = {"server_optimizer": "fedavg", "server_learning_rate": 1.0}
    plain = run_federation(
        world,
        devices,
        TOY,
        {**optimizer, **RULES["weighted_mean"]},
        seed=0,
        learning_rate=5e-3,
        label="plain",
        attack="inflated_claims",
    )
    capped = run_federation(
        world,
        devices,
        TOY,
        {**optimizer, **RULES["weighted_mean_bounded"]},
        seed=0,
        learning_rate=5e-3,
        label="capped",
        attack="inflated_claims",
    )
    # 100x the claims of one device among five with similar honest claims: about 100 / 104 of an expert's weight where
    # the devices route alike, less where the attacker routes few tokens to the expert
    assert statistics.fmean(plain.attacker_weight) > 0.8
    assert max(capped.attacker_weight) <= 0.4 + 1e-9
    # its claim history is inflated from the first update on, so the history bound never fires
    assert plain.attacker_claim_bounded == capped.attacker_claim_bounded == 0


def test_scaled_update_is_cut_to_the_norm_bound(world: World) -> None:
    devices = deal_devices(world, TOY, 0)
    config = {"server_optimizer": "fedavg", "server_learning_rate": 1.0, **RULES["weighted_mean_bounded"]}
    run = run_federation(world, devices, TOY, config, seed=0, learning_rate=5e-3, label="bound", attack="scaled")
    # x100 the norm, cut to 2x the window's median: a factor of about 2/100 per expert
    assert 0 < max(run.attacker_scaled) < 0.1
    plain = {"server_optimizer": "fedavg", "server_learning_rate": 1.0, **RULES["weighted_mean"]}
    undefended = run_federation(world, devices, TOY, plain, seed=0, learning_rate=5e-3, label="plain", attack="scaled")
    assert undefended.attacker_scaled == [1.0] * TOY.rounds
    assert undefended.final.trained > run.final.trained


def test_report_figures_follow_from_its_own_numbers(report: dict[str, Any]) -> None:
    best = report["federated_gap_optimizer"]
    assert best == min(
        report["tuning"]["server_optimizers"], key=lambda n: report["tuning"]["server_optimizers"][n]["trained_loss"]
    )
    central = report["centralised"]["trained_loss"]["per_seed"]
    federated = report["optimizers"][best]["trained_loss"]["per_seed"]
    gaps = [(value - reference) / reference for value, reference in zip(federated, central, strict=True)]
    assert report["federated_gap"] == pytest.approx(statistics.fmean(gaps))
    for name, entry in report["optimizers"].items():
        curve = entry["curves"]["0"]
        assert len(curve) == TOY.rounds + 1
        assert curve[0] == report["optimizers"][best]["curves"]["0"][0], name
        assert entry["trained_loss"]["per_seed"][0] == pytest.approx(curve[-1][0], abs=1e-5)
    assert report["tuning"]["seed"] not in report["settings"]["seeds"]
    assert report["targets"]["federated_gap"]["met"] == (report["federated_gap"] <= 0.05)
    assert report["findings"][0].startswith(f"federated_gap {report['federated_gap']:.3f}")
    assert ("NOT met" in report["findings"][1]) == (report["poisoned_gap"] > 0.05)


def test_default_rule_is_the_declared_selection(report: dict[str, Any]) -> None:
    rules = report["rules"]
    assert set(rules) == set(RULES)
    best_clean = min(entry["clean_trained_loss"] for entry in rules.values())
    eligible = [
        name
        for name, entry in rules.items()
        if entry["clean_trained_loss"] <= best_clean * (1 + report["settings"]["clean_tolerance"])
    ]
    assert report["rules_eligible_for_default"] == eligible
    chosen = min(eligible, key=lambda name: rules[name]["worst_attack_poisoned_gap"])
    assert report["poisoned_gap_rule"] == chosen
    worst = max(
        rules[chosen]["scenarios"][attack]["poisoned_gap"]["mean"]
        for attack in ("scaled", "sign_flip", "inflated_claims")
    )
    assert report["poisoned_gap"] == pytest.approx(worst)
    clean = rules[chosen]["scenarios"]["none"]["trained_loss"]["per_seed"][0]
    poisoned = rules[chosen]["scenarios"][report["poisoned_gap_attack"]]["trained_loss"]["per_seed"][0]
    assert report["poisoned_gap"] == pytest.approx((poisoned - clean) / clean)
    # the recommendation is a round config the control plane accepts, with the rule and the optimiser chosen
    default = report["recommended_default"]
    settings = RoundAggregationSettings.from_mapping(default)
    assert settings.aggregation.method == RULES[chosen]["aggregation_method"]
    assert settings.server_optimizer.name == report["federated_gap_optimizer"]


def test_sign_flip_runs_report_the_attacked_domain_every_round(report: dict[str, Any]) -> None:
    for rule in RULES:
        attacked = report["rules"][rule]["scenarios"]["sign_flip"]["attacked_domain"]
        assert attacked["domain"] == "legal"
        curve = attacked["curves"]["0"]
        assert len(curve) == TOY.rounds + 1
        assert attacked["first_round_over_gate"] == [gate_round(curve, TOY.gate_fraction)]
    assert "attacked_domain" not in report["rules"]["trimmed_mean"]["scenarios"]["scaled"]


def test_gate_round_is_the_first_rise_over_the_fraction() -> None:
    assert gate_round([2.0, 1.9, 1.93, 1.99, 2.5], 0.02) == 3
    assert gate_round([2.0, 1.9, 1.8], 0.02) is None
    assert gate_round([2.0], 0.02) is None


def test_dp_spends_no_more_than_the_target_epsilon(report: dict[str, Any]) -> None:
    entry = report["dp"]["8.0"]
    assert 0.9 * 8.0 <= entry["epsilon_accounted"] <= 8.0
    assert entry["clip_norm"] == pytest.approx(report["tuning"]["dp_clip_norm"])
    # DP-FedAvg's noise: z * C / K on every coordinate, K = 5 updates a window
    assert entry["noise_std_per_coordinate"] == pytest.approx(entry["noise_multiplier"] * entry["clip_norm"] / 5)


def test_settings_refuse_a_tuning_seed_among_the_reported_ones() -> None:
    with pytest.raises(ValueError, match="tuning seed"):
        FederatedBenchSettings(seeds=(0, 1), tuning_seed=1)
    with pytest.raises(ValueError, match="attacker"):
        FederatedBenchSettings(attacker=5)
