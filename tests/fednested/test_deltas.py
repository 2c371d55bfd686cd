"""Dense per-expert deltas: merged model equals the adapter model; sums of deltas equal deltas applied in turn."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch

from fednested.adapters import ExpertLoraConfig, adapter_state_dict, attach_expert_adapters, trainable_parameters
from fednested.deltas import (
    DeltaError,
    delta_key,
    expert_deltas,
    expert_deltas_from_adapters,
    expert_param_shapes,
    merge_expert_deltas,
    parse_delta_key,
    weighted_sum,
)
from fednested.models import FAMILIES, build_model, model_fingerprint
from fednested.partition import partition_model

VOCAB = 4096
# fp32 logits of the merged model vs the adapter model: both compute W·x + s·B·A·x, in a different order
MERGE_ATOL = 1e-5


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def token_batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(seed))


def trained_adapters(family: str, config: ExpertLoraConfig, seed: int) -> torch.nn.Module:
    peft_model = attach_expert_adapters(build_model("tiny", family), config)
    optimizer = torch.optim.AdamW(trainable_parameters(peft_model), lr=2e-2)
    ids = token_batch(seed)
    peft_model.train()
    for _ in range(3):
        peft_model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    return peft_model


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_model_logits_equal_the_adapter_model(family: str) -> None:
    peft_model = trained_adapters(family, ExpertLoraConfig(rank=4, alpha=8, experts=[0, 1, 3]), seed=1)
    ids = token_batch(seed=7)
    with torch.no_grad():
        adapted = peft_model(ids).logits
    plain = build_model("tiny", family)
    deltas = expert_deltas(peft_model)
    assert len(deltas) == 2 * 2 * 3  # layers x targets x experts
    merge_expert_deltas(plain, deltas)
    with torch.no_grad():
        merged = plain(ids).logits
    torch.testing.assert_close(merged, adapted, rtol=0, atol=MERGE_ATOL)


def test_delta_is_scale_times_b_times_a() -> None:
    config = ExpertLoraConfig(rank=4, alpha=12, experts=[2])
    peft_model = trained_adapters("mixtral", config, seed=2)
    adapters = adapter_state_dict(peft_model)
    deltas = expert_deltas(peft_model)
    key = "model.layers.1.mlp.experts.down_proj"
    expected = (adapters[f"{key}/expert=2/lora_B"] @ adapters[f"{key}/expert=2/lora_A"]) * 3.0  # alpha / rank
    assert torch.equal(deltas[f"{key}/expert=2"], expected)
    assert deltas[f"{key}/expert=2"].shape == (128, 256)
    assert deltas[f"{key}/expert=2"].dtype == torch.float32


def test_server_side_deltas_need_only_adapters_config_and_shapes() -> None:
    config = ExpertLoraConfig(rank=2, experts=[0, 3])
    peft_model = trained_adapters("qwen2_moe", config, seed=3)
    partition = partition_model(build_model("tiny", "qwen2_moe"))
    shapes = {name: entry.shape for name, entry in partition.fused_expert_params().items()}
    from_tensors = expert_deltas_from_adapters(adapter_state_dict(peft_model), config, shapes)
    live = expert_deltas(peft_model)
    assert sorted(from_tensors) == sorted(live)
    assert all(torch.equal(from_tensors[k], live[k]) for k in live)
    assert expert_param_shapes(peft_model) == shapes


def test_merging_the_weighted_sum_equals_merging_each_delta_scaled() -> None:
    updates = [
        expert_deltas(trained_adapters("mixtral", ExpertLoraConfig(rank=2, experts=experts), seed=seed))
        for seed, experts in ((1, [0, 1]), (2, [1]), (3, [3]))
    ]
    weights = [0.5, 0.3, 0.2]
    eta = 0.7
    at_once = build_model("tiny", "mixtral")
    merge_expert_deltas(at_once, weighted_sum(updates, weights), eta=eta)
    one_by_one = build_model("tiny", "mixtral")
    for update, weight in zip(updates, weights, strict=True):
        merge_expert_deltas(one_by_one, update, eta=eta * weight)
    for (name, a), (_, b) in zip(at_once.named_parameters(), one_by_one.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    # expert 2 is in no update: its slices stay bitwise what they were; expert 3's moved
    fresh = dict(build_model("tiny", "mixtral").named_parameters())
    merged = dict(at_once.named_parameters())
    fused = [name for name in merged if name.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert fused
    assert all(f"{name}/expert=2" not in update for update in updates for name in fused)
    for name in fused:
        assert torch.equal(merged[name][2], fresh[name][2]), name
        assert not torch.equal(merged[name][3], fresh[name][3]), name


def test_weighted_sum_treats_missing_keys_as_zero_and_checks_shapes() -> None:
    a = {delta_key("w", 0): torch.ones(2, 2)}
    b = {delta_key("w", 0): torch.full((2, 2), 3.0), delta_key("w", 1): torch.ones(2, 2)}
    total = weighted_sum([a, b], [0.5, 2.0])
    assert torch.equal(total["w/expert=0"], torch.full((2, 2), 6.5))
    assert torch.equal(total["w/expert=1"], torch.full((2, 2), 2.0))
    with pytest.raises(DeltaError, match=r"delta set 1: 'w/expert=0' has shape \[3, 2\], earlier sets have \[2, 2\]"):
        weighted_sum([a, {delta_key("w", 0): torch.ones(3, 2)}], [1.0, 1.0])
    with pytest.raises(DeltaError, match="2 delta sets but 1 weights"):
        weighted_sum([a, b], [1.0])
    with pytest.raises(DeltaError, match="weight 0 is not finite"):
        weighted_sum([a], [float("nan")])


def test_bad_adapters_and_deltas_are_named() -> None:
    config = ExpertLoraConfig(rank=2, experts=[1])
    model = build_model("tiny", "mixtral")
    adapters = adapter_state_dict(attach_expert_adapters(build_model("tiny", "mixtral"), config))
    key = "model.layers.0.mlp.experts.down_proj/expert=1/lora_B"
    with pytest.raises(DeltaError, match=rf"'{key}' has shape \[128, 3\], expected \[128, 2\]"):
        expert_deltas_from_adapters({**adapters, key: torch.zeros(128, 3)}, config, model)
    without_b = {k: v for k, v in adapters.items() if k != key}
    with pytest.raises(DeltaError, match=f"'{key}' is missing"):
        expert_deltas_from_adapters(without_b, config, model)
    with pytest.raises(DeltaError, match="expert out of range, the base has 4 experts"):
        expert_deltas_from_adapters(
            {"model.layers.0.mlp.experts.down_proj/expert=9/lora_A": torch.zeros(2, 256)}, config, model
        )
    with pytest.raises(DeltaError, match="no fused expert tensor"):
        expert_deltas_from_adapters(
            {"model.layers.0.self_attn.q_proj/expert=0/lora_A": torch.zeros(2, 8)}, config, model
        )
    with pytest.raises(DeltaError, match="is not named"):
        expert_deltas_from_adapters({"garbage": torch.zeros(1)}, config, model)
    with pytest.raises(DeltaError, match=r"has shape \[3, 3\], expected \[128, 256\]"):
        merge_expert_deltas(model, {"model.layers.0.mlp.experts.down_proj/expert=0": torch.zeros(3, 3)})
    with pytest.raises(DeltaError, match="holds NaN"):
        merge_expert_deltas(
            model, {"model.layers.0.mlp.experts.down_proj/expert=0": torch.full((128, 256), float("inf"))}
        )
    with pytest.raises(DeltaError, match=r"no parameter 'model\.layers\.7\.mlp\.experts\.down_proj'"):
        merge_expert_deltas(model, {"model.layers.7.mlp.experts.down_proj/expert=0": torch.zeros(128, 256)})
    with pytest.raises(DeltaError, match="not '<param>/expert=<e>'"):
        parse_delta_key("model.layers.0.mlp.experts.down_proj")


def test_a_failed_merge_writes_nothing() -> None:
    model = build_model("tiny", "mixtral")
    before = model_fingerprint(model)
    good = {"model.layers.0.mlp.experts.down_proj/expert=0": torch.ones(128, 256)}
    bad = {"model.layers.1.mlp.experts.down_proj/expert=0": torch.ones(1, 1)}
    with pytest.raises(DeltaError):
        merge_expert_deltas(model, {**good, **bad})
    assert model_fingerprint(model) == before


def test_merging_into_an_adapter_model_is_refused() -> None:
    peft_model = attach_expert_adapters(copy.deepcopy(build_model()), ExpertLoraConfig())
    with pytest.raises(DeltaError, match="plain base model"):
        merge_expert_deltas(peft_model, {})
