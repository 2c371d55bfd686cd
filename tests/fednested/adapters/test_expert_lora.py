"""Per-expert LoRA through PEFT: frozen base, selected layers/experts only, routed forward equal to transformers'."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from peft import PeftModel

from fednested.adapters import (
    AdapterError,
    ExpertLoraConfig,
    ExpertLoraLayer,
    adapter_state_dict,
    attach_expert_adapters,
    expected_adapter_shapes,
    expert_lora_config,
    expert_lora_layers,
    load_adapter_state_dict,
    routed_experts_forward,
    set_expert_recompute,
    trainable_parameters,
)
from fednested.models import FAMILIES, build_model

VOCAB = 4096


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def token_batch(seed: int = 0, batch: int = 4, length: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def train_steps(model: torch.nn.Module, ids: torch.Tensor, steps: int, lr: float = 1e-2) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Base tensors of a plain or PEFT-wrapped model under the plain model's names."""
    state = {}
    for name, tensor in model.state_dict().items():
        if ".lora_" in name:
            continue
        state[name.removeprefix("base_model.model.").replace(".base_layer.", ".")] = tensor.clone()
    return state


@pytest.mark.parametrize("family", FAMILIES)
def test_routed_forward_matches_transformers_experts(family: str) -> None:
    model = build_model("tiny", family)
    experts = model.model.layers[0].mlp.experts
    hidden = torch.randn(40, 128, generator=torch.Generator().manual_seed(1))
    logits = torch.randn(40, 4, generator=torch.Generator().manual_seed(2))
    weights, index = torch.topk(logits.softmax(-1), 2)
    with torch.no_grad():
        ours = routed_experts_forward(experts, hidden, index, weights)
        theirs = experts(hidden, index, weights)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_attach_freezes_the_base_and_adapts_only_the_selected_experts(family: str) -> None:
    model = build_model("tiny", family)
    ids = token_batch()
    with torch.no_grad():
        before = model(ids).logits
    config = ExpertLoraConfig(rank=4, alpha=8, layers=[1], experts=[0, 2])
    peft_model = attach_expert_adapters(model, config)
    assert isinstance(peft_model, PeftModel)
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable
    assert all(".lora_" in name and ".layers.1.mlp.experts." in name for name in trainable)
    assert sum(p.numel() for p in trainable_parameters(peft_model)) == 2 * 4 * (128 + 512 + 256 + 128)
    assert sorted(adapter_state_dict(peft_model)) == sorted(
        f"model.layers.1.mlp.experts.{target}/expert={e}/{factor}"
        for target in ("gate_up_proj", "down_proj")
        for e in (0, 2)
        for factor in ("lora_A", "lora_B")
    )
    assert expected_adapter_shapes(peft_model)["model.layers.1.mlp.experts.down_proj/expert=2/lora_B"] == (128, 4)
    assert expert_lora_config(peft_model) is config
    # B starts at zero, so the adapted model computes exactly what the base did
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_changes_adapters_and_leaves_every_base_tensor_bitwise_unchanged(family: str) -> None:
    model = build_model("tiny", family)
    reference = base_state(model)
    peft_model = attach_expert_adapters(model, ExpertLoraConfig(rank=4, experts=[1, 3]))
    initial = adapter_state_dict(peft_model)
    losses = train_steps(peft_model, token_batch(), steps=5)
    assert losses[-1] < losses[0]
    after = base_state(peft_model)
    assert sorted(after) == sorted(reference)
    for name, tensor in reference.items():
        assert torch.equal(after[name], tensor), f"base tensor {name} changed"
    trained = adapter_state_dict(peft_model)
    assert any(not torch.equal(trained[k], initial[k]) for k in trained if k.endswith("lora_B"))


def test_same_init_seed_gives_the_same_adapters_and_another_seed_differs() -> None:
    first = adapter_state_dict(attach_expert_adapters(build_model(), ExpertLoraConfig(init_seed=3)))
    again = adapter_state_dict(attach_expert_adapters(build_model(), ExpertLoraConfig(init_seed=3)))
    other = adapter_state_dict(attach_expert_adapters(build_model(), ExpertLoraConfig(init_seed=4)))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if k.endswith("lora_A"))


def test_adapter_state_round_trips_into_a_fresh_model() -> None:
    trained = attach_expert_adapters(build_model(), ExpertLoraConfig(rank=2, experts=[0, 1]))
    train_steps(trained, token_batch(), steps=2)
    state = adapter_state_dict(trained)
    fresh = attach_expert_adapters(build_model(), ExpertLoraConfig(rank=2, experts=[0, 1]))
    load_adapter_state_dict(fresh, state)
    ids = token_batch(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, trained(ids).logits, rtol=0, atol=0)


