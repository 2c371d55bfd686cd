"""The asynchronous aggregation benchmark's simulation core at toy scale: 4 devices, buffers of 2, 2 local steps."""

import copy
import math
import random
import statistics

import pytest
import torch

from bench.asynchronous import (
    AsyncBenchSettings,
    CurvePoint,
    LocalUpdate,
    Simulation,
    World,
    apply_buffer,
    build_world,
    compute_time,
    deal_devices,
    first_reaching,
    heldout_loss,
    simulate_async,
    simulate_sync,
    speedup_at,
    target_loss,
    train_local,
)
from fednested.adapters import ExpertLoraConfig
from fednested.data import record_texts
from fednested.deltas import expert_deltas_from_adapters

TOY = AsyncBenchSettings(
    devices=4,
    buffer_size=2,
    local_runs=8,
    seeds=(0,),
    pretrain_records_per_domain=8,
    device_records=8,
    heldout_per_domain=4,
    tokenizer_vocab=512,
    pretrain_steps=5,
    local_steps=2,
    seq_len=64,
    rows_per_batch=2,
)


@pytest.fixture(scope="module")
def world() -> World:
    torch.set_num_threads(1)
    return build_world(TOY)


@pytest.fixture(scope="module")
def runs(world: World) -> dict[str, Simulation]:
    devices = deal_devices(world, TOY, 0)
    return {"sync": simulate_sync(world, devices, TOY, 0), "async": simulate_async(world, devices, TOY, 0)}


def test_devices_hold_disjoint_non_iid_data(world: World) -> None:
    devices = deal_devices(world, TOY, 0)
    assert len(devices) == 4
    texts = list(record_texts([record for device in devices for record in device.records]))
    assert len(texts) == len(set(texts)) == 4 * TOY.device_records
    assert sorted(len(device.domains) for device in devices) == [1, 1, 2, 2]
    assert [device.domains[0] for device in devices] == sorted(world.device_pool)[:4]
    assert deal_devices(world, TOY, 0) == devices
    assert deal_devices(world, TOY, 1) != devices


def test_async_clock_delivers_updates_in_completion_order(runs: dict[str, Simulation]) -> None:
    sim = runs["async"]
    finished = [arrival[3] for arrival in sim.arrivals]
    assert len(finished) == sim.local_runs == TOY.local_runs
    assert finished == sorted(finished)
    # each aggregation happens at the moment its buffer's K-th update arrives
    assert [point.time for point in sim.curve[1:]] == finished[TOY.buffer_size - 1 :: TOY.buffer_size]
    # devices never idle: a device's next run starts when its previous one arrived
    last_finish: dict[str, float] = {}
    for device_id, _, started_at, finished_at in sorted(sim.arrivals, key=lambda arrival: arrival[2]):
        assert started_at == last_finish.get(device_id, 0.0)
        last_finish[device_id] = finished_at


