"""aggregate_factored: equal to the dense rules, expert by expert from lazily read factors, with clipping, the
relative norm bound and the report; and the routed-token liar it was written against."""

from __future__ import annotations

import itertools
import json
import math
import statistics
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from fednested.adapters.lora import ExpertLoraConfig, adapter_key
from fednested.aggregation.aggregate import (
    AggregationConfig,
    AggregationMethod,
    aggregate_expert_deltas,
    expert_of_delta,
)
from fednested.aggregation.factored import AggregationReport, aggregate_factored
from fednested.aggregation.factors import AdapterFactors, FactorFile, FactorSource, LoraFactors
from fednested.aggregation.rules import (
    clip_factor,
    joint_norm,
    weighted_coordinate_median,
    weighted_mean,
    weighted_trimmed_mean,
)
from fednested.aggregation.weights import UpdateFacts, WeightingConfig, expert_weights
from fednested.deltas import DeltaKey, ExpertDeltas, delta_key, expert_deltas_from_adapters, parse_delta_key

UP = "model.layers.0.mlp.experts.gate_up_proj"
DOWN = "model.layers.0.mlp.experts.down_proj"
UP1 = "model.layers.1.mlp.experts.gate_up_proj"
# [num_experts, out, in]: small on purpose; the identities do not depend on size.
SHAPES = {UP: (3, 6, 4), DOWN: (3, 4, 3), UP1: (3, 6, 4)}
METHODS: tuple[AggregationMethod, ...] = ("weighted_mean", "trimmed_mean", "coordinate_median")


@dataclass(frozen=True)
class Update:
    """One edge update as a test builds it: its adapters, LoRA config (rank, alpha) and weight per expert."""

    update_id: str
    adapters: dict[str, Tensor]
    lora: ExpertLoraConfig
    weights: dict[str, float]

    def source(self) -> AdapterFactors:
        return AdapterFactors(self.update_id, self.adapters, self.lora.scale)

    def deltas(self) -> ExpertDeltas:
        return expert_deltas_from_adapters(self.adapters, self.lora, SHAPES)


def random_adapters(seed: int, experts: dict[str, list[int]], rank: int) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    adapters = {}
    for param, indexes in experts.items():
        _, out_features, in_features = SHAPES[param]
        for expert in indexes:
            adapters[adapter_key(param, expert, "lora_A")] = torch.randn(rank, in_features, generator=generator)
            adapters[adapter_key(param, expert, "lora_B")] = torch.randn(out_features, rank, generator=generator)
    return adapters


def update(
    update_id: str, seed: int, experts: dict[str, list[int]], rank: int, alpha: float, weights: dict[str, float]
) -> Update:
    return Update(update_id, random_adapters(seed, experts, rank), ExpertLoraConfig(rank=rank, alpha=alpha), weights)


# Rank 2 and rank 4 mixed, scales 2, 1, 1, 4, 2, different expert subsets; u2 gives expert 0.1 weight 0 and
# nobody gives expert 0.2 any weight. Contributors per key: 4 (expert 0.0), 2 and 3 (0.1), 3 (1.2).
MIXED = [
    update("u0", 0, {UP: [0, 1], DOWN: [0]}, rank=2, alpha=4, weights={"0.0": 0.3, "0.1": 0.2}),
    update("u1", 1, {UP: [0], DOWN: [0, 1], UP1: [2]}, rank=4, alpha=4, weights={"0.0": 0.1, "0.1": 0.5, "1.2": 0.4}),
    update("u2", 2, {UP: [1], DOWN: [1], UP1: [2]}, rank=2, alpha=2, weights={"0.1": 0.0, "1.2": 0.25}),
    update(
        "u3", 3, {UP: [0, 1], DOWN: [0, 1], UP1: [2]}, rank=4, alpha=16, weights={"0.0": 0.2, "0.1": 0.3, "1.2": 0.1}
    ),
    update("u4", 4, {UP: [0, 2], DOWN: [0, 1]}, rank=2, alpha=4, weights={"0.0": 0.4, "0.1": 0.1, "0.2": 0.0}),
]
EMITTED = {delta_key(UP, 0), delta_key(DOWN, 0), delta_key(UP, 1), delta_key(DOWN, 1), delta_key(UP1, 2)}
TRIM = 0.34


