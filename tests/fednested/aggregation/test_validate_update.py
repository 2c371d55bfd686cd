"""validate_update: every rejection code it can raise, with the tensor named, and what a valid update yields."""

from __future__ import annotations

import math

import pytest
import torch

from fednested.adapters.lora import ExpertLoraConfig, adapter_key
from fednested.aggregation.rejections import RejectionCode, UpdateRejected
from fednested.aggregation.validation import UpdateLimits, expert_shapes_of, lora_delta_norm, validate_update
from fednested.checkpoints.manifest import Manifest
from fednested.deltas import delta_key, expert_deltas_from_adapters
from fednested.partition import ParamPartition, PartitionKey, PartitionMap

UP = "model.layers.0.mlp.experts.gate_up_proj"
DOWN = "model.layers.0.mlp.experts.down_proj"
DOWN1 = "model.layers.1.mlp.experts.down_proj"
SHAPES = {UP: (4, 8, 4), DOWN: (4, 4, 4), DOWN1: (4, 4, 4)}
CONFIG = ExpertLoraConfig(rank=2, alpha=2)
LIMITS = UpdateLimits()


def adapters_for(pairs: list[tuple[str, int]], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for param, expert in pairs:
        _, out_features, in_features = SHAPES[param]
        tensors[adapter_key(param, expert, "lora_A")] = torch.randn(CONFIG.rank, in_features, generator=generator)
        tensors[adapter_key(param, expert, "lora_B")] = torch.randn(out_features, CONFIG.rank, generator=generator)
    return tensors


def rejection(adapters: dict[str, torch.Tensor], limits: UpdateLimits = LIMITS, **kwargs: object) -> UpdateRejected:
    config = kwargs.pop("config", CONFIG)
    assert isinstance(config, ExpertLoraConfig)
    with pytest.raises(UpdateRejected) as caught:
        validate_update(adapters, config, SHAPES, limits, client_id="car-7")
    return caught.value


def test_valid_update_reports_experts_and_exact_norms() -> None:
    adapters = adapters_for([(UP, 1), (DOWN, 1), (DOWN1, 3)])
    adapters = {key: tensor.to(torch.bfloat16) if "lora_A" in key else tensor for key, tensor in adapters.items()}
    result = validate_update(adapters, CONFIG, SHAPES, LIMITS)
    assert result.experts == {"0.1", "1.3"}
    assert all(tensor.dtype == torch.float32 for tensor in result.adapters.values())
    dense = expert_deltas_from_adapters(result.adapters, CONFIG, SHAPES)
    for key, delta in dense.items():
        assert result.delta_norms[key] == pytest.approx(float(delta.norm()), rel=1e-5)
    assert result.total_norm == pytest.approx(math.sqrt(sum(float(d.norm()) ** 2 for d in dense.values())), rel=1e-5)
    expected_bytes = sum(t.numel() * t.element_size() for t in adapters.values())
    assert result.payload_bytes == expected_bytes


def test_gram_norm_equals_dense_norm() -> None:
    generator = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 40, generator=generator), torch.randn(30, 5, generator=generator)
    assert lora_delta_norm(a, b, 0.5) == pytest.approx(float((0.5 * b.double() @ a.double()).norm()), rel=1e-12)


def test_empty_payload_is_malformed() -> None:
    assert rejection({}).code is RejectionCode.MALFORMED


def test_oversized_is_checked_before_anything_else() -> None:
    adapters = adapters_for([(UP, 0)])
    adapters["garbage"] = torch.zeros(10)
    error = rejection(adapters, UpdateLimits(max_bytes=64))
    assert error.code is RejectionCode.OVERSIZED
    assert "the limit is 64" in error.message


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        ("model.embed_tokens.weight", "is not '<param>/expert=<e>/lora_A|lora_B'"),
        ("model.layers.0.self_attn.q_proj/expert=0/lora_A", "the base has no fused expert tensor"),
        (adapter_key(UP, 4, "lora_A"), "expert 4 does not exist"),
    ],
)
def test_unknown_tensor_names_are_rejected_and_named(key: str, fragment: str) -> None:
    adapters = adapters_for([(UP, 0)])
    adapters[key] = torch.zeros(2, 4)
    error = rejection(adapters)
    assert error.code is RejectionCode.BAD_TENSOR_NAMES
    assert key in error.message
    assert fragment in error.message
    assert str(error).startswith("bad_tensor_names: client car-7: ")


def test_half_a_lora_pair_is_rejected() -> None:
    adapters = adapters_for([(UP, 0)])
    del adapters[adapter_key(UP, 0, "lora_B")]
    error = rejection(adapters)
    assert error.code is RejectionCode.BAD_TENSOR_NAMES
    assert f"'{adapter_key(UP, 0, 'lora_B')}' is missing" in error.message


def test_experts_outside_the_adapter_config_are_rejected() -> None:
    narrow = ExpertLoraConfig(rank=2, alpha=2, layers=[0], experts=[0, 1], targets=("down_proj",))
    assert "adapts experts [0, 1], not 2" in rejection(adapters_for([(DOWN, 2)]), config=narrow).message
    assert "adapts layers [0], not 1" in rejection(adapters_for([(DOWN1, 0)]), config=narrow).message
    assert "targets ['down_proj'], not 'gate_up_proj'" in rejection(adapters_for([(UP, 0)]), config=narrow).message


