"""Every parameter (and every expert slice of a fused tensor) lands in exactly one partition."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import torch

from fednested.models import FAMILIES, build_model, count_parameters
from fednested.partition import (
    CORE,
    PartitionError,
    PartitionKey,
    PartitionMap,
    classify_parameter,
    partition_model,
)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("family", FAMILIES)
def test_partition_is_complete_and_disjoint_and_counts_add_up(family: str) -> None:
    model = build_model("tiny", family)
    partition = partition_model(model)
    names = [name for name, _ in model.named_parameters()]
    assert sorted(partition) == sorted(names)
    # every scalar of every parameter is claimed by exactly one partition: walk each slice once
    claims: Counter[tuple[str, int | None]] = Counter()
    for key in partition.partition_keys():
        for ref in partition.members(key):
            claims[(ref.name, ref.expert_index)] += 1
    assert set(claims.values()) == {1}
    for name, param in model.named_parameters():
        entry = partition[name]
        slices = [(name, None)] if not entry.is_fused_experts else [(name, e) for e in range(param.shape[0])]
        assert all(claims[s] == 1 for s in slices), name
    assert partition.total_parameters() == count_parameters(model)
    assert sum(partition.counts_by_kind().values()) == count_parameters(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_expert_tensors_are_split_per_expert(family: str) -> None:
    model = build_model("tiny", family)
    partition = partition_model(model)
    layers, experts = model.config.num_hidden_layers, 4
    expert_keys = [k for k in partition.partition_keys() if k.kind == "expert"]
    assert expert_keys == [PartitionKey("expert", layer, e) for layer in range(layers) for e in range(experts)]
    members = partition.members(PartitionKey("expert", 1, 2))
    assert [(m.name, m.expert_index) for m in members] == [
        ("model.layers.1.mlp.experts.down_proj", 2),
        ("model.layers.1.mlp.experts.gate_up_proj", 2),
    ]
    gate_up = model.model.layers[1].mlp.experts.gate_up_proj
    per_expert = partition.parameter_counts()[PartitionKey("expert", 1, 2)]
    assert per_expert == (gate_up.numel() + model.model.layers[1].mlp.experts.down_proj.numel()) // experts
    assert partition.partition_of("model.layers.1.mlp.experts.gate_up_proj", 3) == PartitionKey("expert", 1, 3)
    assert partition.expert_layers() == dict.fromkeys(range(layers), experts)


def test_routers_are_gates_and_the_rest_is_core() -> None:
    partition = partition_model(build_model("tiny", "mixtral"))
    assert partition.partition_of("model.layers.0.mlp.gate.weight") == PartitionKey("gate", 0)
    assert partition.partition_of("model.layers.1.self_attn.q_proj.weight") == CORE
    assert partition.partition_of("model.embed_tokens.weight") == CORE
    assert partition.partition_of("lm_head.weight") == CORE


def test_qwen_shared_expert_is_core_and_its_gate_is_a_gate() -> None:
    partition = partition_model(build_model("tiny", "qwen2_moe"))
    assert partition.partition_of("model.layers.0.mlp.shared_expert.up_proj.weight") == CORE
    assert partition.partition_of("model.layers.0.mlp.shared_expert_gate.weight") == PartitionKey("gate", 0)
    gate_members = partition.members(PartitionKey("gate", 1))
    assert [m.name for m in gate_members] == [
        "model.layers.1.mlp.gate.weight",
        "model.layers.1.mlp.shared_expert_gate.weight",
    ]


def test_json_round_trip_preserves_the_map() -> None:
    partition = partition_model(build_model("tiny", "qwen2_moe"))
    again = PartitionMap.from_json(partition.to_json())
    assert again == partition
    assert again.parameter_counts() == partition.parameter_counts()


def test_partition_keys_print_and_parse() -> None:
    for key in (CORE, PartitionKey("gate", 3), PartitionKey("expert", 2, 7)):
        assert PartitionKey.parse(str(key)) == key
    with pytest.raises(PartitionError, match="malformed partition key 'expert/layer=x'"):
        PartitionKey.parse("expert/layer=x")
    with pytest.raises(PartitionError, match="needs both a layer and an expert"):
        PartitionKey("expert", 1)


def test_bad_inputs_are_named() -> None:
    with pytest.raises(PartitionError, match=r"model\.layers\.0\.mlp\.experts\.down_proj: a fused expert tensor"):
        classify_parameter("model.layers.0.mlp.experts.down_proj", (3, 8, 8), num_experts=4)
    with pytest.raises(PartitionError, match="not valid JSON"):
        PartitionMap.from_json("{")
    with pytest.raises(PartitionError, match="entry for 'w' is malformed"):
        PartitionMap.from_dict({"format": "fednested.partition/1", "params": {"w": {"shape": [2]}}})
    partition = partition_model(build_model("tiny", "mixtral"))
    with pytest.raises(PartitionError, match="give an expert index"):
        partition.partition_of("model.layers.0.mlp.experts.down_proj")
    with pytest.raises(PartitionError, match="'nope' is not in the partition map"):
        partition.partition_of("nope")


def test_per_expert_module_layouts_are_experts_too() -> None:
    entry = classify_parameter("model.layers.4.mlp.experts.3.w1.weight", (16, 8), num_experts=None)
    assert entry.key == PartitionKey("expert", 4, 3)