def run(
    sources: Sequence[FactorSource], weights: Sequence[dict[str, float]], config: AggregationConfig, **kwargs: Any
) -> tuple[ExpertDeltas, AggregationReport]:
    """aggregate_factored collecting what it emits; each key must be emitted once."""
    emitted: ExpertDeltas = {}

    def emit(key: DeltaKey, delta: Tensor) -> None:
        assert key not in emitted, f"{key} emitted twice"
        emitted[key] = delta

    report = aggregate_factored(sources, weights, config, emit, **kwargs)
    return emitted, report


def float64_reference(updates: Sequence[Update], method: str, clip_norm: float | None, trim: float) -> ExpertDeltas:
    """The dense rules in float64, written out: ΔW = scale·B·A, clipped per (update, expert), then combined."""
    contributors: dict[DeltaKey, list[tuple[Tensor, float]]] = {}
    for item in updates:
        deltas = {
            delta_key(param, expert): item.lora.scale
            * item.adapters[adapter_key(param, expert, "lora_B")].double()
            @ item.adapters[adapter_key(param, expert, "lora_A")].double()
            for param, expert in {parse_delta_key(key) for key in item.deltas()}
        }
        for expert in {expert_of_delta(key) for key in deltas}:
            keys = [key for key in deltas if expert_of_delta(key) == expert]
            factor = clip_factor([deltas[key] for key in keys], clip_norm) if clip_norm is not None else 1.0
            if item.weights.get(expert, 0.0) > 0:
                for key in keys:
                    contributors.setdefault(key, []).append((deltas[key] * factor, item.weights[expert]))
    result: ExpertDeltas = {}
    for key, entries in contributors.items():
        stack = torch.stack([delta for delta, _ in entries])
        weights = torch.tensor([weight for _, weight in entries], dtype=torch.float64)
        if method == "weighted_mean":
            result[key] = weighted_mean(stack, weights)
        elif method == "trimmed_mean":
            result[key] = weighted_trimmed_mean(stack, weights, trim)
        else:
            result[key] = weighted_coordinate_median(stack, weights)
    return result


def relative_error(actual: Tensor, expected: Tensor) -> float:
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


@pytest.mark.parametrize("clip", [False, True], ids=["no-clip", "clip"])
@pytest.mark.parametrize("method", METHODS)
def test_equals_the_dense_rules_with_mixed_ranks_and_expert_subsets(method: AggregationMethod, clip: bool) -> None:
    norms = [
        joint_norm([d for k, d in item.deltas().items() if expert_of_delta(k) == e])
        for item in MIXED
        for e in item.weights
    ]
    # The median per-(update, expert) norm: about half the deltas are clipped, half are not.
    clip_norm = statistics.median(norms) if clip else None
    config = AggregationConfig(method=method, clip_norm=clip_norm, trim_fraction=TRIM)
    emitted, report = run([item.source() for item in MIXED], [item.weights for item in MIXED], config)
    dense = aggregate_expert_deltas(
        [(item.deltas(), item.weights) for item in MIXED], method=method, clip_norm=clip_norm, trim_fraction=TRIM
    )
    exact = float64_reference(MIXED, method, clip_norm, TRIM)
    assert set(emitted) == set(dense) == set(exact) == EMITTED
    assert report.deltas == len(EMITTED)
    for key in EMITTED:
        assert emitted[key].dtype == torch.float32
        assert relative_error(emitted[key], dense[key]) <= 1e-5, key
        assert relative_error(emitted[key], exact[key]) <= 1e-5, key
    assert set(report.experts) == {"0.0", "0.1", "1.2"}
    assert report.experts["0.1"].contributors == ["u0", "u1", "u3", "u4"]
    if clip_norm is not None:
        clipped = {(u, e) for e, record in report.experts.items() for u, n in record.norms.items() if n > clip_norm}
        assert 2 <= len(clipped) <= len(norms) - 2
        for expert, record in report.experts.items():
            assert set(record.scaled) == {u for u, e in clipped if e == expert}
            for update_id, entry in record.scaled.items():
                assert entry["by"] == "clip_norm"
                assert entry["factor"] == pytest.approx(clip_norm / record.norms[update_id], rel=1e-12)
    else:
        assert all(not record.scaled for record in report.experts.values())