def test_many_bad_names_are_summarised() -> None:
    adapters = adapters_for([(UP, 0)])
    adapters.update({f"junk{i}": torch.zeros(1) for i in range(8)})
    assert "and 3 more" in rejection(adapters).message


def test_integer_or_double_tensors_are_bad_dtype() -> None:
    adapters = adapters_for([(DOWN, 0)])
    key = adapter_key(DOWN, 0, "lora_A")
    adapters[key] = adapters[key].to(torch.int32)
    error = rejection(adapters)
    assert error.code is RejectionCode.BAD_DTYPE
    assert f"{key} (torch.int32)" in error.message
    adapters[key] = adapters[key].to(torch.float64)
    assert rejection(adapters).code is RejectionCode.BAD_DTYPE


def test_wrong_rank_or_size_is_bad_shapes() -> None:
    adapters = adapters_for([(DOWN, 0)])
    key = adapter_key(DOWN, 0, "lora_B")
    adapters[key] = torch.zeros(4, 3)
    error = rejection(adapters)
    assert error.code is RejectionCode.BAD_SHAPES
    assert f"{key} has [4, 3], expected [4, 2]" in error.message


def test_non_finite_names_the_tensor_and_count() -> None:
    adapters = adapters_for([(UP, 0), (DOWN, 2)])
    key = adapter_key(DOWN, 2, "lora_A")
    adapters[key][0, 0] = float("nan")
    adapters[key][1, 3] = float("inf")
    error = rejection(adapters)
    assert error.code is RejectionCode.NON_FINITE
    assert error.message == f"{key} holds 2 NaN/Inf of 8 values"


def test_per_delta_norm_limit() -> None:
    adapters = adapters_for([(UP, 0), (DOWN, 0)])
    norms = validate_update(adapters, CONFIG, SHAPES, LIMITS).delta_norms
    largest = max(norms, key=lambda key: norms[key])
    error = rejection(adapters, UpdateLimits(max_delta_norm=norms[largest] * 0.99))
    assert error.code is RejectionCode.NORM_EXCEEDED
    assert largest in error.message
    validate_update(adapters, CONFIG, SHAPES, UpdateLimits(max_delta_norm=norms[largest] * 1.01))


def test_total_norm_limit() -> None:
    adapters = adapters_for([(UP, 0), (DOWN, 0)])
    total = validate_update(adapters, CONFIG, SHAPES, LIMITS).total_norm
    error = rejection(adapters, UpdateLimits(max_total_norm=total * 0.99))
    assert error.code is RejectionCode.NORM_EXCEEDED
    assert "the total delta norm is" in error.message


def test_overflowing_norm_is_exceeded_not_accepted() -> None:
    adapters = adapters_for([(DOWN, 0)])
    adapters = {key: tensor * 1e200 if "lora_B" in key else tensor for key, tensor in adapters.items()}
    # 1e200 overflows fp32 to inf, so this is caught as non-finite before any norm is taken.
    assert rejection(adapters, UpdateLimits(max_total_norm=1.0)).code is RejectionCode.NON_FINITE
    big = {key: tensor * 3e18 for key, tensor in adapters_for([(DOWN, 0)]).items()}
    assert delta_key(DOWN, 0) in rejection(big, UpdateLimits(max_delta_norm=1e30)).message


def test_shapes_come_from_a_version_manifest() -> None:
    partition = PartitionMap(
        params={
            "model.embed_tokens.weight": ParamPartition(shape=(10, 4), key=PartitionKey("core")),
            UP: ParamPartition(shape=SHAPES[UP], expert_layer=0),
        }
    )
    manifest = Manifest(
        version_id="v1", kind="version", parent_version=None, architecture={}, files={}, partition=partition
    )
    assert expert_shapes_of(manifest) == {UP: SHAPES[UP]}
    assert validate_update(adapters_for([(UP, 2)]), CONFIG, manifest, LIMITS).experts == {"0.2"}
    update_manifest = Manifest(version_id="u1", kind="update", parent_version="v1", architecture={}, files={})
    with pytest.raises(ValueError, match="manifest of 'u1' has no partition map"):
        expert_shapes_of(update_manifest)


def test_limits_check_their_fields() -> None:
    with pytest.raises(ValueError, match="max_bytes must be > 0"):
        UpdateLimits(max_bytes=0)
    with pytest.raises(ValueError, match="max_total_norm must be None or a finite number > 0"):
        UpdateLimits(max_total_norm=float("nan"))
    with pytest.raises(ValueError, match="allowed_dtypes must be a non-empty set of float dtypes"):
        UpdateLimits(allowed_dtypes=frozenset({torch.int8}))


def test_every_code_has_a_description() -> None:
    assert all(code.description for code in RejectionCode)
    assert RejectionCode("too_stale") is RejectionCode.TOO_STALE