def test_async_applies_stale_updates_with_their_true_staleness(runs: dict[str, Simulation]) -> None:
    sim = runs["async"]
    # the j-th arrival is applied by aggregation j // K, i.e. onto version j // K
    expected = [index // TOY.buffer_size - arrival[1] for index, arrival in enumerate(sim.arrivals)]
    assert [tau for applied in sim.staleness for tau in applied] == expected
    assert min(expected) >= 0
    # 4 devices start on version 0 and only 2 fit the first buffer: the other two arrive after it, stale
    assert sum(tau >= 1 for tau in expected) >= 2
    assert [point.version for point in sim.curve] == list(range(TOY.local_runs // TOY.buffer_size + 1))


def test_sync_round_lasts_as_long_as_its_slowest_device(runs: dict[str, Simulation]) -> None:
    sim = runs["sync"]
    assert len(sim.rounds) == TOY.local_runs // TOY.buffer_size
    durations = [later.time - earlier.time for earlier, later in zip(sim.curve, sim.curve[1:], strict=False)]
    assert durations == pytest.approx([max(cohort) for cohort in sim.rounds], abs=1e-12)
    assert all(len(cohort) == TOY.buffer_size for cohort in sim.rounds)
    assert all(min(cohort) < max(cohort) for cohort in sim.rounds)
    assert {tau for applied in sim.staleness for tau in applied} == {0}
    # each round's cohort is distinct devices
    for round_index in range(len(sim.rounds)):
        cohort = sim.arrivals[round_index * TOY.buffer_size : (round_index + 1) * TOY.buffer_size]
        assert len({arrival[0] for arrival in cohort}) == TOY.buffer_size


def test_training_lowers_the_heldout_loss(runs: dict[str, Simulation], world: World) -> None:
    base, _ = heldout_loss(world.base, world)
    for sim in runs.values():
        assert sim.curve[0].loss == pytest.approx(base, abs=1e-9)
        assert sim.curve[-1].loss < base - 1e-3


def test_stale_update_weighs_less_in_the_merged_model(world: World) -> None:
    devices = deal_devices(world, TOY, 0)
    trained = [train_local(world.base, devices[index], world, TOY, seed=index) for index in range(2)]
    equal_tokens = {expert: 100 for expert in trained[0][1]}
    updates = [
        LocalUpdate(f"u{index}", devices[index].device_id, base_version, 0.0, 1.0, adapters, equal_tokens, 8, [])
        for index, ((adapters, _, _), base_version) in enumerate(zip(trained, (0, 3), strict=True))
    ]
    server = copy.deepcopy(world.base)
    apply_buffer(server, updates, version=3, settings=TOY)
    # τ = 3 and 0: weights (1+3)^-0.5 = 0.5 and 1, normalised to 1/3 and 2/3
    lora = ExpertLoraConfig(rank=TOY.lora_rank, alpha=TOY.lora_alpha)
    deltas = [expert_deltas_from_adapters(update.adapters, lora, world.base) for update in updates]
    before, after = dict(world.base.named_parameters()), dict(server.named_parameters())
    for key in deltas[0]:
        param_name, _, expert = key.partition("/expert=")
        expected = before[param_name][int(expert)] + deltas[0][key] / 3 + 2 * deltas[1][key] / 3
        torch.testing.assert_close(after[param_name][int(expert)], expected, rtol=1e-5, atol=1e-6)
    assert any(delta.abs().max() > 0 for delta in deltas[0].values())


def test_compute_time_is_lognormal_with_mean_one() -> None:
    rng = random.Random(0)
    draws = sorted(compute_time(rng, 1.0) for _ in range(40_000))
    assert statistics.fmean(draws) == pytest.approx(1.0, rel=0.05)
    assert draws[len(draws) // 2] == pytest.approx(math.exp(-0.5), rel=0.03)
    logs = [math.log(draw) for draw in draws]
    spread = math.sqrt(sum((value + 0.5) ** 2 for value in logs) / len(logs))
    assert spread == pytest.approx(1.0, rel=0.03)


def test_target_and_first_reaching_are_steps_without_interpolation() -> None:
    assert target_loss(3.0, 2.0, 0.85) == pytest.approx(2.15)
    curve = [
        CurvePoint(0.0, 3.0, 0, 0),
        CurvePoint(1.0, 2.5, 1, 8),
        CurvePoint(2.5, 2.1, 2, 16),
        CurvePoint(4, 2.0, 3, 24),
    ]
    assert first_reaching(curve, 2.15) == curve[2]
    assert first_reaching(curve, 2.5) == curve[1]
    assert first_reaching(curve, 1.9) is None


def test_speedup_is_sync_time_over_async_time_and_zero_when_async_falls_short() -> None:
    sync = [CurvePoint(0.0, 3.0, 0, 0), CurvePoint(3.0, 2.4, 1, 8), CurvePoint(6.0, 2.0, 2, 16)]
    asynchronous = [CurvePoint(0.0, 3.0, 0, 0), CurvePoint(0.5, 2.5, 1, 8), CurvePoint(1.0, 2.1, 2, 16)]
    # targets 2.5, 2.05 and 2.2: sync reaches them at 3.0, 6.0 and 6.0; async at 0.5, never and 1.0
    assert speedup_at(sync, asynchronous, 0.5) == pytest.approx(3.0 / 0.5)
    assert speedup_at(sync, asynchronous, 0.95) == 0.0
    assert speedup_at(sync, asynchronous, 0.8) == pytest.approx(6.0 / 1.0)