def test_report_norms_are_the_dense_joint_norms_and_the_report_is_json() -> None:
    _, report = run([item.source() for item in MIXED], [item.weights for item in MIXED], AggregationConfig())
    for item in MIXED:
        deltas = item.deltas()
        for expert, record in report.experts.items():
            if item.update_id in record.norms:
                dense = joint_norm([delta for key, delta in deltas.items() if expert_of_delta(key) == expert])
                assert record.norms[item.update_id] == pytest.approx(dense, rel=1e-6)
                assert record.weights[item.update_id] == item.weights[expert]
    document = json.loads(json.dumps(report.to_dict()))
    assert document["method"] == "weighted_mean"
    assert document["deltas"] == len(EMITTED)
    assert sorted(document["experts"]) == ["0.0", "0.1", "1.2"]


@pytest.mark.parametrize("method", ["trimmed_mean", "coordinate_median"])
def test_one_row_blocks_give_the_same_result_as_one_block(
    method: AggregationMethod, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks: list[int] = []
    dense_rows = LoraFactors.dense_rows

    def recording(self: LoraFactors, start: int, stop: int) -> Tensor:
        blocks.append(stop - start)
        return dense_rows(self, start, stop)

    monkeypatch.setattr(LoraFactors, "dense_rows", recording)
    config = AggregationConfig(method=method, trim_fraction=TRIM)
    sources, weights = [item.source() for item in MIXED], [item.weights for item in MIXED]
    whole, _ = run(sources, weights, config)
    assert set(blocks) == {4, 6}  # each key's out_features: one block per key
    blocks.clear()
    rows, _ = run(sources, weights, config, max_block_bytes=1)
    assert set(blocks) == {1}
    blocks.clear()
    # 3 rows per block for a 6-row key with 4 contributors and 4 columns: blocks 3 + 3; for 4 rows: 3 + 1.
    # The budget covers the stack and what sorting keeps alive: 20 bytes a value (fednested/aggregation/factored.py).
    some, _ = run(sources, weights, config, max_block_bytes=3 * 4 * 4 * 20)
    assert 3 in blocks
    assert set(whole) == set(rows) == set(some) == EMITTED
    for key in EMITTED:
        torch.testing.assert_close(rows[key], whole[key], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(some[key], whole[key], rtol=1e-6, atol=1e-6)


def test_expert_without_weight_anywhere_is_not_emitted() -> None:
    item = update("solo", 5, {UP: [0, 2], DOWN: [1]}, rank=2, alpha=4, weights={"0.0": 1.0, "0.2": 0.0})
    # Expert 0.1 is absent from the weight map: it counts as weight 0 (the dense rule refuses such a map).
    emitted, report = run([item.source()], [item.weights], AggregationConfig())
    assert set(emitted) == {delta_key(UP, 0)}
    assert set(report.experts) == {"0.0"}
    torch.testing.assert_close(emitted[delta_key(UP, 0)], item.deltas()[delta_key(UP, 0)])


def test_bad_inputs_are_value_errors_naming_the_update() -> None:
    sources = [item.source() for item in MIXED[:2]]
    config = AggregationConfig()
    with pytest.raises(ValueError, match="2 updates but 1 weight maps"):
        run(sources, [MIXED[0].weights], config)
    with pytest.raises(ValueError, match="needs at least one update"):
        run([], [], config)
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"update u1: weight for expert 0\.1 must be finite and >= 0"):
            run(sources, [MIXED[0].weights, {**MIXED[1].weights, "0.1": bad}], config)


def test_shapes_that_disagree_across_updates_are_named() -> None:
    first = update("a", 6, {UP: [0]}, rank=2, alpha=2, weights={"0.0": 1.0})
    transposed = {
        adapter_key(UP, 0, "lora_A"): torch.ones(2, 6),
        adapter_key(UP, 0, "lora_B"): torch.ones(4, 2),
    }
    second = AdapterFactors("b", transposed, scale=1.0)
    with pytest.raises(ValueError, match=rf"delta '{UP}/expert=0' has different shapes across updates"):
        run([first.source(), second], [first.weights, {"0.0": 1.0}], AggregationConfig())


# ----------------------------------------------------------------------------------------------------------------
# Memory: factors are read lazily from files, one expert after the other.

EXPERTS = 4
UPDATES = 3


@dataclass
class ReadLog:
    """Every read in order: (expert read, update, key, experts whose factors were still alive at that moment)."""

    entries: list[tuple[str, str, DeltaKey, frozenset[str]]]
    live: list[tuple[str, weakref.ref[LoraFactors]]]

    def alive(self) -> frozenset[str]:
        return frozenset(expert for expert, ref in self.live if ref() is not None)


class LoggedSource:
    """A FactorSource that records its reads and keeps weak references to what it handed out."""

    def __init__(self, inner: FactorFile, log: ReadLog) -> None:
        self.inner = inner
        self.log = log

    @property
    def update_id(self) -> str:
        return self.inner.update_id

    def delta_keys(self) -> frozenset[DeltaKey]:
        return self.inner.delta_keys()

    def read(self, key: DeltaKey) -> LoraFactors:
        expert = expert_of_delta(key)
        self.log.entries.append((expert, self.update_id, key, self.log.alive()))
        factors = self.inner.read(key)
        self.log.live.append((expert, weakref.ref(factors)))
        return factors


def files_on_disk(tmp_path: Path) -> tuple[list[Path], list[Update]]:
    updates = [
        update(f"f{index}", 10 + index, {UP: list(range(EXPERTS)), DOWN: list(range(EXPERTS))}, 2, 4, {})
        for index in range(UPDATES)
    ]
    paths = []
    for item in updates:
        path = tmp_path / f"{item.update_id}.safetensors"
        save_file(item.adapters, str(path))
        paths.append(path)
    return paths, updates


def logged_run(tmp_path: Path, method: AggregationMethod) -> tuple[ReadLog, ExpertDeltas, list[Update]]:
    paths, updates = files_on_disk(tmp_path)
    log = ReadLog([], [])
    sources = [
        LoggedSource(FactorFile(item.update_id, path, 2.0), log) for item, path in zip(updates, paths, strict=True)
    ]
    weights = [{f"0.{expert}": 1.0 + index for expert in range(EXPERTS)} for index in range(UPDATES)]
    emitted, _ = run(sources, weights, AggregationConfig(method=method, clip_norm=5.0))
    return log, emitted, updates


@pytest.mark.parametrize("method", METHODS)
def test_reads_go_expert_by_expert_each_pair_once(tmp_path: Path, method: AggregationMethod) -> None:
    log, emitted, updates = logged_run(tmp_path, method)
    order = [expert for expert, _ in itertools.groupby(entry[0] for entry in log.entries)]
    # All reads of one expert come before any read of the next: the sequence of experts has no repeats.
    assert order == [f"0.{expert}" for expert in range(EXPERTS)]
    read = [(update_id, key) for _, update_id, key, _ in log.entries]
    assert len(read) == len(set(read)) == UPDATES * EXPERTS * 2
    # And the files give what the same tensors in memory give.
    in_memory, _ = run(
        [AdapterFactors(item.update_id, item.adapters, 2.0) for item in updates],
        [{f"0.{expert}": 1.0 + index for expert in range(EXPERTS)} for index in range(UPDATES)],
        AggregationConfig(method=method, clip_norm=5.0),
    )
    assert set(emitted) == set(in_memory)
    for key in emitted:
        assert torch.equal(emitted[key], in_memory[key])


@pytest.mark.parametrize("method", METHODS)
def test_live_factors_do_not_grow_with_the_number_of_experts(tmp_path: Path, method: AggregationMethod) -> None:
    log, _, _ = logged_run(tmp_path, method)
    for expert, _, _, alive in log.entries:
        # At most the expert being read and the one before it.
        assert alive <= {expert, f"0.{int(expert.split('.')[1]) - 1}"}, (expert, alive)
    # Nothing is left alive once the aggregation returned.
    assert log.alive() == frozenset()


@pytest.mark.parametrize("method", METHODS)
def test_never_holds_more_than_one_experts_factors(tmp_path: Path, method: AggregationMethod) -> None:
    log, _, _ = logged_run(tmp_path, method)
    for expert, _, _, alive in log.entries:
        assert alive <= {expert}, (expert, alive)


# ----------------------------------------------------------------------------------------------------------------
# Robustness: the relative norm bound, sign flips, trimmed mean with few contributors.


def noisy_copies(count: int, seed: int, rank: int = 4) -> list[dict[str, Tensor]]:
    """`count` honest adapters for expert 0.0 of layer 0: one shared direction plus 10 % noise each."""
    generator = torch.Generator().manual_seed(seed)
    base_a, base_b = torch.randn(rank, 4, generator=generator), torch.randn(6, rank, generator=generator)
    return [
        {
            adapter_key(UP, 0, "lora_A"): base_a + 0.1 * torch.randn(rank, 4, generator=generator),
            adapter_key(UP, 0, "lora_B"): base_b + 0.1 * torch.randn(6, rank, generator=generator),
        }
        for _ in range(count)
    ]


def dense(adapters: dict[str, Tensor]) -> Tensor:
    return adapters[adapter_key(UP, 0, "lora_B")] @ adapters[adapter_key(UP, 0, "lora_A")]


KEY = delta_key(UP, 0)


def test_norm_bound_scales_only_the_oversized_update_to_the_bound() -> None:
    honest = noisy_copies(4, seed=20)
    big = {**honest[0], adapter_key(UP, 0, "lora_B"): 100 * honest[0][adapter_key(UP, 0, "lora_B")]}
    adapters = [*honest, big]
    ids = ["h0", "h1", "h2", "h3", "big"]
    sources = [AdapterFactors(update_id, item, 1.0) for update_id, item in zip(ids, adapters, strict=True)]
    weights = [{"0.0": 1.0}] * 5
    bounded, report = run(sources, weights, AggregationConfig(norm_bound_multiplier=2.0))
    plain, plain_report = run(sources, weights, AggregationConfig())
    record = report.experts["0.0"]
    norms = [dense(item).double().norm().item() for item in adapters]
    assert [record.norms[update_id] for update_id in ids] == pytest.approx(norms, rel=1e-6)
    assert record.norm_bound is not None
    assert record.norm_bound == pytest.approx(2.0 * statistics.median(norms), rel=1e-6)
    assert set(record.scaled) == {"big"}
    scaled = record.scaled["big"]
    assert scaled["by"] == "norm_bound"
    assert scaled["factor"] == pytest.approx(record.norm_bound / record.norms["big"], rel=1e-12)
    assert scaled["factor"] == pytest.approx(2.0 * statistics.median(norms) / norms[4], rel=1e-6)
    assert 0.01 < scaled["factor"] < 0.03
    assert plain_report.experts["0.0"].scaled == {}
    assert plain_report.experts["0.0"].norm_bound is None
    # Exactly the weighted mean with the big delta scaled down to the bound.
    reference = torch.stack([*(dense(item) for item in honest), dense(big) * scaled["factor"]]).mean(dim=0)
    torch.testing.assert_close(bounded[KEY], reference, rtol=1e-5, atol=1e-5)
    honest_mean = torch.stack([dense(item) for item in honest]).mean(dim=0)
    moved_bounded = (bounded[KEY] - honest_mean).norm().item()
    moved_plain = (plain[KEY] - honest_mean).norm().item()
    assert moved_plain >= 10 * moved_bounded
    assert moved_plain >= 10 * honest_mean.norm().item()


def test_the_tighter_of_clip_norm_and_norm_bound_wins() -> None:
    honest = noisy_copies(3, seed=21)
    big = {**honest[0], adapter_key(UP, 0, "lora_B"): 10 * honest[0][adapter_key(UP, 0, "lora_B")]}
    sources = [AdapterFactors(f"u{index}", item, 1.0) for index, item in enumerate([*honest, big])]
    weights = [{"0.0": 1.0}] * 4
    norm_big = dense(big).double().norm().item()
    _, loose_clip = run(sources, weights, AggregationConfig(clip_norm=norm_big * 0.9, norm_bound_multiplier=1.5))
    assert loose_clip.experts["0.0"].scaled["u3"]["by"] == "norm_bound"
    _, tight_clip = run(sources, weights, AggregationConfig(clip_norm=1e-3, norm_bound_multiplier=1.5))
    entries = tight_clip.experts["0.0"].scaled
    assert set(entries) == {"u0", "u1", "u2", "u3"}
    assert {entry["by"] for entry in entries.values()} == {"clip_norm"}
    assert entries["u3"]["factor"] == pytest.approx(1e-3 / norm_big, rel=1e-6)


def test_norm_bound_needs_two_contributors() -> None:
    (only,) = noisy_copies(1, seed=22)
    emitted, report = run(
        [AdapterFactors("u", only, 1.0)], [{"0.0": 1.0}], AggregationConfig(norm_bound_multiplier=1.0)
    )
    assert report.experts["0.0"].norm_bound is None
    assert report.experts["0.0"].scaled == {}
    torch.testing.assert_close(emitted[KEY], dense(only))


def test_coordinate_median_resists_a_sign_flipped_update() -> None:
    honest = noisy_copies(4, seed=23)
    flipped = {**honest[0], adapter_key(UP, 0, "lora_B"): -honest[0][adapter_key(UP, 0, "lora_B")]}
    sources = [AdapterFactors(f"u{index}", item, 1.0) for index, item in enumerate([*honest, flipped])]
    weights = [{"0.0": 1.0}] * 5
    median, _ = run(sources, weights, AggregationConfig(method="coordinate_median"))
    mean, _ = run(sources, weights, AggregationConfig(method="weighted_mean"))
    honest_mean = torch.stack([dense(item) for item in honest]).mean(dim=0)
    from_median = (median[KEY] - honest_mean).norm().item()
    from_mean = (mean[KEY] - honest_mean).norm().item()
    # The mean moves by about 2/5 of the honest norm; the median stays within the honest spread.
    assert from_mean == pytest.approx((dense(flipped) - honest_mean).norm().item() / 5, rel=1e-5)
    assert from_median < 0.5 * from_mean


def test_trimmed_mean_notes_when_it_trims_nothing() -> None:
    three = noisy_copies(3, seed=24)
    sources = [AdapterFactors(f"u{index}", item, 1.0) for index, item in enumerate(three)]
    weights = [{"0.0": 1.0 + index} for index in range(3)]
    trimmed, report = run(sources, weights, AggregationConfig(method="trimmed_mean", trim_fraction=0.1))
    mean, _ = run(sources, weights, AggregationConfig())
    assert report.experts["0.0"].trimmed_per_end == 0
    assert len(report.notes) == 1
    assert report.notes[0].startswith("trimmed_mean with trim_fraction=0.1 trims nothing for 1 expert(s) (0.0)")
    torch.testing.assert_close(trimmed[KEY], mean[KEY])
    # The plain weighted mean does not warn.
    assert run(sources, weights, AggregationConfig())[1].notes == []


def test_trimmed_mean_with_ten_contributors_trims_one_per_end() -> None:
    ten = noisy_copies(10, seed=25)
    sources = [AdapterFactors(f"u{index}", item, 1.0) for index, item in enumerate(ten)]
    weights = [{"0.0": 1.0}] * 10
    trimmed, report = run(sources, weights, AggregationConfig(method="trimmed_mean", trim_fraction=0.1))
    mean, _ = run(sources, weights, AggregationConfig())
    assert report.notes == []
    assert report.experts["0.0"].trimmed_per_end == 1
    stack = torch.stack([dense(item) for item in ten]).sort(dim=0).values
    torch.testing.assert_close(trimmed[KEY], stack[1:9].mean(dim=0), rtol=1e-5, atol=1e-6)
    assert (trimmed[KEY] - mean[KEY]).abs().max().item() > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# The measured problem: one device claiming 1,000× the routed tokens made the coordinate median return its delta.


def liar_round(max_update_share: float | None) -> tuple[Tensor, Tensor, Tensor, list[dict[str, float]]]:
    """Four honest updates (100 routed tokens each) and a liar (100,000) whose delta points the other way.

    Returns the coordinate-median aggregate, the honest coordinate median, the liar's delta and the weights.
    """
    honest = noisy_copies(4, seed=26)
    liar = {**honest[0], adapter_key(UP, 0, "lora_B"): -honest[0][adapter_key(UP, 0, "lora_B")]}
    adapters = [*honest, liar]
    facts = [
        UpdateFacts(f"u{index}", frozenset({"0.0"}), staleness=0, examples=50, routed_tokens={"0.0": tokens})
        for index, tokens in enumerate([100, 100, 100, 100, 100_000])
    ]
    weights = expert_weights(facts, WeightingConfig(max_update_share=max_update_share))
    sources = [AdapterFactors(fact.update_id, item, 1.0) for fact, item in zip(facts, adapters, strict=True)]
    emitted, _ = run(sources, weights, AggregationConfig(method="coordinate_median"))
    honest_median = weighted_coordinate_median(torch.stack([dense(item) for item in honest]), torch.ones(4))
    return emitted[KEY], honest_median, dense(liar), weights


def test_without_the_share_cap_the_liar_gets_its_own_delta_back() -> None:
    result, _, liar, weights = liar_round(max_update_share=None)
    assert weights[4]["0.0"] == pytest.approx(100_000 / 100_400)
    assert torch.equal(result, liar)


def test_default_share_cap_keeps_the_median_from_returning_the_liars_delta() -> None:
    cap = WeightingConfig().max_update_share
    assert cap is not None
    result, honest_median, liar, weights = liar_round(max_update_share=cap)
    assert [weight["0.0"] for weight in weights] == pytest.approx([(1 - cap) / 4] * 4 + [cap])
    gap = (liar - honest_median).norm().item()
    assert (result - liar).norm().item() > 0.25 * gap


def test_default_share_cap_gives_the_honest_median() -> None:
    result, honest_median, liar, _ = liar_round(max_update_share=WeightingConfig().max_update_share)
    gap = (liar - honest_median).norm().item()
    assert (result - honest_median).norm().item() <= 0.2 * gap
    assert (result - liar).norm().item() >= 0.8 * gap


def test_share_cap_below_one_half_gives_the_honest_median() -> None:
    result, honest_median, liar, weights = liar_round(max_update_share=0.4)
    assert weights[4]["0.0"] == pytest.approx(0.4)
    gap = (liar - honest_median).norm().item()
    assert (result - honest_median).norm().item() <= 0.2 * gap
    assert (result - liar).norm().item() >= 0.8 * gap
