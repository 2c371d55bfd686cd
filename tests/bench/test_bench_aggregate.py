"""The aggregation benchmark's two sides agree: ours (factored, lazy factor files) and the Flower-style dense average
give the same merged weights of a `tiny` model from the same update files, and both match a float64 reference."""

from pathlib import Path

import numpy as np
import pytest
import torch

from bench.aggregate import (
    LayerSubset,
    aggregate_flower_style,
    aggregate_ours,
    experts_of_shapes,
    float64_reference,
    flower_weighted_average,
    relative_error,
    subset_keys,
    update_weights,
    write_updates,
)
from fednested.aggregation.factors import FactorFile
from fednested.deltas import expert_param_shapes
from fednested.models import build_model

SCALE = 2.0  # alpha 16 / rank 8
COUNT = 3


@pytest.fixture
def updates(tmp_path: Path) -> tuple[list[Path], list[dict[str, float]], dict[str, tuple[int, int, int]]]:
    shapes = expert_param_shapes(build_model("tiny", seed=0))
    # B large enough that ΔW is far above one ulp of the weights, so comparing merged weights compares the deltas
    paths = write_updates(tmp_path, shapes, COUNT, rank=8, b_std=0.05, seed=1)
    return paths, update_weights(experts_of_shapes(shapes), COUNT, seed=2), shapes


def _expert_params(model: torch.nn.Module, shapes: dict[str, tuple[int, int, int]]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {name: params[name].detach().clone() for name in shapes}


def _max_relative(
    left: dict[str, torch.Tensor], right: dict[str, torch.Tensor], base: dict[str, torch.Tensor]
) -> float:
    """max|left − right| over max|right − base|: how far apart two merges are, relative to the merged delta."""
    difference = max(float((left[name] - right[name]).abs().max()) for name in right)
    return difference / max(float((right[name] - base[name]).abs().max()) for name in right)


def test_ours_and_flower_style_merge_the_same_weights(updates) -> None:
    paths, weights, shapes = updates
    base = _expert_params(build_model("tiny", seed=0), shapes)
    ours_model, flower_model = build_model("tiny", seed=0), build_model("tiny", seed=0)

    report = aggregate_ours(paths, weights, SCALE, ours_model)
    keys = subset_keys(shapes, frozenset({0, 1}))
    aggregate_flower_style(paths, weights, SCALE, flower_model, keys)

    ours, flower = _expert_params(ours_model, shapes), _expert_params(flower_model, shapes)
    assert report.deltas == len(keys) == 2 * 2 * 4  # 2 layers × 2 fused tensors × 4 experts
    assert all(float((flower[name] - base[name]).abs().max()) > 1e-3 for name in shapes), "merge changed nothing"
    assert _max_relative(ours, flower, base) <= 1e-5


def test_ours_matches_a_float64_reference_per_key(updates) -> None:
    paths, weights, _ = updates
    sources = [FactorFile(f"u{index}", path, SCALE) for index, path in enumerate(paths)]
    errors: dict[str, float] = {}

    def check(key: str, delta: torch.Tensor) -> None:
        errors[key] = relative_error(delta, float64_reference(sources, weights, key))

    aggregate_ours(paths, weights, SCALE, build_model("tiny", seed=0), emit=check)
    assert len(errors) == 16
    assert max(errors.values()) <= 1e-6


def test_layer_subset_merges_only_its_layers_and_matches_flower_style(updates) -> None:
    paths, weights, shapes = updates
    base = _expert_params(build_model("tiny", seed=0), shapes)
    ours_model, flower_model = build_model("tiny", seed=0), build_model("tiny", seed=0)

    report = aggregate_ours(paths, weights, SCALE, ours_model, layers=frozenset({1}))
    aggregate_flower_style(paths, weights, SCALE, flower_model, subset_keys(shapes, frozenset({1})))

    ours, flower = _expert_params(ours_model, shapes), _expert_params(flower_model, shapes)
    assert report.deltas == 8
    layer_0 = [name for name in shapes if ".layers.0." in name]
    layer_1 = [name for name in shapes if ".layers.1." in name]
    for name in layer_0:
        assert torch.equal(ours[name], base[name])
        assert torch.equal(flower[name], base[name])
    assert _max_relative({n: ours[n] for n in layer_1}, {n: flower[n] for n in layer_1}, base) <= 1e-5
    with pytest.raises(KeyError, match="outside layers"):
        LayerSubset(FactorFile("u0", paths[0], SCALE), frozenset({1})).read(
            "model.layers.0.mlp.experts.down_proj/expert=0"
        )


def test_flower_weighted_average_is_the_weighted_mean_per_layer() -> None:
    first = [np.array([1.0, 2.0], dtype=np.float32), np.array([4.0], dtype=np.float32)]
    second = [np.array([3.0, 6.0], dtype=np.float32), np.array([0.0], dtype=np.float32)]
    averaged = flower_weighted_average([(first, [1.0, 3.0]), (second, [3.0, 1.0])])
    np.testing.assert_allclose(averaged[0], [2.5, 5.0])
    np.testing.assert_allclose(averaged[1], [3.0])