def test_loading_mismatched_adapter_tensors_names_the_key() -> None:
    model = attach_expert_adapters(build_model(), ExpertLoraConfig(rank=2, experts=[0]))
    state = adapter_state_dict(model)
    key = "model.layers.0.mlp.experts.gate_up_proj/expert=0/lora_A"
    with pytest.raises(AdapterError, match=r"expert=0/lora_A' has shape \[3, 128\], expected \[2, 128\]"):
        load_adapter_state_dict(model, {**state, key: torch.zeros(3, 128)})
    with pytest.raises(AdapterError, match="do not exist on this model"):
        load_adapter_state_dict(
            model, {**state, "model.layers.0.mlp.experts.down_proj/expert=3/lora_A": torch.zeros(2, 256)}
        )
    missing = dict(state)
    del missing[key]
    with pytest.raises(AdapterError, match="are missing"):
        load_adapter_state_dict(model, missing)
    with pytest.raises(AdapterError, match="NaN or infinite"):
        load_adapter_state_dict(model, {**state, key: torch.full((2, 128), float("nan"))})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"rank": 0}, "ExpertLoraConfig.rank must be at least 1, got 0"),
        ({"rank": 2.5}, "ExpertLoraConfig.rank must be an integer, got 2.5"),
        (
            {"targets": ("q_proj",)},
            "ExpertLoraConfig.targets must be a non-empty subset of ('gate_up_proj', 'down_proj'), got ['q_proj']",
        ),
        ({"targets": ()}, "ExpertLoraConfig.targets must have at least 1 item(s), got ()"),
        ({"dropout": 1.0}, "ExpertLoraConfig.dropout must be less than 1, got 1.0"),
        ({"alpha": float("inf")}, "ExpertLoraConfig.alpha must be a finite number, got inf"),
        ({"experts": [2, -1]}, "ExpertLoraConfig.experts must be non-negative indexes, got [-1, 2]"),
    ],
)
def test_bad_config_values_are_refused_naming_the_field(settings: dict[str, object], message: str) -> None:
    with pytest.raises(AdapterError) as caught:
        ExpertLoraConfig(**settings)  # type: ignore[arg-type]
    assert str(caught.value) == message


def test_bad_configs_are_refused_with_the_field() -> None:
    with pytest.raises(AdapterError, match=r"layer\(s\) \[5\]; MoE layers are \[0, 1\]"):
        attach_expert_adapters(build_model(), ExpertLoraConfig(layers=[5]))
    with pytest.raises(AdapterError, match="expert 9"):
        attach_expert_adapters(build_model(), ExpertLoraConfig(experts=[9]))
    assert ExpertLoraConfig.from_dict(ExpertLoraConfig(rank=3, experts=[2, 0]).to_dict()) == ExpertLoraConfig(
        rank=3, experts=[0, 2]
    )
    with pytest.raises(AdapterError, match=r"unknown ExpertLoraConfig field\(s\) \['bogus'\]"):
        ExpertLoraConfig.from_dict({"bogus": 1})


def test_manifests_that_still_name_the_peft_adapter_load() -> None:
    # Update manifests written while `adapter_name` was a config field carry PEFT's default name; it is internal now.
    written_before = {**ExpertLoraConfig(rank=2).to_dict(), "adapter_name": "default"}
    assert ExpertLoraConfig.from_dict(written_before) == ExpertLoraConfig(rank=2)
    assert "adapter_name" not in ExpertLoraConfig().to_dict()
    with pytest.raises(AdapterError, match=r"unknown ExpertLoraConfig field\(s\) \['adapter_name'\]"):
        ExpertLoraConfig.from_dict({**written_before, "adapter_name": "other"})
    model = attach_expert_adapters(build_model(), ExpertLoraConfig(rank=2))
    assert expert_lora_layers(model)[0].active_adapters == ["default"]


def test_one_target_only_adapts_that_tensor() -> None:
    model = attach_expert_adapters(build_model(), ExpertLoraConfig(rank=2, targets=("down_proj",)))
    assert all("down_proj" in key for key in adapter_state_dict(model))


def test_dropout_applies_in_training_mode_only() -> None:
    model = attach_expert_adapters(build_model(), ExpertLoraConfig(rank=4, dropout=0.5))
    train_steps(model, token_batch(), steps=1, lr=5e-2)  # make B non-zero so dropout on the LoRA input matters
    ids = token_batch(seed=9)
    with torch.no_grad():
        evaluated = model(ids).logits
        assert torch.equal(model(ids).logits, evaluated)
        model.train()
        torch.manual_seed(0)
        dropped = model(ids).logits
    assert not torch.equal(dropped, evaluated)


def test_peft_merge_and_unmerge_match_the_adapter_forward() -> None:
    model = attach_expert_adapters(build_model(), ExpertLoraConfig(rank=4, experts=[0, 3]))
    train_steps(model, token_batch(), steps=3)
    ids = token_batch(seed=4)
    with torch.no_grad():
        adapted = model(ids).logits
        model.merge_adapter()
        assert all(layer.merged for layer in model.modules() if isinstance(layer, ExpertLoraLayer))
        torch.testing.assert_close(model(ids).logits, adapted, rtol=0, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(ids).logits, adapted, rtol=0, atol=1e-5)


def test_attaching_twice_is_refused() -> None:
    model = attach_expert_adapters(build_model(), ExpertLoraConfig())
    with pytest.raises(AdapterError, match="already carries adapters"):
        attach_expert_adapters(model, ExpertLoraConfig())
    with pytest.raises(AdapterError, match="no expert adapters"):
        adapter_state_dict(copy.deepcopy(build_model()))


def test_recomputing_expert_activations_gives_the_same_loss_and_gradients() -> None:
    ids = token_batch(seed=2)
    results = []
    for recompute in (False, True):
        model = attach_expert_adapters(build_model(), ExpertLoraConfig(rank=4, dropout=0.1))
        load_adapter_state_dict(model, {k: torch.full_like(v, 0.01) for k, v in adapter_state_dict(model).items()})
        assert set_expert_recompute(model, recompute) == 2
        model.train()
        torch.manual_seed(0)
        loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in trainable_parameters(model)]))
    (loss_plain, grads_plain), (loss_recomputed, grads_recomputed) = results
    assert torch.equal(loss_plain, loss_recomputed)
    for plain, recomputed in zip(grads_plain, grads_recomputed, strict=True):
        torch.testing.assert_close(recomputed, plain, rtol=0, atol=1e-7)


def test_bf16_base_keeps_fp32_adapters_and_tracks_the_fp32_model() -> None:
    config = ExpertLoraConfig(rank=4, experts=[0, 2])
    full = attach_expert_adapters(build_model(), config)
    train_steps(full, token_batch(), steps=2)
    state = adapter_state_dict(full)
    half = attach_expert_adapters(build_model().to(torch.bfloat16), config)
    load_adapter_state_dict(half, state)
    assert all(p.dtype == torch.float32 for p in trainable_parameters(half))
    ids = token_batch(seed=6)
    with torch.no_grad():
        reference = full(ids).logits
        low_precision = half(ids).logits.float()
    # bf16 keeps 8 mantissa bits, and a rounded router score can send a token to another expert, so individual
    # logits may move by a few tenths; on average they agree to about a hundredth
    assert (low_precision - reference).abs().mean().item() < 0.02
    assert (low_precision - reference).abs().max().item() < 0.5
    losses = train_steps(half, token_batch(), steps=3)
    assert losses[-1] < losses[0]


def test_bf16_autocast_trains_fp32_adapters_and_stays_close() -> None:
    model = attach_expert_adapters(build_model(), ExpertLoraConfig(rank=4, experts=[1]))
    load_adapter_state_dict(model, {k: torch.full_like(v, 0.02) for k, v in adapter_state_dict(model).items()})
    ids = token_batch(seed=8)
    with torch.no_grad():
        reference = model(ids).logits
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids).logits
    logits.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable_parameters(model))
    assert (logits.detach().float() - reference).abs().mean().item() < 0.02


def test_the_config_package_declares_the_adapter_config_and_its_targets_once() -> None:
    # The torch-free config package holds the adapter config (the tier2 YAML section is that dataclass); the adapters
    # re-export it, and the targets it allows are the fused tensors the routed forward adapts.
    from fednested import config
    from fednested.adapters import EXPERT_TARGETS
    from fednested.config.adapter import EXPERT_TARGETS as ALLOWED_TARGETS

    assert ExpertLoraConfig is config.ExpertLoraConfig
    assert AdapterError is config.AdapterError
    assert ALLOWED_TARGETS is EXPERT_TARGETS
